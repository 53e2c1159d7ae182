"""A name-to-factory map shared by datasets, models, attacks and objectives."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fortify.errors import ConfigError, UnknownNameError, shortened

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Maps names to factories; raises on duplicates and lists valid names on a miss."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(factory: F) -> F:
            self.add(name, factory)
            return factory

        return decorator

    def add(self, name: str, factory: F) -> None:
        if name in self._factories:
            raise ConfigError(f"{self.kind} {name!r} is already registered")
        self._factories[name] = factory

    def get(self, name: str) -> F:
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {shortened(repr(name))}; valid names: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
