"""The command line: a thin shell over the same calls a notebook makes."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
import textwrap
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from workbench.config import ExperimentConfig, knobs, parse_override, read_config_file
from workbench import plots
from workbench.data import Dataset, DatasetUnavailableError
from workbench.partition import STAT_DESCRIPTIONS, describe, partition_hash
from workbench.simulation import (Callback, Federation, History, RoundResult, load_data, partition_dataset,
                                  prepare, run)
from workbench.tasks import common_task, headline_metric, summary_metrics
from workbench.tracking import (MlflowCallback, TrackingUnavailable, check_tracking_uri, compare,
                                default_tracking_uri, experiment_url, format_comparison, resume, sweep,
                                sweep_configs, ui_command)
from workbench.tracking.deploy import register_served_model, served_model_uri

#: The main job: the FedProx paper's hardest synthetic setting, Synthetic(1, 1) with its 30 natural
#: clients and half of each round's clients straggling, small enough to finish in minutes on 2 cores.
DEMO_OVERRIDES = {
    "data.name": "synthetic", "data.alpha": 1.0, "data.beta": 1.0, "model.name": "logreg",
    "partition.scheme": "natural", "federation.num_clients": 30, "federation.clients_per_round": 10,
    "federation.rounds": 40, "federation.straggler_fraction": 0.5, "training.local_epochs": 20,
    "training.batch_size": 10, "training.lr": 0.01, "strategy.mu": 1.0,
}
DEMO_METRICS = summary_metrics("classification")


def final_metric_names(*finals: dict[str, float]) -> tuple[str, ...]:
    """What the printed tables list: the summary metrics of the runs' task (`tasks.summary_metrics`)."""
    return summary_metrics(common_task(finals))


class UsageError(Exception):
    """A mistake in what the user typed or configured: reported in one line, exit status 2."""


class Interrupted(Exception):
    """A run stopped by SIGTERM or Ctrl-C: KILLED in MLflow, resumable; exit status 128 + signal."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


#: Exit status when the tracking server went away mid-run (EX_TEMPFAIL: resume once it is back).
EXIT_TRACKING_LOST = 75


@contextmanager
def sigterm_sets(stop: threading.Event):
    """SIGTERM sets `stop`, so the run ends KILLED within one client update (Ctrl-C raises
    KeyboardInterrupt, which ends it KILLED too); only the main thread can install the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def tracked(run_id_of: Callable[[], str | None], call: Callable[[threading.Event], History]) -> History:
    """Run `call(stop)` with SIGTERM and Ctrl-C turned into `Interrupted`, which names the resume command."""
    stop = threading.Event()
    try:
        with sigterm_sets(stop):
            history = call(stop)
    except KeyboardInterrupt as err:
        raise Interrupted(_stopped_message("interrupted (Ctrl-C)", run_id_of()), 130) from err
    if history.status == "KILLED":
        after = f" after round {history.rounds[-1].round}" if history.rounds else ""
        raise Interrupted(_stopped_message(f"stopped (SIGTERM){after}", run_id_of()), 128 + signal.SIGTERM)
    return history


def _stopped_message(what: str, run_id: str | None) -> str:
    if run_id is None:
        return f"{what}; what was logged is kept (the interrupted run is KILLED and can be resumed)"
    return f"{what}; MLflow run {run_id} is KILLED with its rounds kept; continue it with: workbench resume {run_id}"


