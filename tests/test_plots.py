"""Figures: pure functions that return a Figure drawing exactly the numbers they were given, titled with
what they show, with text that a projector can show (no label over another, nothing cut off)."""

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from workbench.config import ExperimentConfig, PartitionConfig
from workbench.partition import count_matrix, partition, summarize
from workbench.plots import (client_label_bars, client_size_histogram, compare_partitions, comparison_figure,
                             feature_skew_preview, format_number, heterogeneity_curve, learning_curves, live_view,
                             partition_heatmap, partition_overview, partition_title, study_grid, to_png,
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


# ----- figures a teacher can project: what they show, and text that does not collide -----


def _texts(figure):
    """(name, window extent) of every text a reader sees: titles, axis labels, and the tick labels within
    each axis' view, after a real draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    found = []
    if figure._suptitle is not None and figure._suptitle.get_text():
        found.append(("suptitle", figure._suptitle.get_window_extent(renderer)))
    for i, ax in enumerate(a for a in figure.axes if a.get_visible()):
        for name, text in (("title", ax.title), ("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)):
            if text.get_text():
                found.append((f"axes {i} {name}", text.get_window_extent(renderer)))
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                if tick.label1.get_visible() and tick.label1.get_text() and low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    found.append((f"axes {i} {axis.axis_name}tick {tick.label1.get_text()}",
                                  tick.label1.get_window_extent(renderer)))
    return found


def _collisions(figure):
    import itertools

    found = _texts(figure)
    overlapping = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(found, 2) if box_a.overlaps(box_b)]
    outside = [a for a, box in found if box.x0 < 0 or box.y0 < 0 or box.x1 > figure.bbox.x1 or box.y1 > figure.bbox.y1]
    return overlapping, outside


def _visible_ticks(ax, axis_name):
    axis = getattr(ax, f"{axis_name}axis")
    low, high = sorted(axis.get_view_interval())
    return [t for t in axis.get_major_ticks() if low - 1e-9 <= t.get_loc() <= high + 1e-9]


def _counts(num_clients, num_samples, scheme="dirichlet", seed=0):
    labels = np.random.default_rng(seed).integers(0, 10, num_samples)
    parts = partition(labels, num_clients, PartitionConfig(scheme=scheme, alpha=0.3), np.random.default_rng(seed))
    return count_matrix(labels, parts, 10)


@pytest.mark.parametrize("num_clients, num_samples, scheme", [
    (1, 60_000, "iid"),         # one client of 60,000: wide tick labels beside the axis labels
    (2, 600_000, "dirichlet"),  # six-digit counts
    (3, 1_797, "quantity"),     # three clients: the ticks must be whole clients
    (10, 60_000, "iid"),        # every client the same size: a histogram of one value
    (100, 60_000, "dirichlet"),
    (1000, 60_000, "dirichlet"),
])
def test_overview_text_never_collides_and_stays_in_the_picture(num_clients, num_samples, scheme):
    figure = partition_overview(_counts(num_clients, num_samples, scheme),
                                title="digits · dirichlet(alpha=0.3) · 100 clients · seed 0")
    overlapping, outside = _collisions(figure)
    assert overlapping == [] and outside == []
    for ax in figure.axes[:3]:  # each axis label clear of (below / left of) its own tick labels
        renderer = figure.canvas.get_renderer()
        xlabel, ylabel = ax.xaxis.label.get_window_extent(renderer), ax.yaxis.label.get_window_extent(renderer)
        assert all(xlabel.y1 <= t.label1.get_window_extent(renderer).y0 for t in _visible_ticks(ax, "x"))
        assert all(ylabel.x1 <= t.label1.get_window_extent(renderer).x0 for t in _visible_ticks(ax, "y"))


def test_overview_ticks_count_whole_clients_and_samples_without_offsets():
    figure = partition_overview(_counts(3, 1_797, "quantity"))
    _texts(figure)  # draws it: tick labels exist after a draw
    heat, bars, sizes, colorbar = figure.axes
    for ax, axis in ((heat, "x"), (bars, "x"), (bars, "y"), (sizes, "x"), (sizes, "y"), (colorbar, "y")):
        locs = [t.get_loc() for t in _visible_ticks(ax, axis)]
        assert locs and all(float(loc).is_integer() for loc in locs), (ax.get_title(), axis, locs)
    assert [t.label1.get_text() for t in _visible_ticks(heat, "x")] == ["0", "1", "2"]
    assert [t.label1.get_text() for t in _visible_ticks(sizes, "y")] == ["0", "1"]  # three clients, each alone

    equal = partition_overview(np.full((10, 10), 600))  # 10 clients of 6,000
    _texts(equal)
    sizes = equal.axes[2]
    assert [t.label1.get_text() for t in _visible_ticks(sizes, "x")] == ["6,000"]
    assert sizes.xaxis.get_offset_text().get_text() == ""
    (steps,) = sizes.patches
    assert list(steps.get_data()[0]) == [10]  # one bin, centred on the one size
    huge = partition_overview(np.full((2, 10), 30_000))  # 300,000 per client: in thousands, one unit per axis
    _texts(huge)
    bar_labels = [t.label1.get_text() for t in _visible_ticks(huge.axes[1], "y")]
    assert bar_labels[0] == "0" and all(label.endswith("k") for label in bar_labels[1:])
    assert [int(label[:-1]) * 1000 for label in bar_labels[1:]] == [t.get_loc() for t in _visible_ticks(huge.axes[1], "y")][1:]
    close = partition_overview(np.array([[60_000] + [0] * 9, [59_999] + [0] * 9]))
    _texts(close)
    labels = [t.label1.get_text() for t in _visible_ticks(close.axes[2], "x")]
    assert len(set(labels)) == len(labels) and "60,000" in labels  # 59,999 and 60,000 not both "60k"


def test_partition_title_names_dataset_scheme_knobs_clients_and_seed():
    base = ExperimentConfig().with_overrides({"data.name": "digits", "federation.num_clients": 20})
    dirichlet = base.with_overrides({"partition.scheme": "dirichlet", "partition.alpha": 0.1})
    assert partition_title(dirichlet) == "digits · dirichlet(alpha=0.1) · 20 clients · seed 0"
    assert partition_title(dirichlet, dataset="my_digits", num_clients=1) == \
        "my_digits · dirichlet(alpha=0.1) · 1 client · seed 0"
    lognormal = base.with_overrides({"partition.scheme": "quantity", "partition.quantity_distribution": "lognormal",
                                     "partition.quantity_sigma": 2.0, "seed": 3})
    assert partition_title(lognormal) == \
        "digits · quantity(quantity_distribution=lognormal, quantity_sigma=2) · 20 clients · seed 3"
    mixture = base.with_overrides({"partition.scheme": "mixture", "partition.mixture_skew": "shards",
                                   "partition.min_size": 5})
    assert partition_title(mixture) == ("digits · mixture(iid_fraction=0.5, mixture_skew=shards, "
                                        "shards_per_client=2, min_size=5) · 20 clients · seed 0")
    assert partition_title(base.with_overrides({"partition.scheme": "iid"})) == "digits · iid · 20 clients · seed 0"
    synthetic = ExperimentConfig().with_overrides({"data.alpha": 0.5, "data.beta": 0.0,
                                                   "partition.scheme": "natural"})
    assert partition_title(synthetic) == "synthetic(alpha=0.5, beta=0) · natural · 30 clients · seed 0"
    many = base.with_overrides({"federation.num_clients": 10_000, "partition.scheme": "iid"})
    assert "10,000 clients" in partition_title(many)


def test_format_number_writes_counts_as_integers_with_separators():
    assert format_number(60_000.0) == "60,000" and format_number(1_438) == "1,438" and format_number(3.0) == "3"
    assert format_number(8571.428) == "8,571.4"
    assert format_number(0.412345) == "0.4123" and format_number(-0.05) == "-0.05"
    assert format_number(float("nan")) == "nan"


def test_comparison_dots_show_the_difference_the_bars_hid():
    curves = {"lr=0.01": ([1, 2, 3], [0.30, 0.45, 0.51], [0.01, 0.02, 0.01]),
              "lr=0.1": ([1, 2, 3], [0.32, 0.50, 0.56], [0.02, 0.01, 0.01])}
    figure = comparison_figure(curves, {"lr=0.01": (0.51, 0.01, 3), "lr=0.1": (0.56, 0.01, 3)}, target=0.5,
                               title="digits · dirichlet(alpha=0.1) · 20 clients")
    curve_ax, final_ax = figure.axes
    # the learning curves stay: one mean line per group, with its rounds
    assert [tuple(line.get_ydata()) for line in curve_ax.lines[:2]] == [(0.30, 0.45, 0.51), (0.32, 0.50, 0.56)]
    # the final values: dots at the means, bars of +-std, on an axis spanning the data (0.50..0.57) plus 15 %
    assert not final_ax.patches  # no bars from 0
    dots = [line for line in final_ax.lines if line.get_marker() == "o"]
    assert [(float(d.get_xdata()[0]), float(d.get_ydata()[0])) for d in dots] == [(0.51, 0), (0.56, 1)]
    low, high = final_ax.get_xlim()
    assert low == pytest.approx(0.50 - 0.15 * 0.07) and high == pytest.approx(0.57 + 0.15 * 0.07)
    assert (0.56 - 0.51) / (high - low) > 0.5  # the gap fills half the axis (0.08 of it from 0 to 0.6)
    assert "axis does not start at 0" in final_ax.get_xlabel()
    spans = [segment[:, 0] for c in final_ax.collections for segment in c.get_segments()]
    assert sorted((round(s.min(), 6), round(s.max(), 6)) for s in spans) == [(0.5, 0.52), (0.55, 0.57)]
    assert [t.get_text() for t in final_ax.get_yticklabels()] == ["lr=0.01\n0.51 ± 0.01 (n = 3)",
                                                                  "lr=0.1\n0.56 ± 0.01 (n = 3)"]
    assert figure._suptitle.get_text() == "digits · dirichlet(alpha=0.1) · 20 clients"
    assert _collisions(figure) == ([], [])


def test_comparison_says_n_1_instead_of_drawing_a_zero_spread():
    curves = {"a": ([1, 2], [0.2, 0.3], [0.0, 0.0]), "b": ([1, 2], [0.1, 0.9], [0.05, 0.1])}
    figure = comparison_figure(curves, {"a": (0.3, 0.0, 1), "b": (0.9, 0.1, 4)})
    final_ax = figure.axes[1]
    labels = [t.get_text() for t in final_ax.get_yticklabels()]
    assert labels == ["a\n0.3 (n = 1)", "b\n0.9 ± 0.1 (n = 4)"]
    spans = [segment[:, 0] for c in final_ax.collections for segment in c.get_segments()]
    assert [(round(s.min(), 6), round(s.max(), 6)) for s in spans] == [(0.8, 1.0)]  # b's bar only
    low, high = final_ax.get_xlim()
    assert low == pytest.approx(0.3 - 0.15 * 0.7) and high == pytest.approx(1.0 + 0.15 * 0.7)
    # a range that holds 0 says nothing about it; a NaN spread (unknown) draws no bar either
    around_zero = comparison_figure(curves, {"a": (-0.2, float("nan")), "b": (0.4, 0.1)}).axes[1]
    assert around_zero.get_xlabel() == "final test accuracy"
    assert around_zero.get_xlim()[0] < 0 < around_zero.get_xlim()[1]
    assert [t.get_text() for t in around_zero.get_yticklabels()] == ["a\n-0.2", "b\n0.4 ± 0.1"]


def _figure_calls():
    counts = _counts(20, 2000)
    points = [(1, 0.5), (2, 0.6)]
    return {
        "learning_curves": lambda title: learning_curves({"run": {"test_accuracy": points}}, ["test_accuracy"],
                                                         title=title),
        "live_view": lambda title: live_view({"test_accuracy": points}, [(1, [0.4, 0.6])], 5, title=title),
        "study_grid": lambda title: study_grid({("IID", "0% stragglers"): {"FedAvg": points}}, title=title),
        "comparison_figure": lambda title: comparison_figure({"g": ([1, 2], [0.5, 0.6], [0.0, 0.0])},
                                                             {"g": (0.6, 0.0, 1)}, title=title),
        "partition_overview": lambda title: partition_overview(counts, title=title),
        "compare_partitions": lambda title: compare_partitions({"a": counts, "b": counts}, title=title),
        "heterogeneity_curve": lambda title: heterogeneity_curve(
            [0.1, 1.0], [{"label_tv_mean": 0.5}, {"label_tv_mean": 0.2}], ["label_tv_mean"], title=title),
        "feature_skew_preview": lambda title: feature_skew_preview(np.zeros((2, 1, 8, 8)), ["c0", "c1"],
                                                                   title=title),
    }


@pytest.mark.parametrize("name", list(_figure_calls()))
def test_every_figure_carries_the_title_its_caller_gives(name):
    title = "digits · dirichlet(alpha=0.1) · 20 clients · seed 0"
    figure = _figure_calls()[name](title)
    # wrapped to the figure's width where one line would not fit (a single narrow panel), never cut
    assert figure._suptitle is not None and figure._suptitle.get_text().replace("\n", " ") == title
    assert ("\n" in figure._suptitle.get_text()) == (figure.get_figwidth() < 0.1 * len(title))
    assert _collisions(figure) == ([], [])


def test_every_public_figure_function_takes_a_title():
    import inspect

    from workbench import plots

    makers = [name for name, f in inspect.getmembers(plots, inspect.isfunction)
              if f.__module__ == plots.__name__ and not name.startswith("_")
              and inspect.signature(f).return_annotation in (Figure, "Figure")]
    assert {"learning_curves", "comparison_figure", "partition_overview", "partition_heatmap"} <= set(makers)
    assert [name for name in makers if "title" not in inspect.signature(getattr(plots, name)).parameters] == []
    single = {"partition_heatmap": partition_heatmap(np.ones((3, 2)), title="client x class samples\nx"),
              "client_label_bars": client_label_bars(np.ones((3, 2)), title="labels per client\nx"),
              "client_size_histogram": client_size_histogram(np.array([1, 2, 3]), title="client sizes\nx")}
    assert {name: f.axes[0].get_title() for name, f in single.items()} == {
        "partition_heatmap": "client x class samples\nx", "client_label_bars": "labels per client\nx",
        "client_size_histogram": "client sizes\nx"}


def test_a_two_line_preview_title_fits_even_over_two_clients():
    title = "training sample 0 as each client sees it\ndigits · rotation(max_rotation=90) · 20 clients · seed 0"
    figure = feature_skew_preview(np.random.default_rng(0).random((2, 1, 8, 8)), ["client 0", "client 1"],
                                  title=title)
    assert _collisions(figure) == ([], [])
    vectors = feature_skew_preview(np.zeros((3, 40)), ["c0", "c1", "c2"], title="noise")
    assert _collisions(vectors) == ([], []) and all(not ax.get_xticks().size for ax in vectors.axes)
