"""Traces: the files CVMFS's tracer writes, specifications built from them, and recording without CVMFS.

**The format** (``CVMFS_TRACEFILE=/path/@fqrn@.trace.log`` in a CVMFS client configuration): CSV, every
field double-quoted (a quote inside doubled), CRLF line ends, four fields per line: the time in
milliseconds since the epoch with three decimals (``"1732190000123.456"``), the event code, the
repository-relative path and the call (``open()``...). Codes 1 open, 2 opendir, 3 readlink, 4 lookup,
5 statfs, 6 getattr, 7 listxattr, 8 getxattr; negative codes are the tracer's own events (-1 buffer
created, -2 stop, -3 flushed) with the path ``Tracer``; a path the client could not resolve is written
``@UNKNOWN``.

**Specifications from traces** follow CVMFS's ``spec_builder.py`` rule for rule, so the same traces give
the same specification text: policy ``pdir`` turns ``open()`` into a flat copy of the parent directory
(``^/dir/*``), ``opendir()`` into a flat copy of the directory and any other call into the exact path
(``^/path``); policy ``exact`` only turns ``opendir()`` into a flat copy. ``--filters`` drops calls by
name; negative codes and ``/.Trash``, ``/.Trash-1000`` are skipped; ``@UNKNOWN`` is an error. The points
are sorted by path and collapsed (a flat rule swallows exact rules on its direct children; the same path
twice keeps the wider rule); the root always appears (``^/`` or ``^/*``); lines are separated by
newlines, with none after the last. Many traces (several runs of a workflow) are merged by handing all
their events over at once.

**Recording without a CVMFS client**: ``record_with_strace`` runs a command under ``strace -f`` and
turns the file system calls that touch an exported tree (``<dest>/<fqrn>``) into such a trace, so a
workflow can be traced against an rcds export on any machine and the export then narrowed to what the
workflow really uses.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CALLS",
    "TraceError",
    "TraceEvent",
    "build_spec",
    "format_event",
    "read_trace",
    "record_with_strace",
    "strace_to_events",
    "write_trace",
]

CALLS = {
    1: "open()",
    2: "opendir()",
    3: "readlink()",
    4: "lookup()",
    5: "statfs()",
    6: "getattr()",
    7: "listxattr()",
    8: "getxattr()",
}
_INTERNAL = {-1: "Trace buffer created", -2: "Destroying trace buffer...", -3: "flushed ring buffer"}
_SKIPPED_PATHS = ("/.Trash", "/.Trash-1000")  # what a desktop's trash can looks up on every mount
UNKNOWN = "@UNKNOWN"


class TraceError(ValueError):
    """A trace that cannot be used."""


@dataclass(frozen=True)
class TraceEvent:
    timestamp: str  # milliseconds since the epoch, as written ("1732190000123.456")
    code: int
    path: str
    call: str


def read_trace(path: Path) -> list[TraceEvent]:
    """The events of a CVMFS trace file (any line ends; quoted CSV)."""
    events: list[TraceEvent] = []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter=",", quotechar='"'), 1):
            if not row:
                continue
            if len(row) != 4:
                raise TraceError(f"{path}:{n}: expected 4 fields, found {len(row)}: {row!r}")
            try:
                code = int(row[1])
            except ValueError as exc:
                raise TraceError(f"{path}:{n}: event code {row[1]!r} is not a number") from exc
            events.append(TraceEvent(row[0], code, row[2], row[3]))
    return events


def _quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"'


def format_event(e: TraceEvent) -> str:
    return ",".join(_quote(f) for f in (e.timestamp, str(e.code), e.path, e.call)) + "\r\n"


def write_trace(path: Path, events: Iterable[TraceEvent]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        for e in events:
            f.write(format_event(e))
            n += 1
    return n


# --- specifications from traces ----------------------------------------------------------------------


@dataclass
class _Point:
    path: str  # "" is the root
    flat: bool

    def text(self) -> str:
        if self.flat:
            return f"^{self.path}/*"
        return "^" + (self.path or "/")

    def holds(self, path: str) -> bool:
        """Parent-or-self (the root holds everything)."""
        return self.path == "" or path == self.path or path.startswith(self.path + "/")


def _parent(path: str) -> str:
    cut = path.rfind("/")
    return path[:cut] if cut > 0 else ""


def build_spec(events: Sequence[TraceEvent], policy: str = "pdir", filters: Iterable[str] = ()) -> str:
    """A specification (``^`` rules only) from trace events, as CVMFS's spec_builder.py writes it."""
    if policy not in ("pdir", "exact"):
        raise TraceError(f"unknown policy {policy!r} (pdir or exact)")
    dropped = {f if f.endswith("()") else f + "()" for f in filters}
    points: list[_Point] = []
    for e in events:
        if e.call in dropped or e.code < 0 or e.path in _SKIPPED_PATHS:
            continue
        if e.path == UNKNOWN:
            raise TraceError("the trace holds @UNKNOWN: the client could not resolve a path while tracing")
        if e.call == "opendir()":
            points.append(_Point(e.path, True))
        elif policy == "pdir" and e.call == "open()":
            points.append(_Point(_parent(e.path), True))
        else:
            points.append(_Point(e.path, False))
    points.sort(key=lambda p: p.path)  # stable: equal paths keep the order of the events
    out: list[_Point] = []
    stack = [_Point("", False)]
    for p in points:
        while not stack[-1].holds(p.path):
            out.append(stack.pop())
        top = stack[-1]
        if top.path == p.path:
            top.flat = top.flat or p.flat
        elif not (top.flat and top.path == _parent(p.path) and not p.flat):
            stack.append(p)
    out.extend(stack)
    return "\n".join(p.text() for p in out)


