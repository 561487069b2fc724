"""A registry is a dict plus a decorator, one per kind (quantizers, number formats, writers...)."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from mpq.errors import MpqError, did_you_mean

T = TypeVar("T")


class RegistryError(MpqError):
    exit_code = 3


class Registry(Generic[T]):
    """Named entries of one kind. Duplicates raise; an unknown name lists what exists."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries) or f"known: {', '.join(sorted(self._entries))}"
            raise RegistryError(f"unknown {self.kind} '{name}'", hint=hint) from None

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def in_order(self) -> list[tuple[str, T]]:
        """Entries in registration order (for messages that list what exists in a fixed order)."""
        return list(self._entries.items())
