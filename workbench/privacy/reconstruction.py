"""Reconstruction attacks on one client update: what an honest-but-curious server sees (`ServerView`), the
labels it reads off the update (`infer_labels`), and the inputs it recovers by matching the update with a
dummy dataset's (`reconstruct`: DLG, iDLG and Geiping et al.'s "Inverting Gradients")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from workbench.client import (LocalObjective, clip_update, momentum_buffer, num_local_steps, step_direction,
                              train_locally)
from workbench.tasks import training_loss

#: The attacks `reconstruct` runs, by name.
ATTACKS = ("dlg", "idlg", "geiping")
#: Iterations each attack runs when `num_iterations` is None: L-BFGS iterations (dlg, idlg) or Adam steps
#: (geiping). Chosen so that digits (1, 8, 8) at batch 1 takes well under 2 s on a 2-core CPU for logreg and
#: mlp (tests/test_reconstruction.py's docstring has the measured times); the papers run far longer (DLG:
#: 300 L-BFGS steps of 20 iterations; Geiping et al.: 4,800-24,000 Adam steps).
DEFAULT_ITERATIONS = {"dlg": 200, "idlg": 100, "geiping": 400}
#: Geiping et al.'s total-variation weight on [0, 1] images (their CIFAR-10 setting, `inversefed` configs).
DEFAULT_TV_WEIGHT = 1e-4
#: Geiping et al.'s Adam step size and its decay: x0.1 at 3/8, 5/8 and 7/8 of the iterations.
GEIPING_LR = 0.1
GEIPING_MILESTONES = (3 / 8, 5 / 8, 7 / 8)


@dataclass(frozen=True)
class ServerView:
    """What an honest-but-curious server knows about one client's round: the global model it sent, the
    update it received (under a defense: what it sees instead, `workbench.privacy.views`), the client's
    sample count (FedAvg weights by it) and the training settings; never the client's data."""

    #: the architecture (scratch: attacks evaluate it functionally at other weights, never train it)
    model: nn.Module
    #: the model the client started from
    global_state: dict[str, Tensor]
    #: the model the server received (or, under a defense, what it sees)
    update_state: dict[str, Tensor]
    #: the client's sample count
    num_samples: int
    #: lr, batch_size, momentum, weight_decay, task: the training settings
    objective: LocalObjective
    num_epochs: int
    input_shape: tuple[int, ...]
    num_classes: int
    #: the data format's known value range (images [0, 1]); None = unbounded (standardized features)
    input_range: tuple[float, float] | None
    #: behind secure aggregation (`views.cohort_view`): the sample count of each client whose updates were
    #: averaged (the server knows them: FedAvg weights by them), in the order of the dummy samples; empty =
    #: one client. `num_samples` is their sum.
    client_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered: one input and one label per sample of the client."""

    inputs: Tensor          # (num_samples, *input_shape)
    labels: Tensor          # (num_samples,) int64
    attack: str
    num_iterations: int     # optimizer iterations actually run
    loss: float             # the final matching loss (L2 for dlg/idlg, 1 - cosine (+ TV) for geiping)


def view_from_training(model: nn.Module, global_state: Mapping[str, Tensor], x: Tensor, y: Tensor,
                       objective: LocalObjective, num_epochs: int, generator: torch.Generator, *,
                       input_range: tuple[float, float] | None = None,
                       num_classes: int | None = None) -> ServerView:
    """Run the real client code (`workbench.client.train_locally`, then the client's own clip when
    `objective.clip_norm` > 0, as `client.finish_update` does) on (x, y) from `global_state` and return what
    the server receives. `num_classes` defaults to the model's output width; `input_range` is what the
    server knows of the data format (None: nothing)."""
    if not isinstance(x, Tensor) or x.ndim < 2 or len(x) == 0:
        raise ValueError(f"view_from_training: x must be a tensor of shape (num_samples >= 1, *input_shape), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, Tensor) or y.shape[:1] != x.shape[:1]:
        raise ValueError(f"view_from_training: y must be a tensor with one label per sample of x ({len(x)}), got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if not isinstance(num_epochs, int) or num_epochs < 1:
        raise ValueError(f"view_from_training: num_epochs must be an int >= 1, got {num_epochs!r}")
    _check_range(input_range)
    global_state = {k: v.detach().clone() for k, v in global_state.items()}
    state, _ = train_locally(model, global_state, x, y, objective, num_epochs=num_epochs, generator=generator)
    if objective.clip_norm:
        state = clip_update(global_state, state, objective.clip_norm)
    if num_classes is None:
        with torch.no_grad():
            model.load_state_dict(global_state)
            num_classes = int(model(x[:1]).shape[-1])
    return ServerView(model=model, global_state=global_state, update_state=state, num_samples=len(x),
                      objective=objective, num_epochs=num_epochs, input_shape=tuple(x.shape[1:]),
                      num_classes=num_classes, input_range=input_range)


# ----- the observed update and the attacker's simulation of local training -----


def _params(view: ServerView, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # float64 throughout the attack: matching losses reach 1e-10 and below, where float32 stalls L-BFGS
    return {name: state[name].detach().double() for name, _ in view.model.named_parameters()}


def _buffers(view: ServerView) -> dict[str, Tensor]:
    return {name: view.global_state[name] for name, _ in view.model.named_buffers() if name in view.global_state}


def _client_sizes(view: ServerView) -> tuple[int, ...]:
    return view.client_sizes or (view.num_samples,)


def is_single_step(view: ServerView) -> bool:
    """Whether every client behind the view took exactly one local step: then the update is one gradient."""
    return all(num_local_steps(n, view.num_epochs, view.objective.batch_size) == 1 for n in _client_sizes(view))


def observed_direction(view: ServerView) -> dict[str, Tensor]:
    """What the attack matches, from the update alone: -(update - global) / lr per parameter (float64).

    For one local step (Geiping et al. 2020, Sec. 5: this IS gradient matching) it is the mini-batch
    gradient: -delta / lr = g + weight_decay * w_global (momentum does not act on a first step, the proximal
    term is zero there), so weight decay's known share is subtracted. For several steps it is the sum of
    the step directions, matched against the attacker's unrolled simulation (`simulated_direction`)."""
    start, end = _params(view, view.global_state), _params(view, view.update_state)
    lr, wd = view.objective.lr, view.objective.weight_decay
    direction = {k: -(end[k] - start[k]) / lr for k in start}
    if is_single_step(view) and wd:
        direction = {k: d - wd * start[k] for k, d in direction.items()}
    return direction


