"""Shrinkwrap specifications: which paths of a repository an export holds.

The syntax is CVMFS's (``cvmfs_shrinkwrap`` spec files), one rule per line, paths repository-relative:

==============  ===========================================================================
``/a/b``        exactly the entry ``/a/b`` (a directory: the directory alone, not its content)
``/a/b*``       ``/a/b`` and everything below it (``/a/b/*`` is the same; ``*`` is no glob)
``^/a/b*``      flat: ``/a/b`` and its direct children, nothing deeper
``^/a/b``       the same as ``/a/b``
``!/a/b``       exclude ``/a/b`` and everything below it (``!/a/b*`` is the same)
``# ...``       a comment; empty lines are skipped; surrounding white space is trimmed
==============  ===========================================================================

Parents of an included path are *pass-through* directories: they exist, but only with the children
the rules select.

Two dialects, always chosen explicitly, because the same file means different trees in them:

* ``2.12`` (CVMFS up to 2.13): an exclusion is final. Nothing below an excluded path can be included
  again, whatever comes later. A later rule on the *same* path replaces an earlier one.
* ``2.14`` (CVMFS PR #4356, gitignore-like): for every path the last rule that covers it decides, so
  ``!/a*`` followed by ``/a/keep*`` keeps ``/a/keep`` (and ``/a`` as a pass-through directory).

Both dialects here avoid two defects users reported against CVMFS 2.12: an exclusion no longer makes
the directories on its way disappear when include rules also pass through them (cvmfs#3500: one
``!file`` line removed a whole tree), and no rule combination can loop (cvmfs#3497).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..cvmfs.hashes import normalize_path

__all__ = [
    "DIALECTS",
    "Kind",
    "Rule",
    "Selector",
    "SpecError",
    "format_rules",
    "parse_spec",
    "read_spec",
]

DIALECTS = ("2.12", "2.14")


class SpecError(ValueError):
    """A specification that cannot be used (with the line that is wrong)."""


class Kind(enum.Enum):
    EXACT = "exact"
    RECURSIVE = "recursive"
    FLAT = "flat"
    EXCLUDE = "exclude"

    @property
    def includes(self) -> bool:
        return self is not Kind.EXCLUDE


@dataclass(frozen=True)
class Rule:
    index: int  # position among all rules (0-based): later rules have higher indexes
    kind: Kind
    path: str  # catalog form: "" for the root, else "/a/b"
    text: str  # the line as written (trimmed)
    origin: str  # "<file>:<line>" or "command line"

    def __str__(self) -> str:
        return f"{self.origin}: {self.text}"

    def covers(self, path: str) -> bool:
        """Whether the rule speaks about ``path`` at all (independent of the dialect)."""
        if path == self.path:
            return True
        if self.kind is Kind.EXACT or not _is_below(path, self.path):
            return False
        if self.kind is Kind.FLAT:
            return "/" not in path[len(self.path) + 1 :]
        return True  # recursive include or exclusion: the whole subtree


def _is_below(path: str, top: str) -> bool:
    return path.startswith(top + "/") if top else path != ""


def rule_text(kind: Kind, path: str) -> str:
    p = path or "/"
    if kind is Kind.EXACT:
        return p
    if kind is Kind.RECURSIVE:
        return (p.rstrip("/") + "/*") if p == "/" else p + "*"
    if kind is Kind.FLAT:
        return "^" + ("/*" if p == "/" else p + "/*")
    return "!" + p


def parse_line(line: str, index: int, origin: str) -> Rule | None:
    """One line of a specification; None for an empty line or a comment."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    first = text[0]
    body = text[1:] if first in "!^" else text
    if first not in "/!^" or not body.startswith("/"):
        raise SpecError(
            f"{origin}: invalid specification line {text!r} (a rule starts with /, ! or ^ and a path)"
        )
    star = body.endswith("*")
    if star:
        body = body[:-1]
    if "*" in body:
        raise SpecError(f"{origin}: {text!r}: '*' is only allowed as the last character (it is not a glob)")
    try:
        path = normalize_path(body)
    except ValueError as exc:
        raise SpecError(f"{origin}: {text!r}: {exc}") from exc
    if first == "!":
        kind = Kind.EXCLUDE
    elif first == "^":
        kind = Kind.FLAT if star else Kind.EXACT
    else:
        kind = Kind.RECURSIVE if star else Kind.EXACT
    return Rule(index, kind, path, text, origin)


def parse_spec(text: str, origin: str = "spec", start: int = 0) -> list[Rule]:
    """The rules of a specification text. ``start`` is the index of the first rule (for appending)."""
    rules: list[Rule] = []
    for n, line in enumerate(text.splitlines(), 1):
        rule = parse_line(line, start + len(rules), f"{origin}:{n}")
        if rule is not None:
            rules.append(rule)
    return rules


def read_spec(path: Path, start: int = 0) -> list[Rule]:
    # Catalog names are bytes; names that are not UTF-8 round-trip as surrogate escapes, so must rules.
    text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
    return parse_spec(text, str(path), start)


def format_rules(rules: Iterable[Rule]) -> str:
    return "".join(r.text + "\n" for r in rules)


@dataclass
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)  # rules naming exactly this path, in order
    include_below: bool = False  # a selected include rule names a path strictly below this one


ALL = None  # child_candidates: every child of the directory in the repository must be looked at


