"""Names that users register their own models and datasets under, and where each one came from: the one
place `config` validation, the model zoo, the data loaders, the panel and the run's record look them up."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Entry:
    """A registered factory: its name, the callable, and a human-readable origin for the run's record."""

    name: str
    factory: Callable[..., Any]
    #: "workbench" for the built-ins, "module <path>" for an importable definition, or
    #: "defined in __main__ (a notebook or script)" for one that only its own session can rebuild
    origin: str

    @property
    def is_importable(self) -> bool:
        """Whether another process (a worker, a later `load_model`) can import the factory by name."""
        return self.origin.startswith(("workbench", "module "))

    @property
    def import_path(self) -> str | None:
        """`module:qualname` of an importable factory, else None."""
        module = getattr(self.factory, "__module__", None)
        qualname = getattr(self.factory, "__qualname__", None)
        if not self.is_importable or module is None or qualname is None or "<" in qualname:
            return None
        return f"{module}:{qualname}"


def origin_of(factory: Callable[..., Any]) -> str:
    """Where `factory` is defined, as a run's record says it."""
    module = getattr(factory, "__module__", None) or "?"
    if module == "__main__" or module not in sys.modules or "<lambda>" in getattr(factory, "__qualname__", ""):
        return "defined in __main__ (a notebook or script)" if module == "__main__" else f"lambda in {module}"
    return "workbench" if module.startswith("workbench.") else f"module {module}"


def import_factory(path: str, kind: str, key: str) -> Callable[..., Any]:
    """The object at `module.path:attribute` (attribute may be dotted), or ValueError naming `key`."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{key}={path!r}: write a module path as 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{key}={path!r}: module {module_name!r} cannot be imported ({err}); is it on "
                         f"PYTHONPATH, or installed?") from err
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{key}={path!r}: module {module_name!r} has no {kind} {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{key}={path!r} is a {type(obj).__name__}, not a {kind} class or factory")
    return obj


class Registry:
    """Registered factories of one kind (`model` or `dataset`) by name; a name of the form
    `module:attribute` resolves by import without registering."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, factory: Callable[..., Any], *, builtin: bool = False) -> Entry:
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without ':' or surrounding "
                             f"spaces, got {name!r}")
        if not callable(factory):
            raise TypeError(f"register_{self.kind}({name!r}, ...) needs a class or a callable, got "
                            f"{type(factory).__name__}")
        entry = Entry(name, factory, "workbench" if builtin else origin_of(factory))
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def resolve(self, name: str) -> Entry:
        """The entry registered as `name`, or the factory a `module:attribute` name imports."""
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            factory = import_factory(name, self.kind, self.key)
            return Entry(name, factory, f"module {name.partition(':')[0]}")
        raise ValueError(f"{self.key}={name!r} is not registered (registered: {', '.join(self._entries) or 'none'}; "
                         f"register yours with workbench.register_{self.kind}({name!r}, ...) or give a module path "
                         f"'package.module:Name')")


MODELS = Registry("model", "model.name")
DATASETS = Registry("dataset", "data.name")
