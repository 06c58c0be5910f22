"""The model zoo, by name, with input shapes taken from the dataset: the built-ins (linear models and MLPs
for vectors and tabular records, CNNs for images, 1-D CNNs and recurrent models for sequences) and the
models users register (`register_model`), in one registry (`workbench.registry.MODELS`)."""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import nn

from workbench import registry
from workbench.registry import Entry


class LinearModel(nn.Module):
    """One linear layer from the flattened input to the outputs (`linear`): linear regression for a
    regression (one output, trained on squared error), multinomial logistic regression for a classification
    (one logit per class, the softmax in the cross-entropy). Task-neutral by name; for a classification it is
    the same layer as `logreg`, with the same weights for the same seed."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class LogisticRegression(LinearModel):
    """Multinomial logistic regression (`logreg`): one linear layer on the flattened input (softmax in the
    loss). The classification name of `linear`, kept as a class of its own so that logreg runs go on
    recording `model.class = workbench.models:LogisticRegression`."""


class MLP(nn.Module):
    """The "2NN" of McMahan et al. 2017, §3: two hidden layers of 200 ReLU units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 200):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TabularMLP(MLP):
    """An MLP sized for tabular records of 10-30 features (diabetes, breast_cancer, wine), `tabular_mlp`:
    the 2NN's shape with two hidden layers of 64 ReLU units instead of 200. A size chosen here, not taken
    from a paper: the 2NN's 200-200 was sized for MNIST's 784 pixels and 60,000 images; on 30 features it
    has 46,802 weights for a few hundred records shared by a handful of clients, 64-64 has 6,274 (2 classes).
    A Linear/ReLU chain like the 2NN, so the fused kernel trains it (`LINEAR_CHAINS`)."""

    HIDDEN = 64

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__(input_shape, num_outputs, hidden=self.HIDDEN)


class CNN(nn.Module):
    """The CNN of McMahan et al. 2017, §3: two 5x5 convolutions (32, 64 channels) each followed by 2x2
    max pooling, a 512-unit ReLU layer and a softmax output; 1,663,370 parameters on 28x28 inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ----- sequences: samples of shape (time steps, channels), or (time steps,) for one channel -----


def sequence_layout(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(time steps, channels) of a sample of shape (T, C), or (T,) = T steps of one channel: the layout of
    every sequence model of the zoo (batches (B, T, C), as `batch_first` recurrent layers read them)."""
    steps, channels = (input_shape[0], 1) if len(input_shape) == 1 else input_shape
    return int(steps), int(channels)


def as_sequences(x: torch.Tensor) -> torch.Tensor:
    """A batch of sequences as (B, T, C): a (B, T) batch is T steps of one channel."""
    return x.unsqueeze(-1) if x.ndim == 2 else x


