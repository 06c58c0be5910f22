import torch
import torch.nn.functional as F

from workbench.client import proximal_gradient, proximal_penalty, train_locally
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
    state, _ = train_locally(model, global_state, x, y, num_epochs=3, batch_size=5, lr=lr, mu=mu,
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
    state, loss = train_locally(model, global_state, x, y, num_epochs=1, batch_size=50, lr=0.3, mu=0.0,
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
                  batch_size=4, lr=0.5, mu=1.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(global_state[k], snapshot[k]) for k in snapshot)
