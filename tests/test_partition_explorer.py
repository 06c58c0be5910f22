"""The partition explorer, driven through its own widgets as a user would: every change re-partitions and
redraws, infeasible settings show their error, and the picture is the partition a run trains on."""

import re

import numpy as np
import pytest

from workbench.config import ExperimentConfig
from workbench.partition import partition_hash
from workbench.plots import partition_title
from workbench.simulation import prepare
from workbench.ui import PartitionExplorer

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def explorer():
    config = ExperimentConfig().with_overrides({"data.name": "digits", "partition.scheme": "dirichlet",
                                                "partition.alpha": 0.1, "federation.num_clients": 20,
                                                "device": "cpu"})
    return PartitionExplorer(config)


def test_it_shows_the_partition_a_run_of_its_config_trains_on(explorer):
    assert explorer.error == "" and bytes(explorer.figure.value).startswith(PNG)
    assert len(explorer.clients) == 20 and explorer.stats.counts.shape == (20, 10)
    assert explorer.partition_hash == partition_hash(prepare(explorer.config).clients)
    assert explorer.partition_hash[:12] in explorer.status.value
    assert "label_js_mean" in explorer.table.value


def test_each_change_repartitions_and_redraws(explorer):
    skewed, picture = explorer.summary, bytes(explorer.figure.value)
    explorer.controls["partition.alpha"].value = 100.0
    assert explorer.config.partition.alpha == pytest.approx(100.0)
    assert explorer.summary["label_tv_mean"] < skewed["label_tv_mean"] / 3
    assert bytes(explorer.figure.value) != picture and bytes(explorer.figure.value).startswith(PNG)
    assert f"{explorer.summary['label_tv_mean']:.4g}" in explorer.table.value
    explorer.controls["federation.num_clients"].value = 35
    assert len(explorer.clients) == 35 and explorer.summary["num_clients"] == 35
    before = explorer.partition_hash
    explorer.controls["seed"].value = 7
    assert explorer.partition_hash != before
    assert explorer.last_update_s > 0


def test_the_scheme_decides_which_knobs_apply(explorer):
    assert not explorer.controls["partition.alpha"].disabled
    assert explorer.controls["partition.classes_per_client"].disabled
    explorer.controls["partition.scheme"].value = "classes_per_client"
    assert explorer.controls["partition.alpha"].disabled
    assert not explorer.controls["partition.classes_per_client"].disabled
    explorer.controls["partition.classes_per_client"].value = 3
    assert np.all((explorer.stats.counts > 0).sum(axis=1) == 3)
    assert explorer.summary["classes_per_client_mean"] == 3
    explorer.controls["partition.scheme"].value = "mixture"
    assert not explorer.controls["partition.iid_fraction"].disabled
    assert not explorer.controls["partition.alpha"].disabled  # mixture_skew=dirichlet reads alpha


def test_infeasible_settings_show_their_error_and_keep_the_last_partition(explorer):
    shown = explorer.partition_hash
    explorer.controls["partition.min_size"].value = 200
    assert "federation.num_clients=20 x partition.min_size=200" in explorer.error
    assert "partition.min_size=200" in explorer.status.value
    assert explorer.partition_hash == shown and explorer.config.partition.min_size == 1
    explorer.controls["partition.min_size"].value = 30
    assert explorer.error == "" and min(len(c) for c in explorer.clients) >= 30
    explorer.controls["partition.min_size"].value = 70  # 20 clients x 70 <= 1,438 digits: dirichlet copes
    assert explorer.error == ""
    explorer.controls["partition.shards_per_client"].value = 20  # 400 shards of 3 samples: 60 per client
    explorer.controls["partition.scheme"].value = "shards"
    assert "partition.min_size=70 cannot be met" in explorer.error
    assert not explorer.controls["partition.shards_per_client"].disabled  # the knob that fixes it
    explorer.controls["partition.shards_per_client"].value = 10
    assert explorer.error == "" and explorer.config.partition.scheme == "shards"


def test_feature_skews_show_a_preview_and_rotation_refuses_vectors(explorer):
    assert explorer.preview.layout.display == "none"
    explorer.controls["partition.scheme"].value = "rotation"
    assert explorer.preview.layout.display is None and bytes(explorer.preview.value).startswith(PNG)
    assert explorer.summary["label_tv_mean"] < 0.2  # labels stay IID
    explorer.controls["data.name"].value = "synthetic"
    assert "partition.scheme='rotation' rotates images" in explorer.error
    explorer.controls["partition.scheme"].value = "feature_noise"
    assert explorer.error == "" and explorer.config.data.name == "synthetic"
    assert bytes(explorer.preview.value).startswith(PNG)


def test_its_figures_say_which_partition_they_show(explorer):
    assert explorer.overview_figure._suptitle.get_text() == "digits · dirichlet(alpha=0.1) · 20 clients · seed 0"
    assert explorer.overview_figure._suptitle.get_text() == partition_title(explorer.config, num_clients=20)
    assert explorer.preview_figure is None
    explorer.controls["partition.alpha"].value = 100.0
    explorer.controls["federation.num_clients"].value = 35
    assert explorer.overview_figure._suptitle.get_text() == "digits · dirichlet(alpha=100) · 35 clients · seed 0"
    explorer.controls["partition.scheme"].value = "rotation"
    assert explorer.preview_figure._suptitle.get_text() == (
        "training sample 0 as each client sees it\ndigits · rotation(max_rotation=90) · 35 clients · seed 0")
    assert "rotation(max_rotation=90)" in explorer.overview_figure._suptitle.get_text()


def test_counts_show_as_integers_with_thousands_separators(explorer):
    num_samples = len(prepare(explorer.config).dataset.y_train)
    assert num_samples >= 1000  # so that a separator must show
    row = re.search(r"<code>num_samples</code></td><td[^>]*>([^<]*)</td>", explorer.table.value).group(1)
    assert row == f"{num_samples:,}"
    sizes = explorer.stats.sizes
    cells = dict(re.findall(r"<code>(\w+)</code></td><td[^>]*>([^<]*)</td>", explorer.table.value))
    assert cells["num_clients"] == "20" and cells["size_max"] == f"{int(sizes.max()):,}"
    assert not any("e+" in value for value in cells.values())
