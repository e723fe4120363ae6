"""Typed, strict access to TOML configuration tables, shared by the server's and the client's settings."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration file is invalid: wrong type, missing or unknown key."""


class TomlTable:
    """Typed access to one TOML table that remembers which keys were used, so typos are reported."""

    def __init__(self, table: Any, where: str) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{where or 'top level'} must be a table")
        self.table_ = table
        self.where = where
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.table_

    def value(self, key: str, default: Any, types: tuple[type, ...]) -> Any:
        """The raw value of ``key``, which must be one of ``types`` (``default`` when absent)."""
        self.used.add(key)
        if key not in self.table_:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where}{key} is required")
            return default
        value = self.table_[key]
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"{self.where}{key} has the wrong type")
        if not isinstance(value, types):
            raise ConfigError(f"{self.where}{key} must be {' or '.join(t.__name__ for t in types)}")
        return value

    def text(self, key: str, default: Any = None) -> str:
        return str(self.value(key, _REQUIRED if default is None else default, (str,)))

    def integer(self, key: str, default: int) -> int:
        return int(self.value(key, default, (int,)))

    def number(self, key: str, default: float) -> float:
        return float(self.value(key, default, (int, float)))

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.value(key, default, (bool,)))

    def texts(self, key: str, default: list[str] | None = None) -> list[str]:
        value = self.value(key, [] if default is None else default, (list,))
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.where}{key} must be a list of strings")
        return list(value)

    def items(self, key: str) -> list[Any]:
        return list(self.value(key, [], (list,)))

    def subtable(self, key: str) -> dict[str, Any]:
        return dict(self.value(key, {}, (dict,)))

    def done(self) -> None:
        unknown = set(self.table_) - self.used
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(self.where + k for k in sorted(unknown))}")


_REQUIRED: Any = object()

__all__ = ["ConfigError", "TomlTable"]