def keys_help() -> str:
    lines = ["config keys (--set KEY=VALUE; defaults shown):"]
    for k in knobs():
        lines.append(f"  {k.key} = {k.default!r}  [{k.describe_range()}]")
        lines += textwrap.wrap(k.help, 76, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Federated-learning experiments, logged to MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)

    tracking_help = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns/mlflow.db)"

    def add_config_options(sub: argparse.ArgumentParser, example: str = "training.lr=0.05") -> None:
        sub.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys")
        sub.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                         help=f"override one config key (repeatable), e.g. --set {example}")

    def add_experiment_options(sub: argparse.ArgumentParser) -> None:
        add_config_options(sub)
        sub.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
        sub.add_argument("--experiment", metavar="NAME", help="MLflow experiment name")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")

    run = commands.add_parser("run", help="run one experiment", epilog=keys_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_options(run)
    demo = commands.add_parser(
        "demo", help="FedAvg vs FedProx on the same non-IID partition, side by side",
        epilog="demo settings: " + " ".join(f"{k}={v}" for k, v in DEMO_OVERRIDES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_options(demo)
    part = commands.add_parser(
        "partition", help="split the data among clients as a run would, print its statistics and write its "
        "figures (no training)", epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(part, example="partition.scheme=dirichlet")
    part.add_argument("--out", metavar="DIR", default="partition-report",
                      help="folder for the figures, counts.csv and summary.json (default: %(default)s)")
    resume_ = commands.add_parser(
        "resume", help="continue a crashed, killed or stopped run from its latest checkpoint (same MLflow run)")
    resume_.add_argument("run_id", metavar="RUN_ID", help="the MLflow run id to continue")
    resume_.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    resume_.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep_ = commands.add_parser(
        "sweep", help="run a grid of configs x seeds as one parent MLflow run with a child run each",
        epilog="example: workbench sweep --grid strategy.name=fedavg,fedprox --grid training.lr=0.01,0.1 "
               "--seeds 0,1,2\n\n" + keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_options(sweep_)
    sweep_.add_argument("--grid", metavar="KEY=V1,V2", action="append", default=[],
                        help="a config key and its values (repeatable: the grid is their product)")
    sweep_.add_argument("--seeds", metavar="S1,S2", default="0", help="seeds of every grid point (default: 0)")
    sweep_.add_argument("--output", metavar="FILE", help="where to save the comparison figure (.png, .pdf, .svg)")
    compare_ = commands.add_parser(
        "compare", help="compare an experiment's finished runs, grouped by the config keys they vary")
    compare_.add_argument("--experiment", metavar="NAME", required=True, help="MLflow experiment name")
    compare_.add_argument("--metric", help="metric to compare (default: the runs' headline metric, "
                          "test_accuracy, or test_mse for a regression)")
    compare_.add_argument("--target", type=float, metavar="VALUE",
                          help="report rounds to reach this value (default: the weakest group's final mean)")
    compare_.add_argument("--sweep", metavar="PARENT_RUN_ID", help="only the children of this sweep")
    compare_.add_argument("--output", metavar="FILE", help="where to save the figure (default: compare-NAME.png)")
    compare_.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    register_ = commands.add_parser(
        "register", help="put a finished run's global model (runs:/RUN_ID/model) in the MLflow Model Registry",
        epilog="serve a run's model: mlflow models serve -m runs:/RUN_ID/model --env-manager local --port 5001")
    register_.add_argument("run_id", metavar="RUN_ID", help="the finished MLflow run whose global model to register")
    register_.add_argument("--name", metavar="NAME", required=True,
                           help="registered model name (created on first use; each registration adds a version)")
    register_.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    return parser


def load_config(path: str | None, overrides: Sequence[str], base: dict | None = None) -> ExperimentConfig:
    """Defaults, then `base`, then the file's keys, then each `--set`: later wins."""
    try:
        values = dict(base or {})
        if path:
            values.update(read_config_file(path))
        values.update(parse_override(text) for text in overrides)
        return ExperimentConfig().with_overrides(values)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


def run_experiment(config: ExperimentConfig, tracking_uri: str | None, experiment: str, quiet: bool,
                   label: str = "") -> tuple[str, dict[str, float]]:
    """Prepare (all user errors surface here, before any MLflow run exists), then run with tracking."""
    tracking_uri = tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(tracking_uri)
        federation = prepare(config)
        tracker = MlflowCallback(tracking_uri, experiment=experiment)  # checks $WORKBENCH_FLUSH_EVERY_S
    except (ValueError, TypeError, DatasetUnavailableError, TrackingUnavailable) as err:
        raise UsageError(str(err)) from err
    if config.partition.scheme == "auto":
        print(f"{label + ': ' if label else ''}{describe_auto_partition(config, federation.dataset)}")
    callbacks = [tracker] if quiet else [tracker, ProgressBar(label)]
    history = tracked(lambda: tracker.run_id, lambda stop: run(federation, callbacks, stop=stop))
    if history.stop_reason is not None:
        print(f"{label or 'run'} ended after round {len(history.rounds)}: {history.stop_reason}", file=sys.stderr)
    return tracker.run_id, history.final()


def describe_auto_partition(config: ExperimentConfig, dataset: Dataset) -> str:
    """What `partition.scheme=auto` picked for `dataset`, and why, in one line."""
    scheme = config.with_resolved_partition(dataset.has_natural_clients).partition.scheme
    has = "has natural clients" if dataset.has_natural_clients else "has no natural clients"
    return f"partition.scheme=auto: {scheme} ({dataset.name} {has}; set partition.scheme to choose another)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow draws a progress bar for every artifact download, even of a few kB; a command line reports
    # its own progress (set the variable to true to see them).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"workbench: {err}", file=sys.stderr)
        return err.exit_status
    except TrackingUnavailable as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return EXIT_TRACKING_LOST
    except KeyboardInterrupt:
        print("workbench: interrupted; the MLflow run is marked KILLED with its rounds kept", file=sys.stderr)
        return 130


def command_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    experiment = args.experiment or "workbench"
    run_id, final = run_experiment(config, args.tracking_uri, experiment, args.quiet)
    print(f"MLflow run id: {run_id} in experiment {experiment!r}")
    for key in final_metric_names(final):
        if key in final:
            print(f"  {key:28s} {format_metric(key, final[key])}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    base = load_config(args.config, args.overrides, base=DEMO_OVERRIDES)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    experiment = args.experiment or "demo"
    results = {}
    for name in ("fedavg", "fedprox"):
        config = base.with_overrides({"strategy.name": name})
        results[name] = run_experiment(config, tracking_uri, experiment, args.quiet, label=name)
    print()
    print(f"Synthetic({base.data.alpha:g}, {base.data.beta:g}), {base.federation.num_clients} clients "
          f"({base.partition.scheme} partition), {base.federation.clients_per_round} per round, "
          f"{base.federation.straggler_fraction:.0%} stragglers, {base.federation.rounds} rounds, seed {base.seed}"
          if base.data.name.startswith("synthetic") else
          f"{base.data.name}, {base.partition.scheme} partition, {base.federation.rounds} rounds, seed {base.seed}")
    print(format_table(results, base.strategy.mu))
    print(f"\nBoth runs are in MLflow experiment {experiment!r}. Open the UI with:\n  {ui_command(tracking_uri)}\n"
          f"then the runs, with their key metrics as columns: {experiment_url(experiment, tracking_uri)}")
    return 0


def command_partition(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    try:
        dataset = load_data(config)
        if config.partition.scheme == "auto":
            print(describe_auto_partition(config, dataset))
            config = config.with_resolved_partition(dataset.has_natural_clients)
        dataset, clients = partition_dataset(config, dataset)
    except (ValueError, TypeError, DatasetUnavailableError) as err:
        raise UsageError(str(err)) from err
    stats = describe(dataset.y_train.numpy(), clients, dataset.num_classes, task=dataset.task,
                     num_bins=config.partition.target_bins)
    digest = partition_hash(clients)
    print(f"{dataset.name}, partition.scheme={config.partition.scheme}, {len(clients)} clients, seed {config.seed}")
    print(f"partition_hash {digest}")
    print(format_stats(stats.summary()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = plots.partition_title(config, dataset=dataset.name, num_clients=len(clients), task=dataset.task)
    rows_are = stats.row_label
    figures = {"overview.png": plots.partition_overview(stats.counts, title=title, row_label=rows_are),
               "heatmap.png": plots.partition_heatmap(stats.counts, title=f"client x {rows_are} samples\n{title}",
                                                      row_label=rows_are),
               "label_bars.png": plots.client_label_bars(stats.counts, title=f"labels per client\n{title}"),
               "sizes.png": plots.client_size_histogram(stats.sizes, title=f"client sizes\n{title}")}
    for name, figure in figures.items():
        figure.savefig(out / name, dpi=100)
    (out / "summary.json").write_text(json.dumps({"partition_hash": digest, **stats.summary()}, indent=2))
    header = ",".join(["client", *stats.column_names(), "size"])
    rows = np.column_stack([np.arange(len(clients)), stats.counts, stats.sizes])
    np.savetxt(out / "counts.csv", rows, fmt="%d", delimiter=",", header=header, comments="")
    print(f"\nwrote {', '.join([*figures, 'counts.csv', 'summary.json'])} to {out}/")
    return 0


def format_stats(summary: dict[str, float]) -> str:
    """The partition statistics as an aligned table: name, value, meaning."""
    rows = [f"{'statistic':26s}{'value':>12s}  meaning"]
    for key, value in summary.items():
        shown = plots.format_number(value)
        rows.append(f"{key:26s}{shown:>12s}  {STAT_DESCRIPTIONS.get(key, '')}")
    return "\n".join(rows)


def command_resume(args: argparse.Namespace) -> int:
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(tracking_uri)
    except TrackingUnavailable as err:
        raise UsageError(str(err)) from err
    callbacks = [] if args.quiet else [ProgressBar(f"resume {args.run_id[:8]}")]

    def call(stop: threading.Event) -> History:
        try:
            return resume(args.run_id, tracking_uri, callbacks, stop=stop)
        except (ValueError, TypeError, DatasetUnavailableError) as err:
            raise UsageError(str(err)) from err

    history = tracked(lambda: args.run_id, call)
    final = history.final()
    print(f"MLflow run id: {args.run_id} (resumed, {history.status})")
    for key in final_metric_names(final):
        if key in final:
            print(f"  {key:28s} {format_metric(key, final[key])}")
    return 0


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """`KEY=v1,v2` arguments as {key: [v1, v2]} (values are validated with the config)."""
    grid = {}
    for text in items:
        key, values = parse_override(text, "--grid", form="KEY=V1,V2", example="training.lr=0.01,0.1")
        if key in grid:
            raise ValueError(f"--grid {key} given twice (list all its values once: --grid {key}=v1,v2)")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r} (for example --seeds 0,1,2)") from None
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0, got {text!r} (for example --seeds 0,1,2)")
    return seeds


def command_sweep(args: argparse.Namespace) -> int:
    base = load_config(args.config, args.overrides)
    experiment = args.experiment or "sweep"
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        grid, seeds = parse_grid(args.grid), parse_seeds(args.seeds)
        points = sweep_configs(base, grid, seeds)  # every point validated before anything runs
        check_tracking_uri(tracking_uri)
    except (ValueError, TypeError, TrackingUnavailable) as err:
        raise UsageError(str(err)) from err
    num_points = len(points) // len(seeds)
    print(f"sweep: {plural(len(points), 'run')} ({plural(num_points, 'grid point')} x {plural(len(seeds), 'seed')}) "
          f"in MLflow experiment {experiment!r}")
    progress = None if args.quiet else (lambda label: [ProgressBar(label)])
    outcome: dict = {}

    def call(stop: threading.Event) -> History:
        try:
            outcome["sweep"] = sweep(base, grid, seeds, tracking_uri, experiment, callbacks=progress, stop=stop)
        except (ValueError, TypeError, DatasetUnavailableError) as err:
            raise UsageError(str(err)) from err
        return History(status="KILLED" if stop.is_set() else "FINISHED")

    tracked(lambda: outcome["sweep"].child_run_ids[-1] if "sweep" in outcome else None, call)
    result = outcome["sweep"]
    comparison = compare(experiment, tracking_uri, sweep_id=result.parent_run_id)
    print(f"\nparent run id: {result.parent_run_id} ({plural(len(result.child_run_ids), 'child run')})")
    print(format_comparison(comparison))
    output = Path(args.output or f"sweep-{result.parent_run_id[:8]}.png")
    comparison.figure.savefig(output, dpi=100)
    print(f"\nfigure: {output}\nOpen the runs in the MLflow UI (children are nested under the parent run):\n"
          f"  {ui_command(tracking_uri)}\nthen: {experiment_url(experiment, tracking_uri)}")
    return 0


def plural(count: int, noun: str) -> str:
    """`1 seed`, `3 seeds`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def command_compare(args: argparse.Namespace) -> int:
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(tracking_uri)
        comparison = compare(args.experiment, tracking_uri, args.metric, sweep_id=args.sweep, target=args.target)
    except (ValueError, TrackingUnavailable) as err:
        raise UsageError(str(err)) from err
    print(format_comparison(comparison))
    output = Path(args.output or f"compare-{args.experiment}.png")
    comparison.figure.savefig(output, dpi=100)
    print(f"\nfigure: {output}")
    return 0


def command_register(args: argparse.Namespace) -> int:
    tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        check_tracking_uri(tracking_uri)
        version = register_served_model(args.run_id, args.name, tracking_uri)
    except (ValueError, TrackingUnavailable) as err:
        raise UsageError(str(err)) from err
    print(f"registered {served_model_uri(args.run_id)} as model {version.name!r}, version {version.version}")
    model_uri = shlex.quote(f"models:/{version.name}/{version.version}")
    print(f"serve it with:\n  MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} mlflow models serve -m {model_uri} "
          f"--env-manager local --port 5001")
    return 0


COMMANDS = {"run": command_run, "demo": command_demo, "partition": command_partition,
            "resume": command_resume, "sweep": command_sweep, "compare": command_compare,
            "register": command_register}


def format_metric(key: str, value: float) -> str:
    """A metric as the tables print it: counts (`num_*`) as integers, everything else to 4 decimals."""
    return f"{value:.0f}" if key.startswith("num_") else f"{value:.4f}"


#: How tables name the strategies (their papers' spelling).
STRATEGY_TITLES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedavgm": "FedAvgM", "fedadam": "FedAdam",
                   "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad", "scaffold": "SCAFFOLD", "fednova": "FedNova",
                   "median": "Median", "trimmed_mean": "Trimmed mean", "krum": "Krum", "multi_krum": "Multi-Krum",
                   "dp_fedavg": "DP-FedAvg"}


def format_table(results: dict[str, tuple[str, dict[str, float]]], mu: float) -> str:
    """The final metrics side by side, then each run's full MLflow run id (what `workbench resume`,
    `load_model` and the UI's search take: a shortened id matches nothing)."""
    headers = {**STRATEGY_TITLES, "fedprox": f"FedProx (mu={mu:g})"}
    rows = [f"{'final metric':30s}" + "".join(f"{headers.get(n, n):>20s}" for n in results)]
    for key in final_metric_names(*(final for _, final in results.values())):
        cells = [f"{format_metric(key, final[key]) if key in final else '-':>20s}" for _, final in results.values()]
        rows.append(f"{key:30s}" + "".join(cells))
    rows.append("\nMLflow run ids:")
    rows += [f"  {headers.get(n, n):28s}{run_id}" for n, (run_id, _) in results.items()]
    return "\n".join(rows)


class ProgressBar(Callback):
    """A tqdm progress bar over rounds, showing the latest value of the task's headline metric (test
    accuracy, or test MSE); its count is the run's round number, so a resumed run's bar goes on from the
    round it resumed at and ends at R/R."""

    def __init__(self, label: str = ""):
        self.label = label
        self.bar = None
        self.headline = "test_accuracy"

    def on_run_start(self, federation: Federation) -> None:
        self.headline, _ = headline_metric(federation.dataset.task)
        done = federation.start_round - 1  # where a resumed run starts (set by `run`)
        self.bar = tqdm(total=federation.config.federation.rounds, initial=done, desc=self.label or "rounds",
                        unit="round")

    def on_round_end(self, result: RoundResult, federation: Federation) -> None:
        if self.bar.n != result.round - 1:
            # jump without counting the skipped rounds as progress (tqdm's rate and miniters stay right)
            self.bar.n = self.bar.last_print_n = self.bar.initial = result.round - 1
        if self.headline in result.metrics:
            self.bar.set_postfix({self.headline.removeprefix("test_"): f"{result.metrics[self.headline]:.3f}"})
        self.bar.update(1)

    def on_run_end(self, history: History, federation: Federation, error: BaseException | None) -> None:
        self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
