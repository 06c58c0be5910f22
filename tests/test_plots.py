"""Partition figures: pure functions that return a Figure drawing exactly the numbers they were given."""

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from workbench.config import PartitionConfig
from workbench.partition import count_matrix, partition, summarize
from workbench.plots import (client_label_bars, client_size_histogram, compare_partitions, feature_skew_preview,
                             heterogeneity_curve, partition_heatmap, partition_overview, to_png,
                             update_overview)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def counts():
    labels = np.random.default_rng(0).integers(0, 10, 6000)
    parts = partition(labels, 40, PartitionConfig(scheme="dirichlet", alpha=0.3), np.random.default_rng(0))
    return count_matrix(labels, parts, 10)


def test_heatmap_shows_the_counts_clients_across(counts):
    figure = partition_heatmap(counts)
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    assert np.array_equal(ax.images[0].get_array(), counts.T)
    assert ax.get_xlabel() == "client (40)" and ax.get_ylabel() == "class"
    assert to_png(figure).startswith(PNG)


def test_label_bars_stack_every_class_to_the_client_size(counts):
    figure = client_label_bars(counts, max_clients=25)
    ax = figure.axes[0]
    layers = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(layers) == 10
    outline = layers[-1].get_paths()[0].vertices  # the top class's layer: its upper edge is each size
    sizes = counts.sum(axis=1)
    for k in range(25):  # client k's bar spans k - 0.5 .. k + 0.5 at the height of its size
        for edge in (k - 0.5, k + 0.5):
            assert sizes[k] in outline[np.isclose(outline[:, 0], edge), 1]
    assert outline[:, 1].max() == sizes[:25].max()
    assert ax.get_xlabel() == "client (first 25 of 40)"
    shares = client_label_bars(counts, normalize=True).axes[0]
    top = [c for c in shares.collections if isinstance(c, PolyCollection)][-1].get_paths()[0].vertices[:, 1]
    assert top.max() == pytest.approx(1.0)


def test_size_histogram_counts_every_client(counts):
    figure = client_size_histogram(counts.sum(axis=1), bins=7)
    (steps,) = figure.axes[0].patches
    heights, edges = steps.get_data()[:2]
    assert len(heights) == 7 and sum(heights) == 40
    assert edges[0] == counts.sum(axis=1).min() and edges[-1] == counts.sum(axis=1).max()


def test_overview_has_heatmap_bars_and_sizes(counts):
    figure = partition_overview(counts, title="dirichlet")
    titles = [ax.get_title() for ax in figure.axes]
    assert {"client x class samples", "labels per client", "client sizes"} <= set(titles)
    assert figure._suptitle.get_text() == "dirichlet"
    assert to_png(figure).startswith(PNG)


def test_compare_draws_each_partition_in_its_own_panel(counts):
    figure = compare_partitions({"a": counts, "b": counts[:5], "c": counts, "d": counts})
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b", "c", "d"]
    assert len(figure.axes) == 6  # a 2 x 3 grid, the last two hidden
    assert len(figure.legends[0].get_texts()) == 10


def test_heterogeneity_curve_plots_each_metric_against_the_parameter():
    labels = np.random.default_rng(1).integers(0, 10, 5000)
    alphas = [0.05, 0.5, 5.0]
    summaries = [summarize(labels, partition(labels, 20, PartitionConfig(scheme="dirichlet", alpha=a),
                                             np.random.default_rng(0)), 10) for a in alphas]
    figure = heterogeneity_curve(alphas, summaries, ("label_tv_mean", "size_gini"))
    assert len(figure.axes) == 2 and figure.axes[0].get_xscale() == "log"
    x, y = figure.axes[0].lines[0].get_data()
    assert list(x) == alphas and list(y) == [s["label_tv_mean"] for s in summaries]


def test_feature_skew_preview_draws_images_and_vectors():
    images = feature_skew_preview(np.random.default_rng(0).random((3, 1, 8, 8)), ["c0", "c1", "c2"])
    assert len(images.axes) == 3 and all(len(ax.images) == 1 for ax in images.axes)
    vectors = feature_skew_preview(np.zeros((2, 40)), ["c0", "c1"], title="noise")
    assert all(len(ax.lines) == 1 for ax in vectors.axes)
    assert [ax.get_title() for ax in vectors.axes] == ["c0", "c1"]


def test_redrawing_an_overview_in_place_gives_the_same_picture_as_a_new_one(counts):
    labels = np.random.default_rng(2).integers(0, 10, 3000)
    other = count_matrix(labels, partition(labels, 25, PartitionConfig(scheme="quantity"), np.random.default_rng(1)), 10)
    figure = partition_overview(counts, title="first")
    redrawn = update_overview(figure, other, title="second", max_clients=20)
    assert redrawn is figure
    assert to_png(redrawn) == to_png(partition_overview(other, title="second", max_clients=20))
    assert np.array_equal(redrawn.axes[0].images[0].get_array(), other.T)
    fewer_classes = update_overview(figure, other[:, :4])
    assert fewer_classes is not figure and fewer_classes.axes[0].images[0].get_array().shape == (4, 25)
