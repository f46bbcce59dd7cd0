"""Name -> constructor registries, filled by decorators next to each definition."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from aikd.errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from user-facing names to objects, with helpful lookup errors."""

    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, key: str | None = None) -> T:
        """The object registered as ``name``; a ConfigError naming the config key (default
        ``config_key``), a close match and the choices when there is none."""
        if name not in self._items:
            raise ConfigError(
                f"Unknown {self.kind} '{name}' (config key '{key or self.config_key}')."
                f"{did_you_mean(name, self._items)} Available: {', '.join(self.names())}."
            )
        return self._items[name]

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plugin registered for a while, such as a test's method)."""
        del self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
