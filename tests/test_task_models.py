"""The models for tabular inputs and sequences (linear, tabular_mlp, cnn1d, gru, lstm): shapes for both
tasks, seeded initialisation, their math against independent implementations (numpy, torch.nn.GRU/LSTM),
one SGD step, the fused kernel's reach, and every executor training them alike."""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import max_diff

from workbench.client import LocalObjective, train_locally
from workbench.config import MODELS as CONFIG_MODELS
from workbench.config import ExperimentConfig
from workbench.execution import (LocalTrainer, ProcessExecutor, SequentialExecutor, VectorizedExecutor,
                                 linear_chain, resolve_executor, train_chain_locally, why_not_batchable)
from workbench.models import BUILTIN_MODELS, build_model, check_model_fits
from workbench.simulation import prepare, run, run_round

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_MODELS = ("linear", "tabular_mlp", "cnn1d", "gru", "lstm")
SEQUENCE_MODELS = ("cnn1d", "gru", "lstm")
RNN_PARAMS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def build(name, shape, outputs, seed=0, dtype=torch.float32):
    return build_model(name, shape, outputs, torch.Generator().manual_seed(seed)).to(dtype)


def test_the_config_offers_exactly_the_zoo_s_builtins():
    assert set(CONFIG_MODELS) == set(BUILTIN_MODELS)
    for name in NEW_MODELS:
        assert ExperimentConfig().with_overrides({"model.name": name}).model.name == name


# ----- shapes: classification (B, C), regression (B, 1) -----

SHAPES = [("linear", (10,), 1), ("linear", (30,), 2), ("linear", (1, 6, 5), 7),
          ("tabular_mlp", (10,), 1), ("tabular_mlp", (30,), 2), ("tabular_mlp", (13,), 3),
          ("cnn1d", (40,), 10), ("cnn1d", (40, 1), 10), ("cnn1d", (40, 1), 1), ("cnn1d", (23, 3), 4),
          ("cnn1d", (3,), 2),
          ("gru", (40,), 10), ("gru", (40, 1), 1), ("gru", (11, 3), 4), ("gru", (1,), 2),
          ("lstm", (40,), 10), ("lstm", (40, 1), 1), ("lstm", (11, 3), 4), ("lstm", (1,), 2)]


@pytest.mark.parametrize("name, shape, outputs", SHAPES)
def test_output_shape_follows_the_input_shape_and_the_outputs(name, shape, outputs):
    model = build(name, shape, outputs)
    assert model(torch.randn(5, *shape)).shape == (5, outputs)
    assert model(torch.randn(1, *shape)).shape == (1, outputs)


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_a_batch_of_t_steps_is_one_channel(name):
    """MNIST-1D as the data module gives it, (B, 40), and as sequences, (B, 40, 1), are the same input to
    the same weights, whichever layout the model was built for."""
    x = torch.randn(6, 40)
    for shape in ((40,), (40, 1)):
        model = build(name, shape, 10, seed=3)
        assert torch.equal(model(x), model(x.unsqueeze(-1)))
    assert torch.equal(build(name, (40,), 10, seed=3).state_dict()["head.weight"],
                       build(name, (40, 1), 10, seed=3).state_dict()["head.weight"])


# ----- initialisation: from the generator build_model is given, nothing else -----


