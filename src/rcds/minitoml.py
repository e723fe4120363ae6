"""The part of TOML a client configuration uses, for Pythons without ``tomllib`` (before 3.11).

The job client (``rcds.client.bundle``) runs on the python3 of a worker node (3.9 on EL9) and reads the
same ``client.toml`` as ``rcds``: key/value pairs, ``[table]`` headers, comments, strings (basic and
literal, one line), integers, floats, booleans and arrays of them (over several lines too). Anything
else (dates, inline tables, multi-line strings) is reported, never guessed at. Same interface as
``tomllib``: ``loads`` and ``TOMLDecodeError``.
"""

from __future__ import annotations

import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_NUMBER = re.compile(r"[+-]?(?:0|[1-9](?:_?[0-9])*)(?:\.[0-9](?:_?[0-9])*)?(?:[eE][+-]?[0-9](?:_?[0-9])*)?")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


class TOMLDecodeError(ValueError):
    pass


def loads(text: str) -> dict[str, Any]:
    return _Parser(text).document()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> TOMLDecodeError:
        line = self.text.count("\n", 0, self.pos) + 1
        return TOMLDecodeError(f"{message} (at line {line})")

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def skip_blank(self, newlines: bool) -> None:
        """Spaces and comments; line ends too when ``newlines``."""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t" or (newlines and c in "\r\n"):
                self.pos += 1
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def end_of_line(self) -> None:
        self.skip_blank(newlines=False)
        if self.pos < len(self.text):
            if self.text.startswith("\r\n", self.pos):
                self.pos += 1
            if self.text[self.pos] != "\n":
                raise self.error("expected the end of the line")
            self.pos += 1

    def document(self) -> dict[str, Any]:
        root: dict[str, Any] = {}
        table = root
        while True:
            self.skip_blank(newlines=True)
            if self.pos >= len(self.text):
                return root
            if self.peek() == "[":
                if self.text.startswith("[[", self.pos):
                    raise self.error("arrays of tables are not supported")
                self.pos += 1
                table = root
                for key in self.keys("]"):
                    table = table.setdefault(key, {})
                    if not isinstance(table, dict):
                        raise self.error(f"{key} is not a table")
                self.pos += 1
            else:
                keys = self.keys("=")
                self.pos += 1
                self.skip_blank(newlines=False)
                target = table
                for key in keys[:-1]:
                    target = target.setdefault(key, {})
                    if not isinstance(target, dict):
                        raise self.error(f"{key} is not a table")
                if keys[-1] in target:
                    raise self.error(f"{keys[-1]} is defined twice")
                target[keys[-1]] = self.value()
            self.end_of_line()

    def keys(self, stop: str) -> list[str]:
        """A dotted key, up to ``stop`` (left unread)."""
        keys = []
        while True:
            self.skip_blank(newlines=False)
            if self.peek() in ('"', "'"):
                keys.append(self.string())
            else:
                m = _BARE_KEY.match(self.text, self.pos)
                if not m:
                    raise self.error("expected a key")
                keys.append(m.group())
                self.pos = m.end()
            self.skip_blank(newlines=False)
            if self.peek() == stop:
                return keys
            if self.peek() != ".":
                raise self.error(f"expected {stop!r} after the key")
            self.pos += 1

    def value(self) -> Any:
        c = self.peek()
        if c in ('"', "'"):
            return self.string()
        if c == "[":
            return self.array()
        for word, value in (("true", True), ("false", False)):
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return value
        m = _NUMBER.match(self.text, self.pos)
        if m and m.group() not in ("+", "-"):
            self.pos = m.end()
            number = m.group().replace("_", "")
            return float(number) if any(ch in number for ch in ".eE") else int(number)
        raise self.error("unsupported or invalid value")

    def array(self) -> list[Any]:
        self.pos += 1
        items: list[Any] = []
        while True:
            self.skip_blank(newlines=True)
            if self.peek() == "]":
                self.pos += 1
                return items
            items.append(self.value())
            self.skip_blank(newlines=True)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise self.error("expected ',' or ']' in an array")

    def string(self) -> str:
        quote = self.peek()
        if self.text.startswith(quote * 3, self.pos):
            raise self.error("multi-line strings are not supported")
        self.pos += 1
        out: list[str] = []
        while True:
            c = self.peek()
            if c in ("", "\n"):
                raise self.error("unterminated string")
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c == "\\" and quote == '"':
                e = self.peek()
                self.pos += 1
                if e in _ESCAPES:
                    out.append(_ESCAPES[e])
                elif e in ("u", "U"):
                    digits = self.text[self.pos : self.pos + (4 if e == "u" else 8)]
                    if not re.fullmatch(r"[0-9A-Fa-f]+", digits) or len(digits) != (4 if e == "u" else 8):
                        raise self.error("bad unicode escape")
                    out.append(chr(int(digits, 16)))
                    self.pos += len(digits)
                else:
                    raise self.error(f"bad escape \\{e}")
            else:
                out.append(c)


__all__ = ["TOMLDecodeError", "loads"]