def gru_last_state(x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: torch.Tensor,
                   bias_hh: torch.Tensor) -> torch.Tensor:
    """The last hidden state h_T (B, H) of one GRU layer (Cho et al. 2014) over x (B, T, C) from h_0 = 0,
    with torch.nn.GRU's parameters and equations (gates r, z, n stacked in that order):
        r = sigmoid(W_ir x_t + b_ir + W_hr h + b_hr),  z = sigmoid(W_iz x_t + b_iz + W_hz h + b_hz),
        n = tanh(W_in x_t + b_in + r * (W_hn h + b_hn)),  h <- (1 - z) * n + z * h.

    Written with plain tensor operations rather than torch's fused RNN kernels so that `torch.func.vmap`
    batches it over clients (the vectorized executor) on every device: torch lacks batching rules for its
    RNN operators (under vmap, torch 2.14's nn.LSTM on CPU falls back to a loop over clients through
    aten::mkldnn_rnn_layer; nn.GRU fails outright in other set-ups, pytorch/pytorch#134606). Every step's
    input projection is one matrix product over the whole sequence."""
    gates_x = torch.nn.functional.linear(x, weight_ih, bias_ih)
    h = x.new_zeros(x.shape[0], weight_hh.shape[1])
    for t in range(x.shape[1]):
        x_r, x_z, x_n = gates_x[:, t].chunk(3, 1)
        h_r, h_z, h_n = torch.nn.functional.linear(h, weight_hh, bias_hh).chunk(3, 1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = n + z * (h - n)
    return h


def lstm_last_state(x: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: torch.Tensor,
                    bias_hh: torch.Tensor) -> torch.Tensor:
    """The last hidden state h_T (B, H) of one LSTM layer (Hochreiter & Schmidhuber 1997, with the forget
    gate of Gers et al. 2000) over x (B, T, C) from h_0 = c_0 = 0, with torch.nn.LSTM's parameters and
    equations (gates i, f, g, o stacked in that order):
        i, f, o = sigmoid(W_i* x_t + b_i* + W_h* h + b_h*),  g = tanh(W_ig x_t + b_ig + W_hg h + b_hg),
        c <- f * c + i * g,  h <- o * tanh(c).
    Plain tensor operations for the same reason as `gru_last_state`."""
    gates_x = torch.nn.functional.linear(x, weight_ih, bias_ih)
    h = x.new_zeros(x.shape[0], weight_hh.shape[1])
    c = h
    for t in range(x.shape[1]):
        i, f, g, o = (gates_x[:, t] + torch.nn.functional.linear(h, weight_hh, bias_hh)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return h


class GRUNet(nn.Module):
    """A one-layer GRU of 64 units over (B, T, C) sequences (or (B, T): one channel), read from its last
    hidden state by a linear layer (`gru`): one logit per class, or one value for a regression.

    MNIST-1D's own GRU baseline (Greydanus 2020, "Scaling down deep learning", GRUBase in the mnist1d
    repository) is bidirectional with 6 units and reads all 40 outputs; reading only the last state, as a
    sequence model that does not depend on the length, needs a state that carries the whole signal to the
    end, hence 64 units: 13,514 parameters for 10 classes on one channel, a quarter of the 2NN's 50,410 on
    the same 40 inputs (what every round sends). `rnn` is a torch.nn.GRU that holds the parameters (its
    names and layout: the state dict loads into an nn.GRU); the forward pass is `gru_last_state`, equal to
    nn.GRU's to rounding (tests/test_task_models.py)."""

    HIDDEN = 64

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        _, channels = sequence_layout(input_shape)
        self.rnn = nn.GRU(channels, self.HIDDEN, batch_first=True)
        self.head = nn.Linear(self.HIDDEN, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rnn = self.rnn
        return self.head(gru_last_state(as_sequences(x), rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0,
                                        rnn.bias_hh_l0))


class LSTMNet(nn.Module):
    """`lstm`: as `gru` (`GRUNet`), with a one-layer LSTM of 64 units (`lstm_last_state`; `rnn` is a
    torch.nn.LSTM holding the parameters); 17,802 parameters for 10 classes on one channel."""

    HIDDEN = 64

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        _, channels = sequence_layout(input_shape)
        self.rnn = nn.LSTM(channels, self.HIDDEN, batch_first=True)
        self.head = nn.Linear(self.HIDDEN, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rnn = self.rnn
        return self.head(lstm_last_state(as_sequences(x), rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0,
                                         rnn.bias_hh_l0))


def conv1d_length(steps: int, kernel: int, stride: int, padding: int) -> int:
    """The output length of a 1-D convolution over `steps` steps (torch.nn.Conv1d, dilation 1)."""
    return (steps + 2 * padding - kernel) // stride + 1


class CNN1D(nn.Module):
    """MNIST-1D's CNN baseline (Greydanus 2020, "Scaling down deep learning", ConvBase in the mnist1d
    repository), `cnn1d`: three 1-D convolutions of 25 channels (kernels 5, 3, 3; stride 2; padding 1), each
    followed by ReLU, and a linear layer on the flattened features; 5,210 parameters on 40 steps of one
    channel and 10 classes, as in the paper.

    Inputs are sequences laid out as the recurrent models read them, (B, T, C), or (B, T) for one channel
    (MNIST-1D as the data module gives it, (B, 40), and as sequences, (B, 40, 1), are the same input);
    they are transposed to torch's (B, C, T) for the convolutions. At least 3 steps."""

    CHANNELS = 25
    LAYERS = ((5, 2, 1), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding)

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        steps, channels = sequence_layout(input_shape)
        layers: list[nn.Module] = []
        for kernel, stride, padding in self.LAYERS:
            layers += [nn.Conv1d(channels, self.CHANNELS, kernel, stride=stride, padding=padding), nn.ReLU()]
            channels, steps = self.CHANNELS, conv1d_length(steps, kernel, stride, padding)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(self.CHANNELS * steps, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(as_sequences(x).transpose(1, 2)).flatten(1))


#: Every model by name: the built-ins below and what `register_model` adds (the registry `config`'s
#: `model.name` knob accepts names from; `module:Name` paths resolve by import). Every factory is called as
#: factory(input_shape, num_outputs): one output per class, or one for a regression (`Dataset.num_outputs`).
MODELS = registry.MODELS
BUILTIN_MODELS = {"logreg": LogisticRegression, "mlp": MLP, "cnn": CNN, "linear": LinearModel,
                  "tabular_mlp": TabularMLP, "cnn1d": CNN1D, "gru": GRUNet, "lstm": LSTMNet}
for _name, _factory in BUILTIN_MODELS.items():
    MODELS.register(_name, _factory, builtin=True)

#: The zoo's classes whose forward pass is flatten -> linear (-> ReLU -> linear)*, with their linear layers
#: registered in forward order: the ones the fused kernel trains (`workbench.execution.kernels.linear_chain`).
#: Exact classes, not subclasses: a subclass may change the forward pass.
LINEAR_CHAINS = (LinearModel, LogisticRegression, MLP, TabularMLP)
#: The built-ins that read sequences (`sequence_layout`), with the fewest time steps each takes.
SEQUENCE_MODELS = {"cnn1d": 3, "gru": 1, "lstm": 1}

_SIGNATURE_RULE = "a model factory is called as factory(input_shape, num_classes) and returns a torch.nn.Module"


def register_model(name: str, factory: Callable[..., nn.Module]) -> Entry:
    """Make `model.name=<name>` build `factory(input_shape, num_classes)`: a `torch.nn.Module` class whose
    constructor takes those two arguments, or any callable that returns a module (wrap a class with other
    arguments: `register_model("tiny", lambda input_shape, num_classes: Tiny(hidden=8))`).

    Registering a name again replaces it (a notebook cell run twice). Built-in names cannot be replaced.
    Weights are re-initialised from the run's seed whatever the factory does, like the built-ins'.
    A class defined in a notebook trains with every executor; to rebuild it later in another session
    (`load_model`), register it again there or define it in an importable module.
    """
    if isinstance(name, str) and name in BUILTIN_MODELS and factory is not BUILTIN_MODELS[name]:
        raise ValueError(f"register_model({name!r}, ...): {name!r} is a built-in model of workbench "
                         f"({', '.join(BUILTIN_MODELS)}); register yours under another name")
    if isinstance(factory, nn.Module):
        raise TypeError(f"register_model({name!r}, ...) needs a class or a factory that builds a fresh model, "
                        f"got a {type(factory).__name__} instance (pass the class: "
                        f"register_model({name!r}, {type(factory).__name__}))")
    _check_signature(name, factory)
    return MODELS.register(name, factory)


def _check_signature(name: object, factory: object) -> None:
    if not callable(factory):
        return  # the registry refuses it with its own message
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check before the first call
        return
    try:
        signature.bind((1,), 2)
    except TypeError as err:
        label = getattr(factory, "__name__", type(factory).__name__)
        fix = ("give it those two parameters: lambda input_shape, num_classes: ..." if label == "<lambda>" else
               f"wrap it: register_model({name!r}, lambda input_shape, num_classes: {label}(...))")
        raise TypeError(f"register_model({name!r}, {label}): {label}{signature} cannot be called as "
                        f"{label}(input_shape, num_classes) ({err}); {_SIGNATURE_RULE} ({fix})") from err


def describe_model(name: str, model: nn.Module | None = None) -> dict[str, str]:
    """Where the model called `name` comes from, for a run's record (MLflow params):
    `model.source` (the registry's origin: "workbench", "module <path>", "defined in __main__ (a notebook
    or script)", "lambda in <module>") and `model.import_path` (`module:Name` that another process can
    import; empty when there is none); with `model`, also `model.class`, the `module:Name` of the class
    actually trained (a hand-built `Federation` may hold another model than its config names)."""
    entry = MODELS.resolve(name)
    described = {"model.source": entry.origin, "model.import_path": entry.import_path or ""}
    if model is not None:
        described["model.class"] = f"{type(model).__module__}:{type(model).__qualname__}"
    return described


def check_model_fits(name: str, input_shape: tuple[int, ...]) -> None:
    """Reject a model that cannot take this input, naming the field and what would work."""
    shape = tuple(input_shape)
    if name == "cnn" and (len(shape) != 3 or min(shape[1:]) < 4):
        raise ValueError(
            f"model.name='cnn' needs images (channels x height x width, at least 4x4), but the dataset's "
            f"samples have shape {shape} (use model.name=logreg or mlp; cnn1d, gru or lstm for sequences such "
            "as mnist1d; or an image dataset: digits, fashion_mnist, mnist, cifar10)"
        )
    if name in SEQUENCE_MODELS and (len(shape) not in (1, 2) or shape[0] < SEQUENCE_MODELS[name]):
        raise ValueError(
            f"model.name={name!r} needs sequences: samples of shape (time steps,) or (time steps, channels), "
            f"at least {SEQUENCE_MODELS[name]} steps, but the dataset's samples have shape {shape} (use a "
            "sequence dataset such as mnist1d, or model.name=cnn for images; logreg and mlp take any shape)"
        )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator) -> nn.Module:
    """A freshly initialised model: a registered name (built-in or `register_model`) or a `module:Name`
    path, built as factory(input_shape, num_classes) where `num_classes` is the outputs per sample (the
    dataset's `num_outputs`: one per class, 1 for a regression); `generator` makes the initial weights
    reproducible."""
    entry = MODELS.resolve(name)
    check_model_fits(name, input_shape)
    input_shape = tuple(input_shape)
    label = getattr(entry.factory, "__name__", type(entry.factory).__name__)
    try:
        model = entry.factory(input_shape, num_classes)
    except TypeError as err:
        raise TypeError(f"model.name={name!r}: {label}({input_shape}, {num_classes}) failed ({err}); "
                        f"{_SIGNATURE_RULE}") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"model.name={name!r}: {label}({input_shape}, {num_classes}) returned "
                        f"{type(model).__name__}, not a torch.nn.Module ({_SIGNATURE_RULE})")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"model.name={name!r}: {label}({input_shape}, {num_classes}) built a "
                         f"{type(model).__name__} without parameters: there is nothing to train (give it layers)")
    # nn.init draws from the global generator; re-draw every tensor from ours instead.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                fan_in = math.prod(param.shape[1:])
                bound = 1.0 / math.sqrt(fan_in)
                param.uniform_(-bound, bound, generator=generator)
            else:
                param.uniform_(-0.01, 0.01, generator=generator)
    return model
