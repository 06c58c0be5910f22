"""The only package that imports mlflow: the logging callback, checkpoints, resume, sweeps and comparison, and
queries over logged runs."""

from __future__ import annotations

from workbench.tracking.callback import (FLUSH_ENV, FLUSH_EVERY_S, PREVIOUS_ERROR_TAG, UNPUBLISHED_DIR, MlflowCallback,
                                        flush_interval, log_dataset_input)
from workbench.tracking.checkpoints import (CHECKPOINT_DIR, MODEL_DIR, Checkpoint, build_ready_model,
                                            checkpoint_rounds, latest_checkpoint, load_model, log_model, model_spec,
                                            read_checkpoint, server_state, write_checkpoint)
from workbench.tracking.comparison import (SWEEP_PARENT_TAG, Comparison, ci95_half_width, compare, final_values,
                                           format_comparison, mean_curve, mean_std, rounds_to_reach)
from workbench.tracking.record import (CLIENT_COLUMNS, CLIENT_PARTS_DIR, CLIENT_TABLE, PARTITION_DIR,
                                       PARTITION_STAT_PREFIX, client_rows, load_client_table, load_partition,
                                       log_partition, logged_partition_stats, partition_stat_params)
from workbench.tracking.resuming import config_from_params, resume
from workbench.tracking.store import (DEFAULT_EXPERIMENT, STATE_DIR_ENV, TRACKING_ERRORS, TrackingUnavailable,
                                      check_tracking_uri, default_state_root, default_tracking_uri, final_metrics,
                                      get_or_create_experiment, list_runs, local_store_uri, metric_histories,
                                      open_client, ui_command, ui_url, experiment_ui_tags, experiment_url,
                                      KEY_METRICS)
from workbench.tracking.sweeps import Sweep, sweep, sweep_configs

__all__ = ["KEY_METRICS", "PARTITION_STAT_PREFIX", "PREVIOUS_ERROR_TAG", "experiment_ui_tags", "log_dataset_input",
           "logged_partition_stats", "partition_stat_params", "ui_url", "experiment_url", "CHECKPOINT_DIR", "CLIENT_COLUMNS", "CLIENT_PARTS_DIR", "CLIENT_TABLE", "DEFAULT_EXPERIMENT", "FLUSH_ENV",
           "FLUSH_EVERY_S", "MODEL_DIR", "PARTITION_DIR", "STATE_DIR_ENV", "SWEEP_PARENT_TAG", "TRACKING_ERRORS", "UNPUBLISHED_DIR",
           "Checkpoint", "Comparison", "MlflowCallback", "Sweep", "TrackingUnavailable", "build_ready_model", "ci95_half_width",
           "final_values",
           "check_tracking_uri", "checkpoint_rounds", "client_rows", "compare", "config_from_params",
           "default_state_root", "default_tracking_uri", "final_metrics", "flush_interval", "format_comparison",
           "get_or_create_experiment", "latest_checkpoint", "list_runs", "load_client_table", "load_model",
           "load_partition", "local_store_uri", "log_model", "log_partition", "mean_curve", "mean_std",
           "metric_histories", "open_client",
           "model_spec", "read_checkpoint", "resume", "rounds_to_reach", "server_state", "sweep", "sweep_configs",
           "ui_command", "write_checkpoint"]
