"""The privacy-utility table: how well a server reconstructs a client's training images from what it sees
(PSNR, SSIM and labels recovered, beside the mean image's PSNR: what an attacker reaches without any update)
and the test accuracy the same run reaches, for each defense × training setting.

Every number comes from the product's own path: each row is a real run (`workbench.simulation.run`) with the
setting's batch size and local epochs and the defense turned on (DP-FedAvg, secure aggregation, both), and
the attack (`workbench.privacy.leakage_report`) replays round 1 of that run exactly and attacks what the
server saw of `--clients` of its clients.

    python benchmarks/privacy_leakage.py                 # digits, mlp, Geiping's attack; ~10 minutes on 2 cores
    python benchmarks/privacy_leakage.py --quick         # 2 settings, 1 client each
    python benchmarks/privacy_leakage.py --model logreg --attack idlg
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from workbench.config import ExperimentConfig
from workbench.privacy import leakage_report
from workbench.simulation import run, sample_round

#: (label, samples per client, batch size, local epochs)
SETTINGS = [
    ("1 sample, B=1, 1 step", 1, 1, 1),
    ("4 samples, B=4, 1 step", 4, 4, 1),
    ("4 samples, B=1, 4 steps", 4, 1, 1),
    ("4 samples, B=4, 5 epochs", 4, 4, 5),
]
#: (label, config overrides of the run, leakage_report's defense, its noise multiplier). What is attacked: the
#: update the server receives (none), the cohort's sum it unmasks (secure aggregation), and for DP what the
#: round releases: central DP-FedAvg adds its noise at the server, which itself still receives each clipped
#: update (or, behind secure aggregation, their clean sum); the noise protects the released model.
DEFENSES = [
    ("none", {}, "none", 1.0),
    ("DP z=0.3 (release)", {"strategy.name": "dp_fedavg", "strategy.noise_multiplier": 0.3}, "dp", 0.3),
    ("DP z=1 (release)", {"strategy.name": "dp_fedavg", "strategy.noise_multiplier": 1.0}, "dp", 1.0),
    ("secure aggregation", {"strategy.secure_aggregation": True}, "secure_aggregation", 1.0),
    ("secure aggregation + DP z=1 (release)", {"strategy.name": "dp_fedavg", "strategy.noise_multiplier": 1.0,
                                     "strategy.secure_aggregation": True}, "dp", 1.0),
]


def config_for(model: str, samples: int, batch: int, epochs: int, overrides: dict, rounds: int) -> ExperimentConfig:
    """digits (1,437 training images) split IID into clients of `samples` images, 10 clients per round."""
    return ExperimentConfig.from_dict({
        "data.name": "digits", "model.name": model, "partition.scheme": "iid",
        "federation.num_clients": 1437 // samples, "federation.clients_per_round": 10,
        "federation.rounds": rounds, "training.batch_size": batch, "training.local_epochs": epochs,
        "training.lr": 0.1, "strategy.clip_norm": 1.0, "execution.executor": "sequential",
        "evaluation.every": rounds, **overrides})


def measure(config: ExperimentConfig, defense: str, noise: float, attack: str, num_clients: int,
            iterations: int | None) -> dict[str, float]:
    """The attack on round 1 of the run for its first `num_clients` sampled clients of that size, averaged."""
    sampled = [int(c) for c in sample_round(config, 1)[0]][:num_clients]
    reports = [leakage_report(config, 1, client, defense=defense, attack=attack, noise_multiplier=noise,
                              clip_norm=config.strategy.clip_norm if defense == "dp" else None,
                              max_samples=128, num_iterations=iterations, seed=client) for client in sampled]
    return {"psnr": statistics.fmean(r.quality["psnr"] for r in reports),
            "ssim": statistics.fmean(r.quality["ssim"] for r in reports),
            "labels": statistics.fmean(r.quality["label_accuracy"] for r in reports),
            "mean_psnr": statistics.fmean(r.baseline["psnr"] for r in reports),
            "attack_s": statistics.fmean(r.seconds for r in reports)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=["mlp", "logreg"])
    parser.add_argument("--attack", default="geiping", choices=["idlg", "dlg", "geiping"])
    parser.add_argument("--clients", type=int, default=3, help="clients attacked per cell (averaged)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of each run, for its test accuracy")
    parser.add_argument("--iterations", type=int, default=None, help="attack iterations (default: the attack's)")
    parser.add_argument("--quick", action="store_true", help="2 settings, 1 client, 5 rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = SETTINGS[:2] if args.quick else SETTINGS
    clients, rounds = (1, 5) if args.quick else (args.clients, args.rounds)
    print(f"digits, {args.model}, attack {args.attack} on round 1 ({clients} client(s) per cell), runs of "
          f"{rounds} rounds with 10 clients per round, lr 0.1, clip_norm 1.0 for DP")
    print("| setting | defense | PSNR (dB) | mean image PSNR | SSIM | labels | test accuracy | attack s |")
    print("|---|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    for label, samples, batch, epochs in settings:
        for name, overrides, defense, noise in DEFENSES:
            config = config_for(args.model, samples, batch, epochs, overrides, rounds)
            attacked = measure(config, defense, noise, args.attack, clients, args.iterations)
            accuracy = run(config).final().get("test_accuracy", math.nan)
            print(f"| {label} | {name} | {attacked['psnr']:.1f} | {attacked['mean_psnr']:.1f} | "
                  f"{attacked['ssim']:.2f} | {attacked['labels']:.2f} | {accuracy:.3f} | {attacked['attack_s']:.1f} |",
                  flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