def simulated_direction(view: ServerView, x: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """The attacker's counterpart of `observed_direction` on a dummy dataset (x, targets), differentiable
    with respect to both: targets are int64 labels or per-sample class probabilities (DLG's soft labels;
    `training_loss`'s cross-entropy takes both).

    One step: the gradient of the loss at the global weights. Several steps: local SGD unrolled with
    `torch.func.functional_call` (Geiping et al. 2020, Sec. 5, the "fedavg" setting) with the known schedule
    (`client.step_direction`, `client.momentum_buffer`: the client's own update rule); the real batch order
    is a secret shuffle, so the simulation visits the dummy samples in index order every epoch. Behind
    secure aggregation (`view.client_sizes`) each client's consecutive block of dummy samples is trained from
    the global model and the results averaged with weights n_k, as FedAvg does."""
    # the global weights are leaves of the graph: the gradient of the loss with respect to them is the
    # dummy gradient, and create_graph keeps it differentiable with respect to the dummy inputs
    start = {k: v.requires_grad_(True) for k, v in _params(view, view.global_state).items()}
    buffers = _buffers(view)
    objective, task = view.objective, view.objective.task
    names = list(start)
    sizes = _client_sizes(view)
    total = {k: torch.zeros_like(v) for k, v in start.items()}
    offset = 0
    for size in sizes:
        xs, ts = x[offset:offset + size], targets[offset:offset + size]
        offset += size
        if num_local_steps(size, view.num_epochs, objective.batch_size) == 1:
            loss = training_loss(task, functional_call(view.model, {**start, **buffers}, (xs,)), ts)
            grads = torch.autograd.grad(loss, [start[k] for k in names], create_graph=True)
            client = dict(zip(names, grads))
        else:
            client = _unrolled(view, start, buffers, xs, ts)
        for k in names:
            total[k] = total[k] + client[k] * (size / view.num_samples)
    return total


def _unrolled(view: ServerView, start: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
              targets: Tensor) -> dict[str, Tensor]:
    objective = view.objective
    names = list(start)
    params = list(start.values())
    moments: list[Tensor | None] = [None] * len(params)
    current = params
    for _ in range(view.num_epochs):
        for first in range(0, len(x), objective.batch_size):
            batch = slice(first, first + objective.batch_size)
            outputs = functional_call(view.model, {**dict(zip(names, current)), **buffers}, (x[batch],))
            loss = training_loss(objective.task, outputs, targets[batch])
            grads = torch.autograd.grad(loss, current, create_graph=True)
            nxt = []
            for i, (param, grad, anchor) in enumerate(zip(current, grads, params)):
                moments[i] = momentum_buffer(moments[i], step_direction(grad, param, anchor, None, objective),
                                             objective.momentum)
                nxt.append(param - objective.lr * moments[i])
            current = nxt
    return {k: -(end - begin) / objective.lr for k, end, begin in zip(names, current, params)}


# ----- labels read off the update -----


def _output_layer(view: ServerView) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in view.model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == view.num_classes]
    if not found:
        raise ValueError(f"infer_labels: the model ({type(view.model).__name__}) has no nn.Linear layer with "
                         f"num_classes={view.num_classes} outputs, which label inference reads the update of "
                         f"(pass labels to reconstruct(..., labels=...) instead)")
    return found[-1]


