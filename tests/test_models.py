import pytest
import torch

from workbench.models import build_model


@pytest.mark.parametrize("name, shape", [("logreg", (60,)), ("mlp", (40,)), ("mlp", (1, 28, 28)),
                                         ("cnn", (1, 28, 28)), ("cnn", (1, 8, 8)), ("cnn", (3, 32, 32))])
def test_models_take_their_input_shape(name, shape):
    model = build_model(name, shape, 10, torch.Generator().manual_seed(0))
    assert model(torch.randn(5, *shape)).shape == (5, 10)


def test_paper_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    g = torch.Generator().manual_seed(0)
    assert count(build_model("cnn", (1, 28, 28), 10, g)) == 1_663_370  # McMahan et al. 2017
    assert count(build_model("mlp", (1, 28, 28), 10, g)) == 199_210  # "2NN"


def test_initialisation_is_reproducible():
    a = build_model("mlp", (20,), 3, torch.Generator().manual_seed(1))
    b = build_model("mlp", (20,), 3, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_cnn_on_vectors_is_rejected_with_a_fix():
    with pytest.raises(ValueError, match="model.name='cnn' needs images.*use model.name=logreg or mlp"):
        build_model("cnn", (60,), 10, torch.Generator())
