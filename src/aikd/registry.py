"""Name -> constructor registries, filled by decorators next to each definition."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from aikd.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from user-facing names to objects, with helpful lookup errors."""

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._items: dict[str, T] = {}
        self._on_remove: dict[str, Callable[[], None]] = {}
        self._fill: Callable[[], None] | None = None  # registers the shipped entries, on the first lookup

    def fill_with(self, fill: Callable[[], None]) -> None:
        """Run ``fill`` (an import that registers the shipped entries) before the first lookup, not before: a
        command that looks nothing up (``aikd --help``) never pays for importing them."""
        self._fill = fill

    def _filled(self) -> dict[str, T]:
        fill, self._fill = self._fill, None
        if fill is not None:
            fill()
        return self._items

    def register(self, name: str, on_remove: Callable[[], None] | None = None) -> Callable[[T], T]:
        """Decorator registering its object as ``name``; ``on_remove`` runs when :meth:`remove` forgets it
        (to forget what was registered beside it elsewhere, such as a method's config schema)."""

        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            if on_remove is not None:
                self._on_remove[name] = on_remove
            return obj

        return decorator

    def get(self, name: str, key: str | None = None) -> T:
        """The object registered as ``name``; a ConfigError naming the config key (default
        ``config_key``), a close match and the choices when there is none."""
        items = self._filled()
        if name not in items:
            raise ConfigError(
                f"Unknown {self.kind} '{name}' (config key '{key or self.config_key}')."
                f"{did_you_mean(name, items)} Available: {', '.join(self.names())}."
            )
        return items[name]

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plugin registered for a while, such as a test's method)."""
        del self._items[name]
        hook = self._on_remove.pop(name, None)
        if hook is not None:
            hook()

    def names(self) -> list[str]:
        return sorted(self._filled())

    def __contains__(self, name: object) -> bool:
        return name in self._filled()


# The hyper-parameter dataclass of every registered method, by method name: the schema of the config section
# named after the method. Filled by aikd.methods.base.register_method beside the method registry itself, so
# that aikd.config validates method sections without importing any method (the aikd package has it import
# the shipped ones at its first lookup).
METHOD_CONFIGS: Registry[type[Any]] = Registry("method", "method")