def _effective_steps(view: ServerView, size: int) -> float:
    # sum over the K steps of how often step j's direction enters the displacement under momentum beta:
    # sum_j (1 - beta^(K - j + 1)) / (1 - beta) = K without momentum
    steps, beta = num_local_steps(size, view.num_epochs, view.objective.batch_size), view.objective.momentum
    if not beta:
        return float(steps)
    return sum((1 - beta ** (steps - j)) / (1 - beta) for j in range(steps))


def label_signal(view: ServerView) -> tuple[Tensor, bool]:
    """(s, has_bias): s estimates mean_i (p_i - y_i) over the samples (p the softmax, y one-hot), read off
    the output layer's total change, and has_bias says whether it came from the output bias.

    With a bias b: s = -(Delta b + lr * S * wd * b_global) / (lr * S), where S is the effective number of
    steps (`num_local_steps` without momentum; with momentum beta, sum_j (1 - beta^(K-j+1)) / (1 - beta)):
    every step moves b by lr times the mean of (p - y) over its batch, and each sample's batch mean weighs
    it by 1 / batch size, which is num_steps / num_samples on average (exact for one step). Weight decay's
    share is approximated at the global bias. Without a bias: the row sums of the last weight's change in
    the same units, (p_c - y_c) * sum_j h_j, whose sign is the bias rule's when the penultimate activations
    h are non-negative (after a ReLU; for logreg on non-negative inputs)."""
    name, layer = _output_layer(view)
    key = f"{name}.bias" if layer.bias is not None else f"{name}.weight"
    start, end = view.global_state[key].double(), view.update_state[key].double()
    lr, wd = view.objective.lr, view.objective.weight_decay
    steps = sum(_effective_steps(view, n) * n for n in _client_sizes(view)) / view.num_samples
    signal = -((end - start) + lr * steps * wd * start) / (lr * steps)
    if layer.bias is None:
        signal = signal.sum(dim=1)
    return signal, layer.bias is not None