# --- recording without CVMFS -------------------------------------------------------------------------

# The calls that look at a path, and the tracer event each stands for.
_STRACE_CALLS = {
    "open": 1,
    "openat": 1,
    "openat2": 1,
    "creat": 1,
    "execve": 1,
    "execveat": 1,
    "readlink": 3,
    "readlinkat": 3,
    "access": 4,
    "faccessat": 4,
    "faccessat2": 4,
    "chdir": 4,
    "statfs": 5,
    "stat": 6,
    "lstat": 6,
    "newfstatat": 6,
    "fstatat64": 6,
    "statx": 6,
    "listxattr": 7,
    "llistxattr": 7,
    "getxattr": 8,
    "lgetxattr": 8,
}
_LINE = re.compile(r"^(\d+)\s+(\d+)\.(\d+)\s+(\w+)\((.*)$")
_HEX = r"((?:\\x[0-9a-f]{2})*)"
_FD_THEN_STRING = re.compile(r"^(?:AT_FDCWD|-?\d+)<" + _HEX + r'>,\s*"' + _HEX + '"')
_STRING = re.compile(r'^"' + _HEX + '"')
_RESULT_FD = re.compile(r"=\s*\d+<" + _HEX + r">\s*$")
_FAILED = re.compile(r"=\s*-1\s+E")


def _unhex(text: str) -> str:
    return os.fsdecode(bytes.fromhex(text.replace("\\x", "")))


def strace_to_events(lines: Iterable[str], root: Path) -> list[TraceEvent]:
    """Tracer events for the successful calls of an ``strace -f -y -xx -ttt`` log that reach ``root``."""
    roots = {os.path.normpath(os.path.abspath(root)), os.path.realpath(root)}
    events: list[TraceEvent] = []

    def below(path: str) -> str | None:
        path = os.path.normpath(path)
        for r in roots:
            if path == r:
                return ""
            if path.startswith(r + "/"):
                return path[len(r) :]
        return None

    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m is None:
            continue
        _, seconds, fraction, call, rest = m.groups()
        code = _STRACE_CALLS.get(call)
        if code is None or "<unfinished" in rest or _FAILED.search(rest):
            continue
        timestamp = f"{seconds}{(fraction + '000000')[:3]}.{(fraction + '000000')[3:6]}"
        fm = _FD_THEN_STRING.match(rest)
        if fm is not None:
            directory, name = _unhex(fm.group(1)), _unhex(fm.group(2))
            literal = name if name.startswith("/") else (os.path.join(directory, name) if name else directory)
        else:
            sm = _STRING.match(rest)
            if sm is None:
                continue
            literal = _unhex(sm.group(1))
            if not literal.startswith("/"):
                continue  # relative to a working directory this log does not show (only *at calls do)
        opened = code == 1 and call not in ("execve", "execveat")
        is_dir = opened and "O_DIRECTORY" in rest
        where = below(literal)
        if opened:
            # The name as written (maybe a symlink) is looked up; what was opened is where it led.
            resolved = _RESULT_FD.search(rest)
            target = below(_unhex(resolved.group(1))) if resolved else where
            if where is not None and where != target:
                events.append(TraceEvent(timestamp, 4, where, CALLS[4]))
            if target is not None:
                code = 2 if is_dir else 1
                events.append(TraceEvent(timestamp, code, target, CALLS[code]))
            continue
        if where is not None:
            events.append(TraceEvent(timestamp, code, where, CALLS[code]))
    return events


def record_with_strace(command: list[str], root: Path, output: Path) -> tuple[int, int]:
    """Run ``command`` under strace; write the trace of what it did below ``root`` to ``output``.

    Returns (the command's exit code, number of events written).
    """
    strace = shutil.which("strace")
    if strace is None:
        raise TraceError("recording needs strace (Debian/Ubuntu: apt-get install strace)")
    if not Path(root).is_dir():
        raise TraceError(f"{root} is not a directory")
    calls = ",".join(sorted(_STRACE_CALLS))
    with tempfile.TemporaryDirectory(prefix="rcds-trace-") as tmp:
        log = Path(tmp) / "strace.log"
        # -e trace=<list> fails on calls this architecture lacks: ask strace to skip unknown names.
        argv = [strace, "-f", "-qq", "-y", "-xx", "-ttt", "-e", f"trace=?{calls.replace(',', ',?')}"]
        proc = subprocess.run([*argv, "-o", str(log), "--", *command], check=False)
        if not log.exists():
            raise TraceError(f"strace did not run the command (exit {proc.returncode})")
        with open(log, encoding="ascii", errors="replace") as f:
            events = strace_to_events(f, root)
    first = events[0].timestamp if events else "0.000"
    last = events[-1].timestamp if events else first
    framed = [
        TraceEvent(first, -1, "Tracer", _INTERNAL[-1]),
        *events,
        TraceEvent(last, -2, "Tracer", _INTERNAL[-2]),
    ]
    write_trace(output, framed)
    return proc.returncode, len(events)