class Selector:
    """Decides for every repository path whether the export holds it, and which rule says so."""

    def __init__(self, rules: list[Rule], dialect: str) -> None:
        if dialect not in DIALECTS:
            raise SpecError(f"unknown specification dialect {dialect!r} (one of {', '.join(DIALECTS)})")
        self.rules = rules
        self.dialect = dialect
        self._root = _Node()
        for r in rules:
            self._node(r.path, create=True).rules.append(r)  # type: ignore[union-attr]
        # Pass-through directories: the parents of every include rule whose own path is selected.
        for r in rules:
            if r.kind.includes and self._decide_rules(r.path)[0]:
                node = self._root
                for part in _parts(r.path)[:-1] if r.path else []:
                    node.include_below = True
                    node = node.children[part]
                node.include_below = node.include_below or bool(r.path)

    # --- the trie --------------------------------------------------------------------------------

    def _node(self, path: str, create: bool = False) -> _Node | None:
        node = self._root
        for part in _parts(path):
            child = node.children.get(part)
            if child is None:
                if not create:
                    return None
                child = node.children[part] = _Node()
            node = child
        return node

    def _chain(self, path: str) -> list[_Node]:
        """The trie nodes from the root along ``path``, as far as they exist."""
        chain = [self._root]
        node = self._root
        for part in _parts(path):
            child = node.children.get(part)
            if child is None:
                break
            chain.append(child)
            node = child
        return chain

    # --- decisions -------------------------------------------------------------------------------

    def decide(self, path: str) -> tuple[bool, Rule | None]:
        """(selected, rule): the rule that includes or excludes ``path``; None for a pass-through
        directory or a path no rule speaks about. The root is always selected."""
        if path == "":
            selected, rule = self._decide_rules(path)
            return True, rule if selected else None
        selected, rule = self._decide_rules(path)
        if selected:
            return True, rule
        node = self._node(path)
        if (
            node is not None
            and node.include_below
            and (self.dialect == "2.14" or not self._excluded_above(path))
        ):
            return True, None
        return False, rule

    def same_for_every_child(self, path: str) -> bool:
        """Whether every child of ``path`` gets the same decision: no rule names anything below it, so a
        child's decision depends only on the rules along ``path`` and its depth, not on its name (a
        walk decides once per directory instead of once per entry)."""
        node = self._node(path)
        return node is None or not node.children

    def _decide_rules(self, path: str) -> tuple[bool, Rule | None]:
        return self._decide_214(path) if self.dialect == "2.14" else self._decide_212(path)

    def _decide_214(self, path: str) -> tuple[bool, Rule | None]:
        """The last rule that covers the path decides (gitignore-like)."""
        depth = len(_parts(path))
        best: Rule | None = None
        for i, node in enumerate(self._chain(path)):
            for r in node.rules:
                covers = i == depth or (r.kind is Kind.FLAT and i == depth - 1)
                covers = covers or r.kind in (Kind.RECURSIVE, Kind.EXCLUDE)
                if covers and (best is None or r.index > best.index):
                    best = r
        if best is None:
            return False, None
        return best.kind.includes, best

    def _decide_212(self, path: str) -> tuple[bool, Rule | None]:
        """CVMFS 2.12: every trie node has the kind of the last rule naming it; walking down from the
        root, an exclusion is final, a recursive rule holds for everything below, a flat rule for the
        direct children."""
        parts = _parts(path)
        chain = self._chain(path)
        recursive: Rule | None = None
        flat: Rule | None = None  # a flat rule on the parent of the current node
        for i, node in enumerate(chain):
            last = node.rules[-1] if node.rules else None
            if last is not None and last.kind is Kind.EXCLUDE:
                return False, last
            if i == len(parts):  # the path itself is in the trie
                if last is not None and last.kind in (Kind.EXACT, Kind.FLAT):
                    return True, last
                if last is not None and last.kind is Kind.RECURSIVE:
                    return True, last
                if recursive is not None:
                    return True, recursive
                if flat is not None:
                    return True, flat
                return False, None
            if last is not None and last.kind is Kind.RECURSIVE:
                recursive = last
            flat = last if last is not None and last.kind is Kind.FLAT else None
        # The trie ends above the path.
        if recursive is not None:
            return True, recursive
        if flat is not None and len(chain) == len(parts):
            return True, flat
        return False, None

    def _excluded_above(self, path: str) -> bool:
        """2.12: an exclusion on a strict ancestor hides everything below it (pass-through included)."""
        chain = self._chain(path)
        return any(n.rules and n.rules[-1].kind is Kind.EXCLUDE for n in chain[: len(_parts(path))])

    def covered_by_include(self, path: str) -> bool:
        """Whether any include rule speaks about ``path`` (what an exclusion there really removes)."""
        return any(
            r.kind.includes and r.covers(path) for i, node in enumerate(self._chain(path)) for r in node.rules
        )

    def child_candidates(self, path: str) -> set[str] | None:
        """The names below the selected directory ``path`` that can be selected, or ``ALL`` when every
        child in the repository must be looked at (a recursive or flat rule reaches them). Keeps the
        traversal of a big repository down to what the rules name."""
        chain = self._chain(path)
        depth = len(_parts(path))
        for i, node in enumerate(chain):
            for r in node.rules:
                if r.kind is Kind.RECURSIVE or (r.kind is Kind.FLAT and i == depth):
                    return ALL
        if len(chain) == depth + 1:
            return set(chain[-1].children)
        return set()


def _parts(path: str) -> list[str]:
    return path.split("/")[1:] if path else []
