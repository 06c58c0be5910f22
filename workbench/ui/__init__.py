"""The only package that imports ipywidgets: panels built on the library."""

from workbench.ui.experiment_panel import CompareView, ExperimentPanel
from workbench.ui.leakage_explorer import LeakageExplorer
from workbench.ui.partition_explorer import PartitionExplorer
