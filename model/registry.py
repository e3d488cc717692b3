"""A small name -> object registry used for advantage estimators, policy losses, rewards and engines.

Example:
    >>> ADV = Registry("advantage estimator")
    >>> @ADV.register("mean")
    ... def mean_adv(x):
    ...     return x - x.mean()
    >>> ADV.get("mean") is mean_adv
    True
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; refuses duplicate names and names the known ones on a miss.

    Entries are either objects registered with :meth:`register` or lazy dotted paths
    (``"package.module:attr"``) registered with :meth:`register_lazy`, imported on first use so that
    optional heavy dependencies (vLLM, say) are only imported when chosen.

    Args:
        kind: What the registry holds, used in error messages (e.g. ``"advantage estimator"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``.

        Raises:
            ValueError: if ``name`` is already registered.
        """

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Registers ``obj`` under ``name``; a duplicate name is an error."""
        if name in self._items or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def register_lazy(self, name: str, target: str) -> None:
        """Registers a dotted path ``"pkg.module:attr"`` imported on first :meth:`get`."""
        if name in self._items or name in self._lazy:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._lazy[name] = target

    def get(self, name: str) -> T:
        """Returns the object registered as ``name``.

        Raises:
            KeyError: naming the unknown entry and listing the known names.
        """
        if name in self._items:
            return self._items[name]
        if name in self._lazy:
            obj = import_dotted(self._lazy[name])
            self._items[name] = obj
            del self._lazy[name]
            return obj
        raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}")

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted({*self._items, *self._lazy})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_dotted(path: str) -> Any:
    """Imports ``"pkg.module:attr"`` (or ``"pkg.module.attr"``) and returns the attribute.

    Raises:
        ValueError: if the path is malformed, the module cannot be imported or has no such attribute.
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"expected a dotted path like 'package.module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} from {path!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def check_fields(cls: type, values: Mapping[str, Any], what: str, *, context: str = "", prefix: str = "",
                 known_label: str = "known", error: type[Exception] = ValueError) -> None:
    """Refuses the keys of ``values`` that are not init fields of the dataclass ``cls``, with one message that names
    them and lists the fields: ``unknown {what} {keys}{context}; {known_label}: {fields}``.

    Every config that is built from a mapping (recipe sections, GRPO settings, data and reward specs, built-in
    task options) checks its keys here, so an unknown key reads the same everywhere.

    Example:
        >>> @dataclasses.dataclass
        ... class Opt:
        ...     lr: float = 0.1
        >>> check_fields(Opt, {"lr": 1, "lrr": 2}, "option(s)")
        Traceback (most recent call last):
        ValueError: unknown option(s) lrr; known: lr
    """
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise error(f"unknown {what} {', '.join(prefix + u for u in unknown)}{context}; {known_label}: "
                    f"{', '.join(names)}")
