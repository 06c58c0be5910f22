"""The command line: a thin shell over the same calls a notebook makes."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Sequence

from tqdm.auto import tqdm

from workbench.config import ExperimentConfig, knobs, parse_override, read_config_file
from workbench.data import DatasetUnavailableError
from workbench.simulation import Callback, Federation, History, RoundResult, prepare, run
from workbench.tracking import MlflowCallback, default_tracking_uri, ui_command

#: The main job: the FedProx paper's hardest synthetic setting, Synthetic(1, 1) with its 30 natural
#: clients and half of each round's clients straggling, small enough to finish in minutes on 2 cores.
DEMO_OVERRIDES = {
    "data.name": "synthetic", "data.alpha": 1.0, "data.beta": 1.0, "model.name": "logreg",
    "partition.scheme": "natural", "federation.num_clients": 30, "federation.clients_per_round": 10,
    "federation.rounds": 40, "federation.straggler_fraction": 0.5, "training.local_epochs": 20,
    "training.batch_size": 10, "training.lr": 0.01, "strategy.mu": 1.0,
}
DEMO_METRICS = ("test_accuracy", "test_loss", "train_loss", "client_accuracy_median", "client_accuracy_p10")


class UsageError(Exception):
    """A mistake in what the user typed or configured: reported in one line, exit status 2."""


def keys_help() -> str:
    lines = ["config keys (--set KEY=VALUE; defaults shown):"]
    for k in knobs():
        lines.append(f"  {k.key} = {k.default!r}  [{k.describe_range()}]")
        lines += textwrap.wrap(k.help, 76, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Federated-learning experiments, logged to MLflow.")
    commands = parser.add_subparsers(dest="command", required=True)

    def add_experiment_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys")
        sub.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                         help="override one config key (repeatable), e.g. --set training.lr=0.05")
        sub.add_argument("--tracking-uri", metavar="URI",
                         help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlruns/mlflow.db)")
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
    try:
        federation = prepare(config)
    except (ValueError, TypeError, DatasetUnavailableError) as err:
        raise UsageError(str(err)) from err
    tracker = MlflowCallback(tracking_uri, experiment=experiment)
    callbacks = [tracker] if quiet else [tracker, ProgressBar(label)]
    history = run(federation, callbacks)
    return tracker.run_id, history.final()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted; the MLflow run is marked KILLED with its rounds kept", file=sys.stderr)
        return 130


def command_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    run_id, final = run_experiment(config, args.tracking_uri, args.experiment or "workbench", args.quiet)
    print(f"MLflow run id: {run_id}")
    for key in DEMO_METRICS:
        if key in final:
            print(f"  {key:24s} {final[key]:.4f}")
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
    print(f"\nBoth runs are in MLflow experiment {experiment!r}. Open the UI with:\n  {ui_command(tracking_uri)}")
    return 0


COMMANDS = {"run": command_run, "demo": command_demo}


def format_table(results: dict[str, tuple[str, dict[str, float]]], mu: float) -> str:
    headers = {"fedavg": "FedAvg", "fedprox": f"FedProx (mu={mu:g})"}
    rows = [f"{'final metric':26s}" + "".join(f"{headers[n]:>20s}" for n in results)]
    for key in DEMO_METRICS:
        cells = [f"{final[key]:20.4f}" if key in final else f"{'-':>20s}" for _, final in results.values()]
        rows.append(f"{key:26s}" + "".join(cells))
    rows.append(f"{'MLflow run id':26s}" + "".join(f"{run_id[:12] + '…':>20s}" for run_id, _ in results.values()))
    return "\n".join(rows)


class ProgressBar(Callback):
    """A tqdm progress bar over rounds, showing the latest test accuracy."""

    def __init__(self, label: str = ""):
        self.label = label
        self.bar = None

    def on_run_start(self, federation: Federation) -> None:
        self.bar = tqdm(total=federation.config.federation.rounds, desc=self.label or "rounds", unit="round")

    def on_round_end(self, result: RoundResult, federation: Federation) -> None:
        if "test_accuracy" in result.metrics:
            self.bar.set_postfix(acc=f"{result.metrics['test_accuracy']:.3f}")
        self.bar.update(1)

    def on_run_end(self, history: History, federation: Federation, error: BaseException | None) -> None:
        self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