@pytest.mark.parametrize("name", NEW_MODELS)
def test_initialisation_comes_from_the_generator_only(name):
    shape = (12, 2) if name in SEQUENCE_MODELS else (12,)
    torch.manual_seed(1)
    a = build(name, shape, 3, seed=5)
    torch.manual_seed(2)  # another global state: must not matter
    b = build(name, shape, 3, seed=5)
    c = build(name, shape, 3, seed=6)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert all(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_linear_is_logreg_for_a_classification():
    linear, logreg = build("linear", (1, 4, 5), 3, seed=9), build("logreg", (1, 4, 5), 3, seed=9)
    assert type(linear).__name__ == "LinearModel" and type(logreg).__name__ == "LogisticRegression"
    assert linear.state_dict().keys() == logreg.state_dict().keys()
    assert all(torch.equal(v, logreg.state_dict()[k]) for k, v in linear.state_dict().items())


# ----- the math, against independent implementations -----


def test_linear_and_tabular_mlp_compute_numpy_s_affine_maps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 13))
    linear = build("linear", (13,), 1, seed=1, dtype=torch.float64)
    w, b = (linear.state_dict()[k].numpy() for k in ("linear.weight", "linear.bias"))
    np.testing.assert_allclose(linear(torch.from_numpy(x)).detach().numpy(), x @ w.T + b, rtol=1e-12)
    mlp = build("tabular_mlp", (13,), 3, seed=2, dtype=torch.float64)
    state = {k: v.numpy() for k, v in mlp.state_dict().items()}
    assert [state[f"layers.{i}.weight"].shape for i in (1, 3, 5)] == [(64, 13), (64, 64), (3, 64)]
    h = np.maximum(x @ state["layers.1.weight"].T + state["layers.1.bias"], 0)
    h = np.maximum(h @ state["layers.3.weight"].T + state["layers.3.bias"], 0)
    np.testing.assert_allclose(mlp(torch.from_numpy(x)).detach().numpy(),
                               h @ state["layers.5.weight"].T + state["layers.5.bias"], rtol=1e-10)


