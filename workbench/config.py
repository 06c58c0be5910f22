"""The experiment config: every knob with its type, default, range and description, validated once."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from workbench import registry

DATASETS = ("synthetic", "synthetic_iid", "synthetic_regression", "digits", "mnist1d", "mnist1d_seq", "diabetes",
            "breast_cancer", "wine", "fashion_mnist", "mnist", "cifar10")
#: `data.scaling`: how the clients' inputs are standardized after partitioning (`workbench.scaling`).
SCALINGS = ("none", "federated", "local")
MODELS = ("logreg", "mlp", "cnn", "linear", "tabular_mlp", "cnn1d", "gru", "lstm")
#: What a dataset's labels are; the loss and the metrics follow it (`Dataset.task`).
TASKS = ("classification", "regression")
PARTITION_SCHEMES = ("auto", "iid", "dirichlet", "shards", "classes_per_client", "quantity", "feature_noise",
                     "rotation", "natural", "mixture")
#: What `partition.scheme=auto` becomes: the dataset's own clients where it has them, else an IID split.
AUTO_SCHEME_WITH_CLIENTS, AUTO_SCHEME_WITHOUT_CLIENTS = "natural", "iid"
#: Schemes that may form the skewed part of `mixture`.
MIXTURE_SKEWS = ("dirichlet", "shards", "classes_per_client", "quantity")
QUANTITY_DISTRIBUTIONS = ("dirichlet", "lognormal")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold", "fednova", "median",
              "trimmed_mean", "krum", "multi_krum", "dp_fedavg", "local", "centralized")
#: Groups of strategies that share knobs (each knob says which strategies use it: `Knob.used_by`).
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad")
ROBUST = ("median", "trimmed_mean", "krum", "multi_krum")
#: Strategies whose server step is a function of the sum of per-client contributions, so that secure
#: aggregation can hide the individual updates (`Strategy.summand`); every other strategy refuses it.
SUM_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "dp_fedavg")
ATTACKS = ("sign_flip", "label_flip", "gaussian")
DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("auto", "sequential", "processes", "vectorized", "ray")


def knob(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    hint: str = "",
    used_by: Sequence[str] = (),
    registry: str = "",
) -> Any:
    """A config field that carries its range and description beside its default; `used_by` names the
    strategies whose behaviour it changes (empty: every run's); `registry` ("model" or "dataset") makes
    the names users register (`workbench.register_model`, ...) and `module:Name` paths valid choices too."""
    metadata = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
                "max_exclusive": max_exclusive, "hint": hint, "used_by": tuple(used_by), "registry": registry}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Knob:
    """What the CLI help, the widgets and the validation need to know about one field."""

    key: str
    type: type
    default: Any
    help: str
    choices: Sequence[Any] | None
    min: float | None
    max: float | None
    min_exclusive: bool
    hint: str
    max_exclusive: bool = False
    #: the strategies whose behaviour this knob changes (empty: every run's)
    used_by: tuple[str, ...] = ()
    #: "model" / "dataset": registered names and `module:Name` paths are accepted beside `choices`
    registry: str = ""

    def describe_range(self) -> str:
        if self.choices is not None:
            names = "{" + ", ".join(str(c) for c in self.choices) + "}"
            return f"{names} or module:Name" if self.registry else names
        low = "" if self.min is None else (f"> {self.min}" if self.min_exclusive else f">= {self.min}")
        high = "" if self.max is None else (f"< {self.max}" if self.max_exclusive else f"<= {self.max}")
        return " and ".join(part for part in (low, high) if part) or "any"

    def check(self, value: Any) -> Any:
        """Coerce `value` to this knob's type and check its range; raise naming the field."""
        value = _coerce(self, value)
        if self.registry and value not in self.choices and ":" in value:
            _REGISTRIES[self.registry].resolve(value)  # importable, or a ValueError that names the key
            return value
        if self.registry and value not in self.choices and not difflib.get_close_matches(
                str(value), [str(c) for c in self.choices], n=1):
            raise ValueError(f"{self.key} must be one of {self.describe_range()}, got {value!r}: no {self.registry} "
                             f"of that name is registered (register yours first with workbench.register_"
                             f"{self.registry}({value!r}, ...), or give a module path 'package.module:Name')")
        if self.choices is not None and value not in self.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in self.choices], n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"choose one of {self.describe_range()}"
            raise ValueError(f"{self.key} must be one of {self.describe_range()}, got {value!r} ({fix})")
        too_low = self.min is not None and (value <= self.min if self.min_exclusive else value < self.min)
        too_high = self.max is not None and (value >= self.max if self.max_exclusive else value > self.max)
        if too_low or too_high:
            hint = f" ({self.hint})" if self.hint else ""
            raise ValueError(f"{self.key} must be {self.describe_range()}, got {value!r}{hint}")
        return value