def infer_labels(view: ServerView, reference_inputs: Tensor | None = None) -> Tensor:
    """The client's labels, read off the update (int64, (num_samples,), sorted by class).

    One sample: iDLG's rule (Zhao, Mopuri & Bilen 2020, Sec. 3): the true class is the only negative entry
    of the output bias's gradient (p_c - 1 < 0, every other p_j > 0), here the smallest entry of
    `label_signal`; for a model without an output bias, the row of the last weight's gradient with the
    smallest (negative) sum, which is the true class when the penultimate activations are non-negative
    (every model of the zoo has an output bias: the bias rule is the one used for logreg, mlp,
    tabular_mlp and cnn).

    Several samples: counts per class from the output bias's total change, the estimator of Wainakh et al.
    2022 ("User-level label leakage from gradients in federated learning", LLG) and of Geiping et al.'s
    fedavg experiments: mean_i (p_i - y_i) = s (`label_signal`), so count_c = n * (mean_i p_ic - s_c), with
    mean_i p_i estimated by the global model's softmax on `reference_inputs` (an auxiliary set the attacker
    holds) or, without, on the one input at the middle of `input_range` (0 when unbounded). Without a bias
    the row sums are divided by sum_j h_j of the same reference inputs. Negative estimates count 0; the
    counts are scaled to sum to n and rounded by largest remainder."""
    if view.objective.task != "classification":
        raise ValueError(f"infer_labels: objective.task must be 'classification' (labels are classes), got "
                         f"{view.objective.task!r}")
    signal, has_bias = label_signal(view)
    n = view.num_samples
    if n == 1:
        return signal.argmin().reshape(1).to(torch.int64)
    if reference_inputs is None:
        middle = 0.0 if view.input_range is None else (view.input_range[0] + view.input_range[1]) / 2
        reference_inputs = torch.full((1, *view.input_shape), middle)
    _, layer = _output_layer(view)
    captured: list[Tensor] = []
    hook = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        with torch.no_grad():
            outputs = functional_call(view.model, {**_params(view, view.global_state), **_buffers(view)},
                                      (reference_inputs.double(),))
    finally:
        hook.remove()
    mean_p = torch.softmax(outputs, dim=1).mean(0)
    if not has_bias:
        signal = signal / captured[0].sum(dim=1).mean().clamp_min(1e-12)
    estimate = (n * (mean_p - signal)).clamp_min(0.0).numpy()
    return torch.from_numpy(np.repeat(np.arange(view.num_classes), largest_remainder(estimate, n)))


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers summing to `total`, proportional to `weights` (>= 0): the floor of each share,
    then one more for the largest fractional parts (Hamilton's method; ties to the lower index)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    shares = weights / weights.sum() * total
    counts = np.floor(shares).astype(np.int64)
    order = np.argsort(-(shares - counts), kind="stable")
    counts[order[:total - counts.sum()]] += 1
    return counts


# ----- the attacks -----


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation of images (B, C, H, W) as Geiping et al. 2020 (Eq. 4, `inversefed`):
    mean |x[h, w+1] - x[h, w]| + mean |x[h+1, w] - x[h, w]|."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def l2_distance(dummy: Mapping[str, Tensor], observed: Mapping[str, Tensor]) -> Tensor:
    """DLG's matching loss (Zhu et al. 2019, Eq. 4): sum over parameters of ||dummy - observed||^2."""
    return sum(((dummy[k] - observed[k]) ** 2).sum() for k in observed)


def cosine_distance(dummy: Mapping[str, Tensor], observed: Mapping[str, Tensor]) -> Tensor:
    """Geiping et al. 2020 (Eq. 4): 1 - <dummy, observed> / (||dummy|| ||observed||), over every parameter
    together (one vector, not layer by layer)."""
    dot = sum((dummy[k] * observed[k]).sum() for k in observed)
    dummy_norm = torch.sqrt(sum((dummy[k] ** 2).sum() for k in observed))
    observed_norm = math.sqrt(float(sum((observed[k] ** 2).sum() for k in observed)))
    return 1 - dot / (dummy_norm * observed_norm + 1e-30)


def initial_inputs(view: ServerView, generator: torch.Generator) -> Tensor:
    """The dummy inputs every attack starts from, float64: uniform in `input_range`, standard normal when
    unbounded, drawn from `generator`."""
    shape = (view.num_samples, *view.input_shape)
    if view.input_range is None:
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    low, high = view.input_range
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def reconstruct(view: ServerView, attack: str = "idlg", *, num_iterations: int | None = None,
                generator: torch.Generator, tv_weight: float = DEFAULT_TV_WEIGHT,
                labels: Tensor | None = None, reference_inputs: Tensor | None = None) -> Reconstruction:
    """Recover the client's inputs and labels from `view` alone.

    - `dlg` (Zhu, Liu & Han, NeurIPS 2019, Algorithm 1): dummy inputs and dummy label logits (soft labels
      = their softmax) optimized jointly with L-BFGS on `l2_distance`; the labels are the soft labels'
      argmax.
    - `idlg` (Zhao, Mopuri & Bilen 2020): the labels read off the update first (`infer_labels`), then the
      inputs alone optimized with L-BFGS on `l2_distance`.
    - `geiping` (Geiping, Bauermeister, Droege & Moeller, NeurIPS 2020): `cosine_distance` + `tv_weight` *
      `total_variation` (images only: inputs of shape (C, H, W)), Adam on the sign of the inputs' gradient,
      lr 0.1 decayed x0.1 at 3/8, 5/8, 7/8 of the iterations, the inputs projected onto `input_range` after
      every step. The paper assumes the labels known; here they are read off the update (`infer_labels`).

    What is matched is `observed_direction` against `simulated_direction`: the gradient for one local
    step, the unrolled local SGD for several (Geiping et al. Sec. 5). L-BFGS runs unconstrained (a box would
    break its curvature pairs); its result is clamped to `input_range` once at the end. `labels` overrides
    the label inference (an attacker that knows them); `reference_inputs` feeds it (`infer_labels`).
    Deterministic on CPU given `generator`."""
    _check_view(view)
    if attack not in ATTACKS:
        raise ValueError(f"reconstruct: attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    if num_iterations is None:
        num_iterations = DEFAULT_ITERATIONS[attack]
    if not isinstance(num_iterations, int) or isinstance(num_iterations, bool) or num_iterations < 1:
        raise ValueError(f"reconstruct: num_iterations must be an int >= 1, got {num_iterations!r} "
                         f"(None = the attack's default, {DEFAULT_ITERATIONS[attack]})")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"reconstruct: generator must be a torch.Generator, got {type(generator).__name__} "
                        f"(torch.Generator().manual_seed(0))")
    if not tv_weight >= 0:
        raise ValueError(f"reconstruct: tv_weight must be >= 0, got {tv_weight!r} (0 = no TV prior)")
    observed = observed_direction(view)
    x = initial_inputs(view, generator).requires_grad_(True)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(labels) != view.num_samples:
            raise ValueError(f"reconstruct: labels must hold one label per sample ({view.num_samples}), got "
                             f"{len(labels)}")
    if attack == "dlg":
        label_logits = torch.randn(view.num_samples, view.num_classes, generator=generator,
                                   dtype=torch.float64).requires_grad_(True)
        loss, steps = _lbfgs(lambda: l2_distance(simulated_direction(view, x, label_logits.softmax(1)), observed),
                             [x, label_logits], num_iterations)
        found = label_logits.detach().argmax(1) if labels is None else labels
        return Reconstruction(_boxed(x.detach(), view), found, attack, steps, loss)
    found = infer_labels(view, reference_inputs) if labels is None else labels
    if attack == "idlg":
        loss, steps = _lbfgs(lambda: l2_distance(simulated_direction(view, x, found), observed), [x], num_iterations)
        return Reconstruction(_boxed(x.detach(), view), found, attack, steps, loss)
    is_image = len(view.input_shape) == 3
    loss = _geiping(view, x, found, observed, num_iterations, tv_weight if is_image else 0.0)
    return Reconstruction(x.detach(), found, attack, num_iterations, loss)


def _lbfgs(matching_loss, variables: list[Tensor], num_iterations: int) -> tuple[float, int]:
    optimizer = torch.optim.LBFGS(variables, lr=1.0, max_iter=num_iterations, max_eval=2 * num_iterations,
                                  tolerance_grad=1e-14, tolerance_change=1e-16, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = matching_loss()
        loss.backward()
        return loss

    optimizer.step(closure)
    final = float(matching_loss().detach())  # the loss at the last iterate (it needs autograd: no no_grad)
    return final, int(optimizer.state[variables[0]].get("n_iter", 0))


def _geiping(view: ServerView, x: Tensor, labels: Tensor, observed: Mapping[str, Tensor], num_iterations: int,
             tv_weight: float) -> float:
    optimizer = torch.optim.Adam([x], lr=GEIPING_LR)
    milestones = [int(num_iterations * m) for m in GEIPING_MILESTONES]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    loss = torch.zeros(())
    for _ in range(num_iterations):
        optimizer.zero_grad()
        loss = cosine_distance(simulated_direction(view, x, labels), observed)
        if tv_weight:
            loss = loss + tv_weight * total_variation(x)
        loss.backward()
        x.grad.sign_()  # Geiping et al. Sec. 4: Adam on the signed gradient, as in adversarial attacks
        optimizer.step()
        scheduler.step()
        if view.input_range is not None:
            with torch.no_grad():
                x.clamp_(*view.input_range)
    return float(loss.detach())


def _boxed(x: Tensor, view: ServerView) -> Tensor:
    return x if view.input_range is None else x.clamp(*view.input_range)


def _check_range(input_range: tuple[float, float] | None) -> None:
    if input_range is None:
        return
    if len(input_range) != 2 or not input_range[0] < input_range[1]:
        raise ValueError(f"input_range must be (low, high) with low < high, or None (unbounded), got "
                         f"{input_range!r} (images in [0, 1]: (0.0, 1.0))")


def _check_view(view: ServerView) -> None:
    if not isinstance(view, ServerView):
        raise TypeError(f"reconstruct: view must be a ServerView (view_from_training builds one), got "
                        f"{type(view).__name__}")
    if view.objective.task != "classification":
        raise ValueError(f"reconstruct: objective.task must be 'classification', got {view.objective.task!r} "
                         f"(the attacks here match cross-entropy updates of class labels)")
    if view.objective.control_variates:
        raise ValueError("reconstruct: objective.control_variates=True (SCAFFOLD) is not supported: the server "
                         "does not know the client's own variate c_i, so it cannot simulate the local steps")
    if view.num_samples < 1:
        raise ValueError(f"reconstruct: view.num_samples must be >= 1, got {view.num_samples}")
    if view.client_sizes and sum(view.client_sizes) != view.num_samples:
        raise ValueError(f"reconstruct: view.client_sizes {view.client_sizes} must sum to view.num_samples "
                         f"({view.num_samples})")
    _check_range(view.input_range)


def reconstruct_with_restarts(view: ServerView, attack: str = "idlg", *, num_restarts: int,
                              generator: torch.Generator, **options) -> Reconstruction:
    """The best of `num_restarts` `reconstruct` runs, each from the next draw of `generator`, by the lowest
    matching loss: a number the attacker can compute, not the quality it cannot know (Geiping et al. 2020,
    Sec. 4, restart their attack the same way). L-BFGS on a ReLU network can stall where units switch off
    (iDLG on tabular_mlp does, on some rows); another start escapes it."""
    if not isinstance(num_restarts, int) or num_restarts < 1:
        raise ValueError(f"reconstruct_with_restarts: num_restarts must be an int >= 1, got {num_restarts!r}")
    runs = [reconstruct(view, attack, generator=generator, **options) for _ in range(num_restarts)]
    return min(runs, key=lambda run: run.loss)