@pytest.mark.parametrize("name, torch_layer", [("gru", torch.nn.GRU), ("lstm", torch.nn.LSTM)])
def test_recurrent_models_equal_torch_s_layers_on_their_last_state(name, torch_layer):
    """The written-out recurrence (vmap-able) against torch's own GRU/LSTM kernel with the same weights,
    on 3 channels and 17 steps; the head reads the last hidden state."""
    model = build(name, (17, 3), 4, seed=4, dtype=torch.float64)
    reference = torch_layer(3, 64, batch_first=True).double()
    reference.load_state_dict({k: model.state_dict()[f"rnn.{k}"] for k in RNN_PARAMS})
    x = torch.randn(5, 17, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs, state = reference(x)
        last = state[0] if name == "lstm" else state
        assert torch.allclose(outputs[:, -1], last[0])
        expected = last[0] @ model.head.weight.T + model.head.bias
        assert torch.allclose(model(x), expected, atol=1e-12, rtol=0)


def test_parameter_counts():
    """GRU/LSTM: gates x (input + hidden + 2 biases) x 64, plus the head; cnn1d: MNIST-1D's ConvBase
    (Greydanus 2020) on 40 steps, 25 channels, 125 flattened features; tabular_mlp 64-64."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    H = 64
    assert count(build("gru", (40,), 10)) == 3 * H * (1 + H + 2) + H * 10 + 10 == 13_514
    assert count(build("lstm", (40, 1), 10)) == 4 * H * (1 + H + 2) + H * 10 + 10 == 17_802
    assert count(build("cnn1d", (40,), 10)) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + 125 * 10 + 10 == 5_210
    assert count(build("tabular_mlp", (30,), 2)) == (30 * H + H) + (H * H + H) + (H * 2 + 2) == 6_274
    assert count(build("linear", (10,), 1)) == 11


def test_cnn1d_reads_time_by_channels():
    """The first convolution of (B, T, C) input, computed by hand with numpy: out[b, o, l] = bias[o] +
    sum over c, k of w[o, c, k] * x[b, 2l + k - 1, c] (stride 2, one step of zero padding)."""
    model = build("cnn1d", (9, 2), 3, seed=7, dtype=torch.float64)
    x = np.random.default_rng(1).normal(size=(4, 9, 2))
    seen = {}
    model.features[0].register_forward_hook(lambda module, inputs, output: seen.update(out=output))
    model(torch.from_numpy(x))
    w, bias = model.features[0].weight.detach().numpy(), model.features[0].bias.detach().numpy()
    padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    length = (9 + 2 - 5) // 2 + 1
    expected = np.empty((4, 25, length))
    for l in range(length):
        window = padded[:, 2 * l:2 * l + 5, :]  # (B, k, C)
        expected[:, :, l] = np.einsum("bkc,ock->bo", window, w) + bias
    np.testing.assert_allclose(seen["out"].detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert model.head.in_features == 25 * 1  # 9 -> 4 -> 2 -> 1 steps


# ----- training -----


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("name", NEW_MODELS)
def test_one_sgd_step_lowers_the_loss_on_a_fixed_batch(name, task):
    shape = (15, 2) if name in SEQUENCE_MODELS else (15,)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, *shape, dtype=torch.float64, generator=gen)
    if task == "classification":
        outputs, y = 3, torch.tensor([0, 1, 2, 2, 1, 0, 0, 0, 1, 2, 2, 2])
        loss_of = lambda out: F.cross_entropy(out, y)  # noqa: E731
    else:
        outputs, y = 1, torch.randn(12, dtype=torch.float64, generator=gen) * 2 + 1
        loss_of = lambda out: F.mse_loss(out.squeeze(1), y)  # noqa: E731
    model = build(name, shape, outputs, seed=1, dtype=torch.float64)
    before = loss_of(model(x))
    grads = torch.autograd.grad(before, list(model.parameters()))
    assert all(float(g.abs().max()) > 0 for g in grads), "every parameter takes part in the forward pass"
    with torch.no_grad():
        for param, g in zip(model.parameters(), grads):
            param -= 0.05 * g
    after = loss_of(model(x))
    assert float(after.detach()) < float(before.detach())


def test_the_fused_kernel_takes_linear_and_tabular_mlp_and_no_sequence_model():
    assert linear_chain(build("linear", (10,), 1)) == ["linear"]
    assert linear_chain(build("tabular_mlp", (10,), 2)) == ["layers.1", "layers.3", "layers.5"]
    for name in SEQUENCE_MODELS:
        model = build(name, (12, 1), 3)
        assert linear_chain(model) is None and not LocalTrainer(model).uses_kernel


@pytest.mark.parametrize("name", ["linear", "tabular_mlp"])
def test_the_fused_kernel_trains_linear_and_tabular_mlp_as_train_locally_does(name):
    """Classification (the kernel's cross-entropy), FedProx term and momentum, float64: to rounding."""
    model = build(name, (13,), 3, seed=2, dtype=torch.float64)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(29, 13, dtype=torch.float64, generator=gen), torch.randint(0, 3, (29,), generator=gen)
    objective = LocalObjective(lr=0.1, batch_size=6, momentum=0.5, proximal_mu=0.3)
    ref, ref_loss = train_locally(model, global_state, x, y, objective, num_epochs=2,
                                  generator=torch.Generator().manual_seed(8))
    out, loss = train_chain_locally(linear_chain(model), global_state, x, y, objective, num_epochs=2,
                                    generator=torch.Generator().manual_seed(8))
    assert max_diff(ref, global_state) > 1e-3 and max_diff(ref, out) < 1e-12
    assert loss == pytest.approx(ref_loss, rel=1e-12)


# ----- executors -----


def sequence_cohort(num_steps=9, channels=2, sizes=(23, 8, 15)):
    """Clients of unequal sizes over sequence data, ragged last batches (batch 6)."""
    from workbench.client import ClientTask

    gen = torch.Generator().manual_seed(11)
    n = sum(sizes)
    x = torch.randn(n, num_steps, channels, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    bounds = np.cumsum((0,) + sizes)
    tasks = [ClientTask(k, torch.arange(int(bounds[k]), int(bounds[k + 1])), 2 - (k == 1), k == 1, 100 + k)
             for k in range(len(sizes))]
    return x, y, tasks


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_vectorized_batches_sequence_models_and_agrees_with_sequential(name):
    """vmap really batches them (no per-client fallback warning) and every client's update equals the
    reference's: float32 to 1e-5, float64 to 1e-10, with momentum and the proximal term."""
    assert why_not_batchable(build(name, (9, 2), 4)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a fallback warning from resolve_executor nor from vmap
        assert resolve_executor("vectorized", build(name, (9, 2), 4)) == "vectorized"
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-10)):
            model = build(name, (9, 2), 4, seed=1, dtype=dtype)
            x, y, tasks = sequence_cohort()
            x = x.to(dtype)
            global_state = {k: v.clone() for k, v in model.state_dict().items()}
            objective = LocalObjective(lr=0.1, batch_size=6, momentum=0.5, proximal_mu=0.2, num_classes=4)
            reference = SequentialExecutor(model).run_cohort(global_state, tasks, x, y, objective)
            updates = VectorizedExecutor(model).run_cohort(global_state, tasks, x, y, objective)
            for ref, upd in zip(reference, updates):
                assert max_diff(ref.state, global_state) > 1e-3  # they really trained
                assert max_diff(ref.state, upd.state) < tolerance
                assert upd.local_train_loss == pytest.approx(ref.local_train_loss, abs=tolerance)


@pytest.fixture(scope="module")
def gru_federation():
    """GRU on MNIST-1D as sequences (B, 40, 1), 40 clients of unequal sizes (Dirichlet 0.5), 3 a round."""
    config = ExperimentConfig().with_overrides({
        "data.name": "mnist1d_seq", "model.name": "gru", "partition.scheme": "dirichlet", "partition.alpha": 0.5,
        "federation.num_clients": 40, "federation.clients_per_round": 3, "federation.rounds": 2,
        "training.local_epochs": 1, "training.batch_size": 25, "training.lr": 0.1, "device": "cpu"})
    return prepare(config)


@pytest.mark.parametrize("name, tolerance", [("processes", 1e-6), ("vectorized", 1e-5)])
def test_one_round_of_gru_matches_sequential(gru_federation, name, tolerance):
    federation = gru_federation
    assert federation.dataset.input_shape == (40, 1)
    sizes = {len(federation.clients[c]) for c in range(len(federation.clients))}
    assert len(sizes) > 1
    states = {}
    for executor in ("sequential", name):
        copied = copy.deepcopy(federation)
        kind = {"sequential": SequentialExecutor, "processes": ProcessExecutor, "vectorized": VectorizedExecutor}
        run_round(copied, kind[executor](copied.model), 1)
        states[executor] = copied.model.state_dict()
    assert max_diff(states["sequential"], federation.model.state_dict()) > 1e-4  # the round changed the model
    assert max_diff(states["sequential"], states[name]) < tolerance


def initial_train_loss(federation) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(federation.model(federation.dataset.x_train), federation.dataset.y_train))


def test_gru_runs_two_rounds_on_mnist1d_sequences(gru_federation):
    federation = copy.deepcopy(gru_federation)
    start = initial_train_loss(federation)
    history = run(federation)
    assert history.status == "FINISHED" and [r.round for r in history.rounds] == [1, 2]
    final = history.final()
    assert 0.0 <= final["test_accuracy"] <= 1.0 and final["train_loss"] < start
    assert federation.execution["executor"] in ("processes", "sequential")  # auto on a CPU


def test_cnn1d_runs_two_rounds_on_mnist1d():
    config = ExperimentConfig().with_overrides({
        "data.name": "mnist1d", "model.name": "cnn1d", "partition.scheme": "iid", "federation.num_clients": 20,
        "federation.clients_per_round": 3, "federation.rounds": 2, "training.local_epochs": 1,
        "training.batch_size": 20, "training.lr": 0.1, "device": "cpu"})
    federation = prepare(config)
    assert federation.dataset.input_shape == (40,)
    start = initial_train_loss(federation)
    history = run(federation)
    assert history.status == "FINISHED" and len(history.rounds) == 2
    assert history.final()["train_loss"] < start


# ----- what does not fit -----


@pytest.mark.parametrize("name, shape", [("gru", (1, 8, 8)), ("lstm", (3, 4, 5)), ("cnn1d", (2,)),
                                         ("cnn1d", (1, 28, 28)), ("gru", (0,))])
def test_a_sequence_model_refuses_other_inputs_with_a_fix(name, shape):
    fewest = 3 if name == "cnn1d" else 1
    with pytest.raises(ValueError, match=rf"model.name='{name}' needs sequences.*at least {fewest} steps.*"
                                         rf"{re.escape(str(shape))}.*mnist1d.*model.name=cnn for images"):
        build_model(name, shape, 10, torch.Generator())
    check_model_fits(name, (40, 1))  # these fit: no error
    check_model_fits(name, (40,))


def test_cnn_on_sequences_points_to_the_sequence_models():
    with pytest.raises(ValueError, match=r"model.name='cnn' needs images.*cnn1d, gru or lstm for sequences"):
        check_model_fits("cnn", (40, 1))