def with_article(word: str) -> str:
    """`word` after its indefinite article, for messages: "an int", "a float", "an OrderedDict"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def type_phrase(expected: type) -> str:
    """How a message names the type a knob expects: "an int (a whole number)", "a float (a number)", ..."""
    spelled = {int: "an int (a whole number)", float: "a float (a number)", bool: "a bool (true or false)",
               str: "a str (text)"}
    return spelled.get(expected, with_article(expected.__name__))


def _coerce(knob_: Knob, value: Any) -> Any:
    expected = knob_.type
    if isinstance(value, str) and expected is not str:
        text = value.strip()
        try:
            if expected is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return lowered in ("true", "1", "yes")
            if expected is int:
                return int(text)
            return float(text)
        except ValueError:
            raise TypeError(
                f"{knob_.key} must be {type_phrase(expected)}, got {value!r} "
                f"(write it like {knob_.default!r})"
            ) from None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is str and value is None:
        return ""
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        raise TypeError(
            f"{knob_.key} must be {type_phrase(expected)}, got {value!r} of type "
            f"{type(value).__name__} (write it like {knob_.default!r})"
        )
    return value


class _Section:
    """Validates its own fields on construction, so an invalid section cannot exist."""

    _prefix = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            k = _knob_of(self._prefix, f, type(self))
            object.__setattr__(self, f.name, k.check(getattr(self, f.name)))


@dataclass(frozen=True)
class DataConfig(_Section):
    _prefix = "data"
    name: str = knob("synthetic", "dataset: generated (synthetic, synthetic_iid, synthetic_regression, mnist1d, "
                     "mnist1d_seq = the same as sequences of 40 steps), bundled (digits; tabular: diabetes = a "
                     "regression, breast_cancer, wine), torchvision (fashion_mnist, mnist, cifar10), or your own "
                     "(workbench.register_dataset)", choices=DATASETS, registry="dataset")
    root: str = knob("", "folder for torchvision datasets and your loaders' files; empty = the data cache "
                     "($WORKBENCH_DATA_DIR, else ~/.cache/fl-workbench/data)")
    alpha: float = knob(1.0, "Synthetic(alpha, beta) (synthetic, synthetic_regression): how much the clients' "
                        "models differ (Li et al. 2020)",
                        min=0.0, hint="0 = same model for all clients; the FedProx paper uses 0, 0.5, 1")
    beta: float = knob(1.0, "Synthetic(alpha, beta) (synthetic, synthetic_regression): how much the clients' "
                       "inputs differ (Li et al. 2020)",
                       min=0.0, hint="0 = same input distribution; the FedProx paper uses 0, 0.5, 1")
    scaling: str = knob("none", "input standardization after partitioning: federated = every client and the test "
                        "set with the mean and std pooled from the clients' sums, sums of squares and counts; "
                        "local = each client with its own (a feature skew; the global test set gets the pooled "
                        "ones); none = as loaded. Run the tabular sets (diabetes, breast_cancer, wine) with "
                        "federated", choices=SCALINGS)


@dataclass(frozen=True)
class ModelConfig(_Section):
    _prefix = "model"
    name: str = knob("logreg", "model: logreg (multinomial logistic regression), linear (one linear layer: "
                     "linear regression for a regression task, = logreg for a classification), mlp (the 2NN, "
                     "200-200), tabular_mlp (64-64, for 10-30 features), cnn (McMahan et al. 2017, images); "
                     "for sequences (T,) or (T, C): cnn1d (MNIST-1D's CNN), gru, lstm (64 units); or your own "
                     "(workbench.register_model, or a module path package.module:Name)",
                     choices=MODELS, registry="model")


@dataclass(frozen=True)
class PartitionConfig(_Section):
    _prefix = "partition"
    scheme: str = knob("auto", "how training samples are split among clients; auto = natural where the dataset "
                       "has real clients (synthetic, synthetic_iid, your own data with client splits), else iid",
                       choices=PARTITION_SCHEMES)
    alpha: float = knob(0.5, "dirichlet label skew: smaller = more skew", min=0.0, min_exclusive=True,
                        hint="smaller alpha = more label skew; try 0.1-1.0")
    target_bins: int = knob(10, "dirichlet on a continuous target (a regression; unused for a classification): "
                            "the target is cut into this many quantile bins of the training targets, and each "
                            "bin is split among clients as a class is", min=1,
                            hint="10 = deciles; more bins = finer skew with fewer samples per bin")
    shards_per_client: int = knob(2, "shards: label-sorted shards per client (McMahan et al. 2017)", min=1,
                                  hint="McMahan et al. use 2")
    min_size: int = knob(1, "smallest number of training samples any client may hold", min=1,
                         hint="every client needs at least one sample")
    classes_per_client: int = knob(2, "classes_per_client: exactly k classes per client (#C=k of NIID-Bench, "
                                   "Li et al. 2022)", min=1, hint="NIID-Bench uses 1, 2, 3")
    quantity_distribution: str = knob("dirichlet", "quantity: how client sizes are drawn (labels stay IID): "
                                      "Dirichlet proportions or log-normal sizes", choices=QUANTITY_DISTRIBUTIONS)
    quantity_alpha: float = knob(0.5, "quantity (dirichlet): size proportions ~ Dir(alpha); smaller = more "
                                 "unequal sizes", min=0.0, min_exclusive=True,
                                 hint="smaller = more unequal sizes; NIID-Bench uses 0.5")
    quantity_sigma: float = knob(1.0, "quantity (lognormal): sigma of log client size; larger = more unequal "
                                 "sizes", min=0.0, max=10.0, hint="0 = equal sizes; try 0.5-2")
    noise_sigma: float = knob(0.1, "feature_noise: client i of N adds Gaussian noise of std sigma*i/N to its "
                              "inputs (NIID-Bench, Li et al. 2022)", min=0.0, hint="NIID-Bench uses 0.1")
    max_rotation: float = knob(90.0, "rotation: client i of N rotates its images by max_rotation*i/N degrees",
                               min=0.0, max=360.0, hint="degrees; try 45-180")
    iid_fraction: float = knob(0.5, "mixture: fraction of clients (the first ones) with IID data beside "
                               "skewed ones", min=0.0, max=1.0, hint="0 = all skewed, 1 = all IID")
    mixture_skew: str = knob("dirichlet", "mixture: how the non-IID clients are partitioned",
                             choices=MIXTURE_SKEWS)

    def resolved(self, has_natural_clients: bool) -> "PartitionConfig":
        """This section with `scheme=auto` replaced by what it means for a dataset that has (or lacks)
        natural clients; any other scheme is returned unchanged (`resolve_partition_scheme`)."""
        scheme = resolve_partition_scheme(self.scheme, has_natural_clients)
        return self if scheme == self.scheme else dataclasses.replace(self, scheme=scheme)


def resolve_partition_scheme(scheme: str, has_natural_clients: bool) -> str:
    """The scheme a run uses: `auto` is `natural` for a dataset with real clients and `iid` for one
    without; every other scheme is used as given (a `natural` that the data cannot honour fails there)."""
    if scheme != "auto":
        return scheme
    return AUTO_SCHEME_WITH_CLIENTS if has_natural_clients else AUTO_SCHEME_WITHOUT_CLIENTS


@dataclass(frozen=True)
class FederationConfig(_Section):
    _prefix = "federation"
    num_clients: int = knob(30, "number of clients (synthetic: number of generated devices)", min=1)
    clients_per_round: int = knob(10, "clients sampled uniformly without replacement each round", min=1)
    rounds: int = knob(50, "communication rounds", min=1)
    straggler_fraction: float = knob(0.0, "fraction of sampled clients that only do 1..E-1 local epochs "
                                     "(FedAvg drops them, FedProx keeps their partial work)",
                                     min=0.0, max=1.0, hint="the FedProx paper uses 0, 0.5, 0.9")


@dataclass(frozen=True)
class TrainingConfig(_Section):
    _prefix = "training"
    local_epochs: int = knob(20, "local epochs E per round", min=1)
    batch_size: int = knob(10, "local mini-batch size B", min=1)
    lr: float = knob(0.01, "local SGD learning rate", min=0.0, min_exclusive=True,
                     hint="try 0.01-0.1 for SGD")
    momentum: float = knob(0.0, "local SGD momentum (PyTorch's, no dampening); the buffer starts at zero every "
                           "round", min=0.0, max=1.0, max_exclusive=True,
                           hint="NIID-Bench and most FL papers use 0.9; the FedProx paper 0")
    weight_decay: float = knob(0.0, "local SGD weight decay (L2 gradient term)", min=0.0,
                               hint="try 1e-5-1e-3")
    lr_decay: float = knob(1.0, "the local learning rate of round r is lr * lr_decay^(r-1)", min=0.0,
                           max=1.0, min_exclusive=True, hint="1 = constant; try 0.99-0.998")


@dataclass(frozen=True)
class StrategyConfig(_Section):
    _prefix = "strategy"
    name: str = knob("fedavg", "federated algorithm (see the README's strategy table)", choices=STRATEGIES)
    mu: float = knob(1.0, "FedProx proximal weight mu (mu=0 keeps stragglers' work without a proximal term)",
                     min=0.0, hint="the FedProx paper uses 0.001-1", used_by=("fedprox",))
    server_lr: float = knob(1.0, "server learning rate eta_g of fedavgm and scaffold (1 = the clients' average "
                            "step)", min=0.0, min_exclusive=True, hint="1 is FedAvg's step; try 0.5-1",
                            used_by=("fedavgm", "scaffold"))
    server_momentum: float = knob(0.9, "fedavgm: server momentum beta (Hsu et al. 2019)", min=0.0, max=1.0,
                                  max_exclusive=True, hint="Hsu et al. use 0.9; 0 = FedAvg",
                                  used_by=("fedavgm",))
    adaptive_lr: float = knob(0.01, "server learning rate eta of fedadam, fedyogi and fedadagrad (Reddi et al. "
                              "2021, Algorithm 2)", min=0.0, min_exclusive=True,
                              hint="Reddi et al. tune it over 1e-3-1; try 0.01-0.1", used_by=SERVER_OPTIMIZERS)
    beta1: float = knob(0.9, "first-moment decay beta_1 of fedadam, fedyogi, fedadagrad (Reddi et al.: 0.9)",
                        min=0.0, max=1.0, max_exclusive=True, hint="Reddi et al. use 0.9",
                        used_by=SERVER_OPTIMIZERS)
    beta2: float = knob(0.99, "second-moment decay beta_2 of fedadam and fedyogi (Reddi et al.: 0.99)",
                        min=0.0, max=1.0, max_exclusive=True, hint="Reddi et al. use 0.99",
                        used_by=("fedadam", "fedyogi"))
    tau: float = knob(1e-3, "adaptivity tau of fedadam, fedyogi, fedadagrad (Reddi et al.: 1e-3)", min=0.0,
                      min_exclusive=True, hint="Reddi et al. use 1e-3; larger = closer to FedAvgM",
                      used_by=SERVER_OPTIMIZERS)
    trim_fraction: float = knob(0.1, "trimmed_mean: fraction beta of the updates dropped at each end, "
                                "coordinate by coordinate (Yin et al. 2018)", min=0.0, max=0.5,
                                max_exclusive=True, hint="at least the fraction of malicious clients",
                                used_by=("trimmed_mean",))
    num_byzantine: int = knob(2, "krum, multi_krum: the number f of malicious updates tolerated (Blanchard et "
                              "al. 2017; needs clients_per_round >= 2f + 3)", min=0,
                              hint="at least the number of malicious clients per round",
                              used_by=("krum", "multi_krum"))
    num_selected: int = knob(0, "multi_krum: how many of the best-scored updates are averaged (0 = n - f)",
                             min=0, hint="0 = n - f; 1 = Krum", used_by=("multi_krum",))
    clip_norm: float = knob(1.0, "dp_fedavg: every update (w - w_global) is clipped to this L2 norm C "
                            "(McMahan et al. 2018)", min=0.0, min_exclusive=True,
                            hint="near the median update norm of an unclipped run", used_by=("dp_fedavg",))
    noise_multiplier: float = knob(1.0, "dp_fedavg: Gaussian noise of std z*C on the sum of the clipped "
                                   "updates", min=0.0, hint="0 = clipping only (no privacy); try 0.5-2",
                                   used_by=("dp_fedavg",))
    secure_aggregation: bool = knob(False, "secure aggregation (Bonawitz et al. 2017): clients mask their "
                                    "quantized updates with pairwise masks that cancel in the sum, so the server "
                                    "sees only the cohort's sum", used_by=SUM_STRATEGIES)
    secagg_threshold: float = knob(0.67, "secure aggregation: fraction t/n of the round's clients whose shares "
                                   "must survive for the server to unmask the sum (Shamir t of n)", min=0.5,
                                   max=1.0, min_exclusive=True,
                                   hint="t > n/2 keeps a server that lies about dropouts from unmasking a "
                                   "single update; 2/3 is common", used_by=SUM_STRATEGIES)
    secagg_scale_bits: int = knob(24, "secure aggregation: updates are quantized to multiples of "
                                  "2^-secagg_scale_bits in the ring Z_2^64 before masking", min=8, max=40,
                                  hint="24 = a rounding of 3e-8 per coordinate", used_by=SUM_STRATEGIES)


@dataclass(frozen=True)
class AttackConfig(_Section):
    _prefix = "attack"
    fraction: float = knob(0.0, "fraction of each round's sampled clients that are malicious (chosen from the "
                           "server's stream: the same clients for every strategy)", min=0.0, max=1.0,
                           max_exclusive=True, hint="0 = no attack; try 0.1-0.3")
    kind: str = knob("sign_flip", "what malicious clients do: sign_flip (send -scale x their update), "
                     "label_flip (train on labels C-1-y), gaussian (send noise of std noise_std)",
                     choices=ATTACKS)
    scale: float = knob(10.0, "sign_flip: the malicious update is -scale x the honest one", min=0.0,
                        min_exclusive=True, hint="1 = just the sign; try 1-10")
    noise_std: float = knob(1.0, "gaussian: std of each coordinate of the malicious update", min=0.0,
                            min_exclusive=True, hint="try 0.1-10")


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    _prefix = "privacy"
    delta: float = knob(1e-5, "dp_fedavg: the delta of the (epsilon, delta) guarantee that is logged", min=0.0,
                        max=1.0, min_exclusive=True, max_exclusive=True,
                        hint="below 1 / num_clients, e.g. 1e-5", used_by=("dp_fedavg",))
    target_epsilon: float = knob(0.0, "dp_fedavg: end the run (FINISHED) before the round that would spend "
                                 "more than this epsilon (0 = no budget)", min=0.0, hint="0 = no budget; try 1-10",
                                 used_by=("dp_fedavg",))
    audit: bool = knob(False, "membership-inference audit (Yeom et al. 2018 loss threshold) every evaluation "
                       "round: the attacker's AUC against the global model and against one client's local "
                       "model, logged as privacy_mia_auc_global / privacy_mia_auc_client")
    audit_client: int = knob(0, "privacy.audit: the client whose local model is audited (in the rounds it "
                             "trains)", min=0)
    audit_samples: int = knob(500, "privacy.audit: at most this many members and as many non-members (test "
                              "samples) per AUC", min=10, hint="more = a steadier AUC, slower rounds")


@dataclass(frozen=True)
class ExecutionConfig(_Section):
    _prefix = "execution"
    executor: str = knob("auto", "how a round's clients are computed: sequential = one after another on one "
                         "model (the reference); processes = worker processes of one thread each (CPU); "
                         "vectorized = all clients at once with stacked weights (GPU); ray = Ray actors on a local "
                         "instance or a cluster (pip install 'fl-workbench[ray]'); auto = vectorized on a GPU, "
                         "processes on a multi-core CPU, else sequential (never ray)", choices=EXECUTORS)
    threads: int = knob(0, "torch intra-op threads of the run's own process (0 = chosen by the executor)",
                        min=0, hint="1 is often fastest for small models on few cores")
    workers: int = knob(0, "worker processes of executor=processes (0 = one per CPU core)", min=0,
                        hint="more workers than cores only adds contention")
    ray_address: str = knob("", "executor=ray: the Ray cluster to use; empty = start (or reuse) a local instance "
                            "with this machine's cores; auto or host:port = join a running cluster",
                            hint="empty for one machine; the head's host:port after `ray start --head`")
    cpus_per_client: float = knob(1.0, "executor=ray: CPUs each Ray actor reserves (its torch threads: the whole "
                                  "part, at least 1); actors = min(clients per round, cluster CPUs / this)",
                                  min=0.0, min_exclusive=True,
                                  hint="1 is fastest for small models; fractions pack more actors per core")
    gpus_per_client: float = knob(0.0, "executor=ray: GPUs each Ray actor reserves (0 = CPU only; 0.25 = four "
                                  "actors share a GPU)", min=0.0,
                                  hint="0 on CPU-only clusters; a fraction shares one GPU between actors")
    on_client_failure: str = knob("fail", "executor=ray: a client update that raises or whose worker dies is "
                                  "retried once on another worker; if that fails too, fail = end the run FAILED "
                                  "(resumable), drop = go on without it (the client table says why)",
                                  choices=("fail", "drop"))
    round_timeout_s: float = knob(0.0, "executor=ray: seconds a round waits for its clients' updates; clients "
                                  "not done by then are dropped and logged as timed out (0 = no limit)",
                                  min=0.0, hint="a few times a normal round's time; 0 waits as long as it takes")


@dataclass(frozen=True)
class EvaluationConfig(_Section):
    _prefix = "evaluation"
    every: int = knob(1, "evaluate the global model every N rounds (and always after the last)", min=1)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    _prefix = "checkpoint"
    every: int = knob(1, "log the global model to MLflow every N rounds (the last round and the best one "
                      "by the headline metric, test accuracy or a regression's test MSE, are always kept; "
                      "0 = only those)", min=0,
                      hint="1 = every round; raise it for big models and many rounds")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: the same config gives the same numbers."""

    seed: int = knob(0, "seed of every random stream (data, partition, sampling, stragglers, training)", min=0)
    device: str = knob("auto", "where tensors live: auto = cuda when available, else cpu", choices=DEVICES)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in _SECTIONS:
                object.__setattr__(self, f.name, _knob_of("", f, type(self)).check(getattr(self, f.name)))
            elif not isinstance(getattr(self, f.name), _SECTIONS[f.name]):
                section = _SECTIONS[f.name].__name__
                raise TypeError(f"{f.name} must be {with_article(section)}, got "
                                f"{with_article(type(getattr(self, f.name)).__name__)} (build it with {section}(...), "
                                "or give nested dicts to ExperimentConfig.from_dict)")
        fed, train = self.federation, self.training
        if fed.clients_per_round > fed.num_clients:
            raise ValueError(
                f"federation.clients_per_round must be <= federation.num_clients ({fed.num_clients}), "
                f"got {fed.clients_per_round} (lower clients_per_round or raise num_clients)"
            )
        if self.privacy.audit and self.privacy.audit_client >= fed.num_clients:
            raise ValueError(
                f"privacy.audit_client must be < federation.num_clients ({fed.num_clients}), got "
                f"{self.privacy.audit_client} (clients are numbered 0..{fed.num_clients - 1})"
            )
        if fed.straggler_fraction > 0 and train.local_epochs < 2:
            raise ValueError(
                f"federation.straggler_fraction={fed.straggler_fraction} needs training.local_epochs >= 2, "
                f"got {train.local_epochs} (stragglers do a random 1..E-1 epochs; "
                "raise local_epochs or set straggler_fraction=0)"
            )

    def with_resolved_partition(self, has_natural_clients: bool) -> "ExperimentConfig":
        """This config with `partition.scheme=auto` replaced by the scheme it means for a dataset that has
        (or lacks) natural clients (`resolve_partition_scheme`); the same config for any other scheme."""
        partition = self.partition.resolved(has_natural_clients)
        return self if partition is self.partition else dataclasses.replace(self, partition=partition)

    # ----- flat-dict round trip (MLflow params, CLI overrides) -----

    def to_flat(self) -> dict[str, Any]:
        return {k.key: _get(self, k.key) for k in knobs()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ExperimentConfig":
        """Build from a nested mapping ({"training": {"lr": 0.1}}) or flat keys ({"training.lr": 0.1})."""
        return cls().with_overrides(_flatten(values))

    def with_overrides(self, overrides: Mapping[str, Any]) -> "ExperimentConfig":
        """A new config with `{"section.field": value}` changes applied and validated."""
        known = {k.key: k for k in knobs()}
        sections = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1)
                fix = f"did you mean {close[0]!r}?" if close else "see `workbench run --help` for every key"
                raise ValueError(f"unknown config key {key!r} ({fix})")
            section, _, name = key.rpartition(".")
            (sections[section] if section else top)[name] = known[key].check(value)
        changed = {name: dataclasses.replace(getattr(self, name), **vals)
                   for name, vals in sections.items() if vals}
        return dataclasses.replace(self, **top, **changed)

    @classmethod
    def from_file(cls, path: str | Path) -> "ExperimentConfig":
        """Load a YAML (.yaml/.yml) or JSON (.json) file of nested sections or flat keys."""
        return cls().with_overrides(read_config_file(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat `{"section.field": value}` pairs of a YAML or JSON config file (not yet validated)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"config file {str(path)!r} cannot be read: {err.strerror} (check the path)") from err
    is_json = path.suffix.lower() == ".json"
    try:
        if is_json:
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as err:  # json.JSONDecodeError or yaml.YAMLError: both mean a malformed file
        kind = "JSON" if is_json else "YAML"
        raise ValueError(f"config file {str(path)!r} is not valid {kind}: {err}") from err
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values, "
                         f"got {with_article(type(values).__name__)}")
    return _flatten(values)


_SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "partition": PartitionConfig,
    "federation": FederationConfig, "training": TrainingConfig, "strategy": StrategyConfig,
    "attack": AttackConfig, "privacy": PrivacyConfig, "execution": ExecutionConfig, "evaluation": EvaluationConfig, "checkpoint": CheckpointConfig,
}

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_REGISTRIES = {"model": registry.MODELS, "dataset": registry.DATASETS}


def _knob_of(prefix: str, f: dataclasses.Field, owner: type) -> Knob:
    annotation = f.type if isinstance(f.type, str) else f.type.__name__
    meta = f.metadata
    choices = meta["choices"]
    if meta["registry"]:  # the built-ins, then what users registered in this session
        registered = _REGISTRIES[meta["registry"]].names()
        choices = tuple(choices) + tuple(n for n in registered if n not in choices)
    return Knob(
        key=f"{prefix}.{f.name}" if prefix else f.name,
        type=_TYPES[annotation],
        default=f.default,
        help=meta["help"],
        choices=choices,
        min=meta["min"],
        max=meta["max"],
        min_exclusive=meta["min_exclusive"],
        hint=meta["hint"],
        max_exclusive=meta["max_exclusive"],
        used_by=meta["used_by"],
        registry=meta["registry"],
    )


def knobs() -> list[Knob]:
    """Every public config key, in display order."""
    result = []
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in _SECTIONS:
            section = _SECTIONS[f.name]
            result += [_knob_of(f.name, sf, section) for sf in dataclasses.fields(section)]
        else:
            result.append(_knob_of("", f, ExperimentConfig))
    return result


def parse_override(text: str, flag: str = "--set", *, form: str = "KEY=VALUE",
                   example: str = "training.lr=0.05") -> tuple[str, str]:
    """Split a `KEY=VALUE` argument; the error names `flag`, the option the user typed it after
    (`--grid` passes its own form and example: `KEY=V1,V2`, `training.lr=0.01,0.1`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{flag} expects {form}, got {text!r} (for example {flag} {example})")
    return key.strip(), value.strip()


def _get(config: ExperimentConfig, key: str) -> Any:
    obj: Any = config
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, full))
        else:
            flat[full] = value
    return flat
