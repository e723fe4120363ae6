"""Trace files in the CVMFS tracer's format -> specifications, as CVMFS's spec_builder.py makes them;
and a trace recorded with strace against an rcds export, end to end (record, build, narrow, re-run).

The trace files are written here from the format description (quoted CSV, CRLF, millisecond timestamps,
internal negative events); the expected specifications are worked out by hand from spec_builder's rules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tree
from rcds.cvmfs.repository import Repository
from rcds.shrinkwrap.export import export
from rcds.shrinkwrap.spec import Selector, parse_spec
from rcds.shrinkwrap.trace import TraceError, TraceEvent, build_spec, read_trace, strace_to_events
from tools import require_tool

TRACE = (
    '"1732190000123.456","-1","Tracer","Trace buffer created"\r\n'
    '"1732190000124.001","4","/sw","lookup()"\r\n'
    '"1732190000124.002","2","/sw/alice","opendir()"\r\n'
    '"1732190000124.003","1","/sw/alice/app/bin/run.sh","open()"\r\n'
    '"1732190000124.004","3","/sw/alice/app/lib/link","readlink()"\r\n'
    '"1732190000124.005","6","/sw/alice/app/lib/libx.so","getattr()"\r\n'
    '"1732190000124.006","1","/sw/alice/app/lib/libx.so","open()"\r\n'
    '"1732190000124.007","4","/.Trash","lookup()"\r\n'
    '"1732190000124.008","5","","statfs()"\r\n'
    '"1732190000124.009","4","/data/a ""quoted"", name","lookup()"\r\n'
    '"1732190000124.010","-3","Tracer","flushed ring buffer"\r\n'
    '"1732190000124.011","1","/sw/alice/app/bin/helper","open()"\r\n'
    '"1732190000124.012","-2","Tracer","Destroying trace buffer..."\r\n'
)

PDIR = "\n".join(
    ['^/data/a "quoted", name', "^/sw/alice/app/bin/*", "^/", "^/sw", "^/sw/alice/*", "^/sw/alice/app/lib/*"]
)
EXACT = "\n".join(
    [
        '^/data/a "quoted", name',
        "^/sw/alice/app/bin/helper",
        "^/sw/alice/app/bin/run.sh",
        "^/sw/alice/app/lib/libx.so",
        "^/",
        "^/sw",
        "^/sw/alice/*",
        "^/sw/alice/app/lib/link",
    ]
)
PDIR_WITHOUT_OPEN = "\n".join(
    [
        '^/data/a "quoted", name',
        "^/sw/alice/app/lib/libx.so",
        "^/",
        "^/sw",
        "^/sw/alice/*",
        "^/sw/alice/app/lib/link",
    ]
)


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    p = tmp_path / "repo.trace.log"
    p.write_bytes(TRACE.encode())
    return p


def test_read_trace_parses_the_tracer_format(trace_file: Path) -> None:
    events = read_trace(trace_file)
    assert len(events) == 13
    assert events[0] == TraceEvent("1732190000123.456", -1, "Tracer", "Trace buffer created")
    assert events[9].path == '/data/a "quoted", name'  # doubled quote, comma inside the field
    assert events[8].path == "" and events[8].code == 5


def test_policies_give_the_spec_builder_output(trace_file: Path) -> None:
    events = read_trace(trace_file)
    assert build_spec(events, "pdir") == PDIR
    assert build_spec(events, "exact") == EXACT
    assert build_spec(events, "pdir", filters=["open"]) == PDIR_WITHOUT_OPEN


def test_traces_of_several_runs_merge(trace_file: Path, tmp_path: Path) -> None:
    lines = TRACE.split("\r\n")
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("\r\n".join(lines[:6]) + "\r\n", newline="")
    b.write_text("\r\n".join(lines[6:]), newline="")
    assert build_spec(read_trace(a) + read_trace(b)) == PDIR
    # the same trace twice adds nothing
    assert build_spec(read_trace(trace_file) * 2) == PDIR


def test_unknown_path_is_an_error_unless_filtered(tmp_path: Path) -> None:
    p = tmp_path / "t.log"
    p.write_bytes(b'"1.000","1","/a/b","open()"\r\n"2.000","8","@UNKNOWN","getxattr()"\r\n')
    with pytest.raises(TraceError, match="UNKNOWN"):
        build_spec(read_trace(p))
    assert build_spec(read_trace(p), filters=["getxattr"]) == "^/\n^/a/*"
    p.write_bytes(b'"1.000","1","/a/b"\r\n')
    with pytest.raises(TraceError, match="4 fields"):
        read_trace(p)


def test_cli_builds_the_spec(trace_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "spec.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "rcds.cli",
        "trace",
        "spec",
        str(trace_file),
        "--policy",
        "exact",
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, env=env)
    assert out.read_text() == EXACT  # no newline after the last line, as spec_builder writes it


def test_strace_log_to_events(tmp_path: Path) -> None:
    root = tmp_path / "export" / "repo"
    hx = lambda s: "".join(f"\\x{b:02x}" for b in os.fsencode(s))  # noqa: E731
    log = [
        f'10 1796233383.569873 openat(AT_FDCWD<{hx(str(root))}>, "{hx("sub/f")}", O_RDONLY) = 3<{hx(str(root / "sub/f"))}>',
        f'10 1796233383.570001 openat(AT_FDCWD<{hx("/tmp")}>, "{hx(str(root / "l"))}", O_RDONLY) = 3<{hx(str(root / "sub/f"))}>',
        f'10 1796233383.570002 openat(AT_FDCWD<{hx(str(root))}>, "{hx("sub")}", O_RDONLY|O_DIRECTORY) = 4<{hx(str(root / "sub"))}>',
        f'10 1796233383.570003 readlinkat(AT_FDCWD<{hx(str(root))}>, "{hx("l")}", "{hx("sub/f")}", 4096) = 5',
        f'10 1796233383.570004 newfstatat(AT_FDCWD<{hx("/")}>, "{hx("/etc/passwd")}", {{st_mode=S_IFREG}}, 0) = 0',
        f'10 1796233383.570005 newfstatat(AT_FDCWD<{hx(str(root))}>, "{hx("nope")}", 0x7ff, 0) = -1 ENOENT (No such file)',
        f'11 1796233383.5701 execve("{hx(str(root / "bin/run.sh"))}", ["{hx("run.sh")}"], 0x7ff /* 3 vars */) = 0',
    ]
    events = strace_to_events([line + "\n" for line in log], root)
    assert [(e.timestamp, e.code, e.path, e.call) for e in events] == [
        ("1796233383569.873", 1, "/sub/f", "open()"),
        ("1796233383570.001", 4, "/l", "lookup()"),
        ("1796233383570.001", 1, "/sub/f", "open()"),
        ("1796233383570.002", 2, "/sub", "opendir()"),
        ("1796233383570.003", 3, "/l", "readlink()"),
        ("1796233383570.100", 1, "/bin/run.sh", "open()"),
    ]


def test_record_a_workflow_against_an_export_and_narrow_it(make_repo, open_reader, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require_tool("strace", "strace")
    repo: Repository = make_repo()
    src = write_tree(
        tmp_path / "src",
        {
            "bin": {
                "run.sh": b'#!/bin/sh\ncat "$(dirname "$0")/../etc/app.conf"\nls "$(dirname "$0")/../data"\n'
            },
            "etc": {"app.conf": b"setting=1\n", "unused.conf": b"no\n"},
            "data": {"d1.txt": b"1\n", "sub": {"deep.txt": b"deep\n"}},
            "lib": {"huge.so": b"x" * 100_000},
        },
    )
    os.chmod(src / "bin/run.sh", 0o755)
    with repo.transaction() as txn:
        txn.add_directory("/app", src)
        txn.commit()
    full = tmp_path / "full"
    export(open_reader(repo), Selector(parse_spec("/app*"), "2.14"), full, progress=False)
    root = full / repo.fqrn
    trace = tmp_path / "run.trace.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    record = [
        sys.executable,
        "-m",
        "rcds.cli",
        "trace",
        "record",
        "--root",
        str(root),
        "-o",
        str(trace),
        "--",
    ]
    proc = subprocess.run(
        [*record, "sh", str(root / "app/bin/run.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "setting=1\nd1.txt\nsub\n"
    raw = trace.read_bytes()
    assert (
        raw.startswith(b'"')
        and raw.endswith(b'"\r\n')
        and b'","-1","Tracer","Trace buffer created"\r\n' in raw
    )
    events = read_trace(trace)
    assert ("/app/etc/app.conf", "open()") in {(e.path, e.call) for e in events}
    assert ("/app/data", "opendir()") in {(e.path, e.call) for e in events}
    spec_text = build_spec(events, "pdir")
    assert "^/app/etc/*" in spec_text.splitlines() and "^/app/data/*" in spec_text.splitlines()
    narrow = tmp_path / "narrow"
    export(open_reader(repo), Selector(parse_spec(spec_text), "2.14"), narrow, progress=False)
    nroot = narrow / repo.fqrn
    assert (nroot / "app/etc/unused.conf").exists()  # pdir: the whole (flat) directory of an opened file
    assert not (nroot / "app/lib").exists() and not (nroot / "app/data/sub/deep.txt").exists()
    again = subprocess.run(["sh", str(nroot / "app/bin/run.sh")], capture_output=True, text=True)
    assert again.stdout == proc.stdout  # the workflow runs on the narrowed export
