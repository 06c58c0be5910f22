import torch
import torch.nn.functional as F

from workbench.client import (ClientTask, ClientUpdate, LocalObjective, finish_update, proximal_gradient,
                              proximal_penalty, train_locally)
from workbench.models import build_model


def test_proximal_gradient_is_the_gradient_of_the_penalty():
    torch.manual_seed(0)
    params = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64,
                                                                                       requires_grad=True)]
    anchors = [torch.randn_like(p) for p in params]
    mu = 0.7
    penalty = proximal_penalty(params, anchors, mu)
    expected = 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
    assert torch.allclose(penalty, expected)
    grads = torch.autograd.grad(penalty, params)
    for grad, p, a in zip(grads, params, anchors):
        assert torch.allclose(grad, proximal_gradient(p, a, mu))
    # and against finite differences, so the squared norm (not the norm) is what is penalised
    assert torch.autograd.gradcheck(lambda w: proximal_penalty([w], [anchors[0]], mu), (params[0],))


def test_local_training_with_mu_equals_sgd_on_loss_plus_penalty():
    g = torch.Generator().manual_seed(0)
    model = build_model("mlp", (6,), 3, g).double()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(23, 6, dtype=torch.float64), torch.randint(0, 3, (23,))
    mu, lr = 0.5, 0.1
    state, _ = train_locally(model, global_state, x, y, num_epochs=3, objective=LocalObjective(lr=lr, batch_size=5, proximal_mu=mu),
                             generator=torch.Generator().manual_seed(9))
    # reference: the penalty inside the loss, back-propagated, with the same batch order
    reference = build_model("mlp", (6,), 3, g).double()
    reference.load_state_dict(global_state)
    anchors = [global_state[n] for n, _ in reference.named_parameters()]
    order_gen = torch.Generator().manual_seed(9)
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    for _ in range(3):
        order = torch.randperm(23, generator=order_gen)
        for start in range(0, 23, 5):
            batch = order[start:start + 5]
            loss = F.cross_entropy(reference(x[batch]), y[batch]) + proximal_penalty(
                list(reference.parameters()), anchors, mu)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for name, value in reference.state_dict().items():
        assert torch.allclose(state[name], value, atol=1e-12)


def test_full_batch_one_epoch_is_one_sgd_step():
    g = torch.Generator().manual_seed(1)
    model = build_model("logreg", (8,), 4, g)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(50, 8), torch.randint(0, 4, (50,))
    state, loss = train_locally(model, global_state, x, y, num_epochs=1, objective=LocalObjective(lr=0.3, batch_size=50, proximal_mu=0.0),
                                generator=torch.Generator().manual_seed(0))
    model.load_state_dict(global_state)
    centralized = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(centralized, list(model.parameters()))
    for (name, p), grad in zip(model.named_parameters(), grads):
        assert torch.allclose(state[name], p - 0.3 * grad, atol=1e-6)
    assert abs(loss - centralized.item()) < 1e-6


def test_train_locally_leaves_the_global_state_alone():
    model = build_model("logreg", (5,), 2, torch.Generator().manual_seed(0))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    snapshot = {k: v.clone() for k, v in global_state.items()}
    train_locally(model, global_state, torch.randn(20, 5), torch.randint(0, 2, (20,)), num_epochs=2,
                  objective=LocalObjective(lr=0.5, batch_size=4, proximal_mu=1.0), generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(global_state[k], snapshot[k]) for k in snapshot)


def test_momentum_and_weight_decay_are_torch_sgd_on_loss_plus_penalty():
    """Every term of the local objective at once, against torch.optim.SGD with momentum and weight decay on
    cross-entropy + the proximal penalty + <c - c_i, w> (whose gradient is SCAFFOLD's correction)."""
    g = torch.Generator().manual_seed(3)
    model = build_model("mlp", (6,), 3, g).double()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(17, 6, dtype=torch.float64), torch.randint(0, 3, (17,))
    objective = LocalObjective(lr=0.05, batch_size=4, momentum=0.9, weight_decay=0.01, proximal_mu=0.3,
                               control_variates=True)
    correction = [torch.randn_like(p) * 0.1 for p in model.parameters()]
    state, _ = train_locally(model, global_state, x, y, objective, num_epochs=2,
                             generator=torch.Generator().manual_seed(5), correction=correction)
    reference = build_model("mlp", (6,), 3, g).double()
    reference.load_state_dict(global_state)
    anchors = [global_state[n] for n, _ in reference.named_parameters()]
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    order_gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        order = torch.randperm(17, generator=order_gen)
        for start in range(0, 17, 4):
            batch = order[start:start + 4]
            params = list(reference.parameters())
            loss = (F.cross_entropy(reference(x[batch]), y[batch]) + proximal_penalty(params, anchors, 0.3)
                    + sum((c * p).sum() for c, p in zip(correction, params)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for name, value in reference.state_dict().items():
        assert torch.allclose(state[name], value, atol=1e-12), name
    # and momentum really changes the result
    plain, _ = train_locally(model, global_state, x, y, LocalObjective(lr=0.05, batch_size=4), num_epochs=2,
                             generator=torch.Generator().manual_seed(5))
    assert max(float((plain[k] - state[k]).abs().max()) for k in state) > 1e-3


def test_finish_update_counts_steps_clips_and_returns_the_variate_change():
    global_state = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    trained = {"w": torch.tensor([4.0, 5.0]), "n": torch.tensor(3)}  # update (3, 4): norm 5
    task = ClientTask(7, torch.arange(23), 2, False, 0, payload={"c": {"w": torch.tensor([0.5, -0.5])}},
                      client_state={"c_i": {"w": torch.tensor([0.25, 0.0])}})
    update = ClientUpdate(7, trained, 23, 2, 0.1, False)
    objective = LocalObjective(lr=0.1, batch_size=10, control_variates=True, clip_norm=2.5)
    done = finish_update(update, task, objective, global_state)
    assert done.num_steps == 2 * 3  # ceil(23 / 10) steps per epoch
    assert torch.allclose(done.state["w"], torch.tensor([1.0 + 1.5, 1.0 + 2.0]))  # halved to norm 2.5
    assert torch.equal(done.state["n"], global_state["n"])
    # option II: delta c_i = (x - y_i) / (K lr) - c, from the unclipped update
    expected = torch.tensor([-3.0, -4.0]) / (6 * 0.1) - torch.tensor([0.5, -0.5])
    assert torch.allclose(done.payload["delta_c"]["w"], expected)
    assert torch.allclose(done.client_state["c_i"]["w"], torch.tensor([0.25, 0.0]) + expected)
    # nothing asked, nothing changed but the step count
    plain = finish_update(update, task, LocalObjective(lr=0.1, batch_size=5), global_state)
    assert plain.state is trained and plain.num_steps == 10 and not plain.payload
