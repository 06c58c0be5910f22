"""fl-workbench: federated-learning experiments from Jupyter, recorded in MLflow.

`workbench.register_model` (and the other names below) are imported on first use, so that `import
workbench.config` stays free of torch."""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_EXPORTS = {
    "register_model": "workbench.models",
    "register_dataset": "workbench.data",
    "describe_dataset": "workbench.data",
    "dataset_from_arrays": "workbench.data",
    "Dataset": "workbench.data",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
