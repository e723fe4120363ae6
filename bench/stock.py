#!/usr/bin/env python3
"""Side by side with the stock CVMFS tools: ingest and re-ingest, a stratum 1 snapshot, FUSE-less reads.

**Ingest** (root only: each run writes to a fresh loop-mounted ext4 image, because on a file system where
many files were just deleted, creating files costs several times the CPU; skipped with a message when
not root): the ``ingest.py`` tree as an uncompressed tar, once into an empty repository at
``bench1/tree``, then again at ``bench2/tree`` (re-ingest). Stock = what ``cvmfs_server ingest``
runs: ``cvmfs_swissknife ingest -T <tar> -B <path> -C true`` (a nested catalog) into ``local,`` upstream
storage, then ``tag_edit -x`` and ``sign``, each under ``/usr/bin/time`` (wall and CPU summed, peak RSS
the largest). rcds = ``bench/stock.py --rcds-ingest`` in a fresh interpreter: one transaction with
``add_tree(tar_entries(...))`` and ``commit`` (interpreter start-up and imports included). Both start
from the same empty repository made by rcds (``Repository.create``, not timed), whose keys stock signs
with. The same for the tree as a directory: ``swissknife sync`` (what ``cvmfs_server publish`` runs)
against ``rcds repo add``. ``--small-files`` ingests only the tree's small files (issue 19's part 2).
Peak RSS is ``/usr/bin/time``'s: the largest single process, so rcds's small-file worker processes
(about 25 MiB each) are not added in; ``bench/ingest.py`` adds them.

**Snapshot**: the same repository (the ``get.py`` repository of the ``ingest.py`` tree, published once with rcds) is
served by ``rcds.web.repo_http`` on 127.0.0.1; ``cvmfs_swissknife pull`` and ``rcds replicate`` each
snapshot it into a fresh directory, then again with nothing new. Both replicas must end up with the same
objects. The interpreter's bare start-up (``-c pass``) is printed beside it: ``--python`` runs the rcds
commands with another interpreter (a clean venv's has no ``.pth`` files importing at start-up).

**Reads** (root, ``/dev/fuse`` and ``cvmfs2`` needed; skipped with a message otherwise): the ``get.py``
CID of that served repository read into a local directory, cold (empty client cache) then warm (the cache
the cold run filled, a new destination), by: ``cvmfs2`` mounting the repository (foreground, a client
configuration needing nothing of /etc/cvmfs) + ``cp -r`` of the CID out of the mount + unmount, the warm
run a fresh mount (so the kernel's page cache of the first mount's files is gone, the client cache is
not); ``cvmfs_shrinkwrap`` with a spec of the CID (warm: a second run into a new destination); ``rcds
get`` as a command with a node cache (warm: hard links from it). Each tool's two runs write everything
(destinations, caches) into one fresh loop-mounted ext4; the tools' order alternates between repetitions;
the cold copies must hold the same tree.

Each step is a whole command under ``/usr/bin/time`` (wall seconds, CPU seconds, peak RSS of that command
alone; for the mount: the ``cvmfs2`` process and ``cp`` added up), alternating stock and rcds ``--repeat``
times; the run with the median wall time of each is reported with the stock / rcds ratios.

    RCDS_CVMFS_BIN=/path/to/cvmfs/build/cvmfs python bench/stock.py --size-gib 0.1

The stock tools are looked up in ``$RCDS_CVMFS_BIN`` (a build tree: also put on ``LD_LIBRARY_PATH`` and, for
``cvmfs2``'s FUSE module, ``CVMFS_LIBRARY_PATH``), then on ``PATH``; without them the script says so and
exits 0. Nothing of CVMFS is part of rcds. Not measured here yet: ``.tar.gz``, and ingest through ``rcds
serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import get as get_bench  # the served repository
import ingest as ingest_bench  # the tree
from rcds.cvmfs.repository import Repository

MB = 1_000_000
TIME = "/usr/bin/time"


INGEST_FQRN = "ingest.bench.local"
# Two top-level directories: a second `swissknife ingest` below a directory the first one created (sw/a,
# then sw/b) aborts here (catalog_rw.cc:171 AddEntry assertion, CVMFS 2.12).
TREE1, TREE2 = "bench1/tree", "bench2/tree"


def find_stock_tool(name: str) -> tuple[str, dict[str, str]] | None:
    """A stock CVMFS program (``cvmfs_swissknife``, ``cvmfs2``, ``cvmfs_shrinkwrap``) and the environment to
    run it with: from ``$RCDS_CVMFS_BIN`` (a build tree: also put on ``LD_LIBRARY_PATH``, and as
    ``CVMFS_LIBRARY_PATH`` where ``cvmfs2`` looks for its FUSE module), else from ``PATH``."""
    env = dict(os.environ)
    where = os.environ.get("RCDS_CVMFS_BIN")
    if where:
        tool = Path(where) / name
        if tool.is_file():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [where, env.get("LD_LIBRARY_PATH")]))
            env["CVMFS_LIBRARY_PATH"] = where
            return str(tool), env
    found = shutil.which(name)
    return (found, env) if found else None


TIME_FORMAT = "%e %U %S %M"  # wall seconds, user and system CPU seconds, peak RSS in KiB


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Wall, CPU seconds and peak RSS of one command, measured by /usr/bin/time around it alone."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        done = subprocess.run(
            [TIME, "-o", out.name, "-f", TIME_FORMAT, *cmd],
            env=env, cwd=cwd, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(
                f"{cmd[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return time_figures(out.read())


def time_figures(text: str) -> dict[str, float]:
    """What /usr/bin/time wrote with ``TIME_FORMAT`` (its last line)."""
    wall, user, system, rss_kib = text.split()[-4:]
    return {
        "seconds": float(wall),
        "cpu_seconds": float(user) + float(system),
        "peak_rss_mib": int(rss_kib) / 1024,
    }


def stock_layout(replica: Path) -> None:
    """What ``cvmfs_server add-replica`` prepares: data/00..ff and data/txn."""
    for i in range(256):
        (replica / "data" / f"{i:02x}").mkdir(parents=True, exist_ok=True)
    (replica / "data" / "txn").mkdir(exist_ok=True)


def objects(storage: Path) -> set[str]:
    return {
        f"{p.parent.name}/{p.name}"
        for p in (storage / "data").glob("??/*")
        if p.is_file() and not p.name.startswith(".")
    }


def ensure_tar(tree: Path, workdir: Path, key: str) -> Path:
    """The tree as an uncompressed tar (GNU tar, sorted names, cached)."""
    tar = workdir / f"tree-{key}.tar"
    if not tar.is_file():
        part = tar.with_suffix(".part")
        subprocess.run(["tar", "--sort=name", "-C", str(tree), "-cf", str(part), "."], check=True)
        part.rename(tar)
    return tar


def root_hash(storage: Path) -> str:
    """The root catalog hash of a repository's (signed) manifest: its ``C`` line."""
    for line in (storage / ".cvmfspublished").read_bytes().split(b"\n"):
        if line.startswith(b"C"):
            return line[1:].decode()
        if line == b"--":
            break
    raise ValueError(f"no root catalog in {storage}/.cvmfspublished")


Areas = tuple[Path, Path, Path, str, str, Path]


def stock_areas(storage: Path) -> Areas:
    """What ``cvmfs_server`` hands swissknife for a local stratum 0 at ``storage``: the keys, its spool's
    temp and read-only directories, the upstream, the stratum 0 URL and the manifest to write."""
    tmp, rdonly = storage.parent / "spool-tmp", storage.parent / "rdonly"
    tmp.mkdir(exist_ok=True)
    rdonly.mkdir(exist_ok=True)
    (storage / "data" / "txn").mkdir(exist_ok=True)
    # swissknife keeps publish statistics here (it aborts if it cannot create them)
    Path(f"/var/spool/cvmfs/{INGEST_FQRN}").mkdir(parents=True, exist_ok=True)
    keys = storage / ".rcds" / "keys" / INGEST_FQRN
    return keys, tmp, rdonly, f"local,{storage}/data/txn,{storage}", f"file://{storage}", tmp / "manifest"


def stock_commit(
    swissknife: str, env: dict[str, str], storage: Path, areas: Areas, first: list[str]
) -> list[dict[str, float]]:
    """``first`` (ingest or sync), then what ``cvmfs_server`` runs after it: tag_edit (auto-tag handling)
    and sign; each timed. ``areas``: ``stock_areas(storage)``."""
    keys, tmp, _, upstream, stratum0, manifest = areas
    steps = [
        first,
        [swissknife, "tag_edit", "-r", upstream, "-w", stratum0, "-t", str(tmp), "-m", str(manifest),
         "-p", f"{keys}.pub", "-f", INGEST_FQRN, "-e", "sha1", "-x"],
        [swissknife, "sign", "-c", f"{keys}.crt", "-k", f"{keys}.key", "-n", INGEST_FQRN, "-u", stratum0,
         "-m", str(manifest), "-t", str(tmp), "-r", upstream, "-R", str(storage / ".rcds" / "reflog.chksum")],
    ]  # fmt: skip
    return [timed(cmd, env, storage.parent) for cmd in steps]


def totals(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "seconds": sum(r["seconds"] for r in runs),
        "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }


def stock_ingest(
    swissknife: str, env: dict[str, str], storage: Path, tar: Path, path: str
) -> dict[str, float]:
    """``cvmfs_server ingest``'s three commands: ingest, tag_edit (auto-tag handling), sign."""
    areas = keys, tmp, rdonly, upstream, stratum0, manifest = stock_areas(storage)
    ingest = [
        swissknife, "ingest", "-u", f"/cvmfs/{INGEST_FQRN}", "-c", str(rdonly), "-t", str(tmp),
        "-b", root_hash(storage), "-r", upstream, "-w", stratum0, "-o", str(manifest),
        "-K", f"{keys}.pub", "-N", INGEST_FQRN, "-U", "0", "-G", "0", "-T", str(tar), "-B", path, "-C", "true",
    ]  # fmt: skip
    runs = stock_commit(swissknife, env, storage, areas, ingest)
    return {**totals(runs), "ingest_seconds": runs[0]["seconds"]}


def rcds_ingest_main(storage: Path, tar: Path, path: str) -> None:
    """``--rcds-ingest``: one transaction adding the tar at ``path`` (what the timed command runs)."""
    from rcds.cvmfs.repository import Repository
    from rcds.ingest.tarstream import tar_entries

    repo = Repository(storage)
    with open(tar, "rb") as f, repo.transaction() as txn:
        txn.add_tree("/" + path, tar_entries(f))
        txn.commit()


def stock_sync(swissknife: str, env: dict[str, str], storage: Path, scratch_dir: Path) -> dict[str, float]:
    """``cvmfs_server publish``'s commands for the changes in ``scratch_dir``: sync, tag_edit, sign.

    ``scratch_dir`` is both the union and its upper layer: over an empty repository (or one whose other
    directories are not touched) the union shows exactly the scratch area, so no overlayfs mount is needed.
    """
    areas = keys, tmp, rdonly, upstream, stratum0, manifest = stock_areas(storage)
    chunking = ["-p", "-l", str(4 << 20), "-a", str(8 << 20), "-h", str(16 << 20)]  # cvmfs_server's defaults
    sync = [
        swissknife, "sync", "-u", str(scratch_dir), "-s", str(scratch_dir), "-c", str(rdonly), "-t", str(tmp),
        "-b", root_hash(storage), "-r", upstream, "-w", stratum0, "-o", str(manifest), "-e", "sha1",
        "-Z", "default", "-N", INGEST_FQRN, "-K", f"{keys}.pub", "-f", "overlayfs", *chunking,
    ]  # fmt: skip
    return totals(stock_commit(swissknife, env, storage, areas, sync))


def _say(name: str, step: str, r: dict[str, float]) -> None:
    print(
        f"[stock] {name} {step}: {r['seconds']:.2f} s, {r['cpu_seconds']:.1f} CPU s, {r['peak_rss_mib']:.0f} MiB",
        file=sys.stderr,
        flush=True,
    )


def ingest_side_by_side(
    swissknife: str, env: dict[str, str], python: str, rcds_cmd: list[str], tree: Path, tar: Path,
    scratch: Path, repeat: int,
) -> dict[str, list[dict[str, float]]]:  # fmt: skip
    """First ingest and re-ingest by stock and rcds, of ``tar`` and of the directory ``tree``, alternating,
    each on a fresh ext4."""
    rows: dict[str, list[dict[str, float]]] = {}
    size = 4 * tar.stat().st_size + (1 << 30)
    for _ in range(repeat):
        for name in ("stock", "rcds"):
            with ingest_bench.fresh_filesystem(scratch, size) as fs:
                storage = fs / "repo"
                Repository.create(INGEST_FQRN, storage)
                for step, path in (("tar ingest", TREE1), ("tar re-ingest", TREE2)):
                    if name == "stock":
                        r = stock_ingest(swissknife, env, storage, tar, path)
                    else:
                        cmd = [python, str(Path(__file__).resolve()), "--rcds-ingest",
                               str(storage), str(tar), path]  # fmt: skip
                        r = timed(cmd, env, fs)
                    rows.setdefault(f"{name} {step}", []).append(r)
                    _say(name, step, r)
            with ingest_bench.fresh_filesystem(scratch, size + tar.stat().st_size) as fs:
                storage, source = fs / "repo", fs / "scratch"
                Repository.create(INGEST_FQRN, storage)
                # the tree on the same file system, as in a cvmfs_server scratch area (copy not timed)
                (source / TREE1).parent.mkdir(parents=True)
                subprocess.run(["cp", "-a", str(tree), str(source / TREE1)], check=True)
                (source / TREE1 / ".cvmfscatalog").touch()  # its own catalog, as rcds's add_directory does
                os.sync()  # the copy written back now: else rcds's commit (syncfs) would wait for it
                for step, path in (("dir ingest", TREE1), ("dir re-ingest", TREE2)):
                    if path == TREE2:  # the same tree under a new path: what is in the scratch area now
                        (source / TREE2).parent.mkdir(parents=True)
                        (source / TREE1).rename(source / TREE2)
                        shutil.rmtree(source / TREE1.split("/")[0])
                    if name == "stock":
                        r = stock_sync(swissknife, env, storage, source)
                    else:
                        cmd = [*rcds_cmd, "repo", "add", "--storage", str(storage),
                               "/" + path, str(source / path)]  # fmt: skip
                        r = timed(cmd, env, fs)
                    rows.setdefault(f"{name} {step}", []).append(r)
                    _say(name, step, r)
    return rows


def rcds_command(python: str) -> list[str]:
    """How a user runs ``rcds`` with this interpreter: the console script pip installed beside it (no
    ``runpy``), else ``python -m rcds.cli``."""
    script = Path(python).parent / "rcds"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [python, "-m", "rcds.cli"]


def compile_rcds(python: str) -> None:
    """Write the rcds package's bytecode, as ``pip install`` does (untimed). An editable checkout run with
    PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on every command (0.14 s instead of
    0.10 s for a no-op snapshot on this machine)."""
    where = subprocess.run(
        [python, "-c", "import os, rcds; print(os.path.dirname(rcds.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    subprocess.run([python, "-m", "compileall", "-q", where], check=True, stdout=subprocess.DEVNULL)


def print_rows(
    title: str,
    steps: tuple[str, ...],
    rows: dict[str, list[dict[str, float]]],
    stock: tuple[str, ...] = ("stock",),
) -> None:
    """Median of each step's runs per tool; on each stock tool's row, its time / rcds's time (and the same
    for CPU): above 1, rcds is faster."""
    print(title)
    width = max(len(f"{n} {s}") for n in (*stock, "rcds") for s in steps) + 2
    print(f"{'step':<{width}}{'seconds':>9}{'CPU s':>8}{'RSS MiB':>9}{'stock/rcds':>12}{'CPU ratio':>11}")
    for step in steps:
        med = {n: _median(rows[f"{n} {step}"]) for n in (*stock, "rcds")}
        for name in (*stock, "rcds"):
            r, ours = med[name], med["rcds"]
            figures = f"{name + ' ' + step:<{width}}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}{r['peak_rss_mib']:>9.0f}"
            if name != "rcds":
                cpu = r["cpu_seconds"] / ours["cpu_seconds"] if ours["cpu_seconds"] else 0.0
                figures += f"{r['seconds'] / ours['seconds']:>12.2f}{cpu:>11.2f}"
            print(figures)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median wall time (the lower one of an even count: of two runs, the faster)."""
    return sorted(runs, key=lambda r: r["seconds"])[(len(runs) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, default=0.1, help="tree size (default 0.1)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=8, help="download threads of the tools (default 8)")
    parser.add_argument("--no-ingest", action="store_true", help="skip the ingest comparison")
    parser.add_argument(
        "--small-files",
        action="store_true",
        help="ingest only the tree's small files (everything outside lib/ and bin/: 20,000 per GiB)",
    )
    parser.add_argument("--no-snapshot", action="store_true", help="skip the snapshot comparison")
    parser.add_argument("--no-reads", action="store_true", help="skip the read comparison")
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="the interpreter the rcds commands run with, e.g. a clean venv's (default: this one)",
    )
    parser.add_argument("--rcds-ingest", nargs=3, metavar=("STORAGE", "TAR", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rcds_ingest:
        storage, tar, path = args.rcds_ingest
        rcds_ingest_main(Path(storage), Path(tar), path)
        return 0
    rcds = rcds_command(args.python)
    found = {
        name: tool
        for name in ("cvmfs_swissknife", "cvmfs2", "cvmfs_shrinkwrap")
        if (tool := find_stock_tool(name)) is not None
    }
    if not found:
        print(
            "stock CVMFS tools not found (set RCDS_CVMFS_BIN to the directory of cvmfs_swissknife): skipped"
        )
        return 0
    if not Path(TIME).is_file():
        print(f"{TIME} not found (apt-get install time): skipped")
        return 0
    workdir: Path = args.workdir.resolve()
    spec = ingest_bench.TreeSpec(args.size_gib)
    info, _ = ingest_bench.ensure_tree(spec, workdir)
    scratch = workdir / "stock-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    result: dict[str, Any] = {
        "benchmark": "rcds-stock",
        "size_bytes": info.total_bytes,
        "repeat": args.repeat,
        "python": args.python,
        "rcds": rcds,
    }
    compile_rcds(args.python)
    print(f"rcds commands: {' '.join(rcds)} (the rcds package's bytecode written first, as pip install does)")
    header = f"{info.total_bytes / MB:.0f} MB tree; {os.cpu_count()} CPUs; median of {args.repeat}"
    fresh_fs = ingest_bench.can_make_filesystems()
    swissknife = found.get("cvmfs_swissknife")
    if args.no_ingest:
        pass
    elif swissknife is None:
        print("ingest: no cvmfs_swissknife: skipped")
    elif not fresh_fs:
        print("ingest: needs root and mkfs.ext4 (a fresh loop-mounted ext4 per run): skipped")
    else:
        tree, key, what = Path(info.root), spec.key, "the tree"
        if args.small_files:
            tree, key = ingest_bench.kind_subtree(info, "small-files", workdir), f"{spec.key}-small-files"
            what = f"the tree's {sum(1 for p in tree.rglob('*') if p.is_file())} small files"
        tar = ensure_tar(tree, workdir, key)
        rows = ingest_side_by_side(*swissknife, args.python, rcds, tree, tar, scratch, args.repeat)
        print_rows(f"ingest of {what} (a tar; a directory), stock cvmfs_swissknife against rcds core: {header}",
                   ("tar ingest", "tar re-ingest", "dir ingest", "dir re-ingest"), rows)  # fmt: skip
        result["ingest"] = rows
    if args.no_snapshot:
        pass
    elif swissknife is None:
        print("snapshot: no cvmfs_swissknife: skipped")
    else:
        rows, polls = snapshot_side_by_side(
            *swissknife, rcds, info, spec.key, workdir, scratch, args.jobs, args.repeat
        )
        print_rows(f"stratum 1 snapshot, stock cvmfs_swissknife pull against rcds replicate: {header}",
                   ("initial", "nothing new"), rows)  # fmt: skip
        print(
            f"nothing new, {len(polls['rcds'])} commands each, alternating (median wall): stock"
            f" {statistics.median(polls['stock']) * 1000:.1f} ms, rcds {statistics.median(polls['rcds']) * 1000:.1f} ms"
            f" (target < 100 ms: {'ok' if statistics.median(polls['rcds']) < 0.1 else 'MISSED'})"
        )
        result["snapshot_nothing_new_seconds"] = polls
        startup = min(
            timed([args.python, "-c", "pass"], dict(os.environ), scratch)["seconds"] for _ in range(3)
        )
        print(
            f"of which interpreter start-up ({args.python} -c pass, fastest of 3): {startup:.2f} s; a .pth file"
            " that imports at start-up costs every rcds row this much: --python a clean venv's interpreter"
        )
        result["snapshot"] = rows
        result["python_startup_seconds"] = startup
    if args.no_reads:
        pass
    elif "cvmfs2" not in found:
        print("reads: no cvmfs2: skipped")
    elif not fresh_fs or not os.path.exists("/dev/fuse"):
        print("reads: needs root, mkfs.ext4 (a fresh loop-mounted ext4 per tool) and /dev/fuse: skipped")
    else:
        stock = {"cvmfs2+cp": found["cvmfs2"]}
        if "cvmfs_shrinkwrap" in found:
            stock["shrinkwrap"] = found["cvmfs_shrinkwrap"]
        else:
            print("reads: no cvmfs_shrinkwrap: its rows are skipped")
        rows = reads_side_by_side(stock, rcds, info, spec.key, workdir, scratch, args.jobs, args.repeat)
        names = tuple(stock)
        print_rows(f"FUSE-less read of the CID, stock {' and '.join(names)} against rcds get: {header}",
                   ("cold", "warm"), rows, names)  # fmt: skip
        cold = {n: _median(rows[f"{n} cold"])["seconds"] for n in (*names, "rcds")}
        print("target: get cold at least 2x faster: " + "; ".join(
            f"{n} / rcds {cold[n] / cold['rcds']:.2f} {'ok' if cold[n] >= 2 * cold['rcds'] else 'MISSED'}"
            for n in names
        ))  # fmt: skip
        result["reads"] = rows
    (workdir / "stock-result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


def snapshot_side_by_side(
    swissknife: str, env: dict[str, str], rcds_cmd: list[str], info: Any, key_name: str, workdir: Path,
    scratch: Path, jobs: int, repeat: int, polls: int = 21,
) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[float]]]:  # fmt: skip
    """``swissknife pull`` and ``rcds replicate`` of the served repository, initial and nothing new; then
    ``polls`` more commands with nothing new each, alternating, timed here (``/usr/bin/time`` shows
    hundredths of a second): their wall seconds."""
    storage = get_bench.ensure_repo(Path(info.root), key_name, workdir)
    key = Repository(storage).public_key_path
    fqrn = get_bench.FQRN
    server = get_bench.RepoServer(storage)
    rows: dict[str, list[dict[str, float]]] = {}

    def stock(replica: Path) -> list[str]:
        return [
            swissknife, "pull", "-u", server.url, "-w", server.url, "-m", fqrn, "-k", str(key),
            "-r", f"local,{replica}/data/txn,{replica}", "-x", str(replica / "data" / "txn"),
            "-n", str(jobs), "-p",
        ]  # fmt: skip

    def rcds(replica: Path) -> list[str]:
        return [
            *rcds_cmd, "replicate", server.url, "--storage", str(replica),
            "--key", str(key), "--fqrn", fqrn, "--jobs", str(jobs),
        ]  # fmt: skip

    poll_seconds: dict[str, list[float]] = {"stock": [], "rcds": []}

    try:
        for i in range(repeat):
            for name, command in (("stock", stock), ("rcds", rcds)):
                replica = scratch / f"{name}-{i}"
                if name == "stock":
                    stock_layout(replica)
                rows.setdefault(f"{name} initial", []).append(timed(command(replica), env, scratch))
                rows.setdefault(f"{name} nothing new", []).append(timed(command(replica), env, scratch))
            a, b = objects(scratch / f"stock-{i}"), objects(scratch / f"rcds-{i}")
            assert a == b, (
                f"the replicas differ: {len(a - b)} objects only in stock's, {len(b - a)} only in rcds's"
            )
        for _ in range(polls):
            for name, command in (("stock", stock), ("rcds", rcds)):
                cmd = command(scratch / f"{name}-0")
                started = time.perf_counter()
                subprocess.run(cmd, env=env, cwd=scratch, check=True, capture_output=True)
                poll_seconds[name].append(time.perf_counter() - started)
    finally:
        server.close()
    return rows, poll_seconds


def stock_client_config(base: Path, server_url: str, key: Path, mount: bool) -> Path:
    """A client configuration for ``cvmfs2`` (``mount``) or ``cvmfs_shrinkwrap`` that needs nothing of
    /etc/cvmfs: the served repository without a proxy, its key, and every cache and socket under ``base``."""
    keys, cache, sockets = base / "cvmfs-keys", base / "cvmfs-cache", base / "cvmfs-sockets"
    for d in (keys, cache, sockets):
        d.mkdir(exist_ok=True)
    shutil.copy(key, keys / f"{get_bench.FQRN}.pub")
    config = base / "cvmfs.conf"
    # a mount's cache limit as an installed client's /etc/cvmfs/default.conf sets it (compiled in: 1 GiB);
    # libcvmfs (shrinkwrap) refuses any cache limit
    limits = "CVMFS_QUOTA_LIMIT=4000\nCVMFS_NFILES=131072\n" if mount else ""
    config.write_text(
        f"CVMFS_SERVER_URL={server_url}\nCVMFS_HTTP_PROXY=DIRECT\nCVMFS_KEYS_DIR={keys}\n"
        f"CVMFS_CACHE_BASE={cache}\nCVMFS_SHARED_CACHE=no\nCVMFS_USER={os.environ.get('USER', 'root')}\n"
        f"CVMFS_CLAIM_OWNERSHIP=yes\nCVMFS_RELOAD_SOCKETS={sockets}\nCVMFS_MOUNT_DIR={base}\n{limits}"
    )
    return config


def mount_and_copy(
    cvmfs2: str, env: dict[str, str], config: Path, mountpoint: Path, dest: Path
) -> dict[str, float]:
    """``cvmfs2`` mounts the repository at ``mountpoint`` (in the foreground, under /usr/bin/time), ``cp -r``
    copies the CID out of it, the mount is taken down. Wall seconds from the start of ``cvmfs2`` to its exit;
    CPU seconds of ``cvmfs2`` and ``cp`` added up; peak RSS the larger of the two."""
    mountpoint.mkdir(exist_ok=True)
    # disable_watchdog: no crash-handler process, which would outlive the mount (and keep the file system busy)
    options = f"config={config},fsname=cvmfs2,disable_watchdog"
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        t0 = time.perf_counter()
        daemon = subprocess.Popen(
            [TIME, "-o", out.name, "-f", TIME_FORMAT, cvmfs2, "-f", "-o", options, get_bench.FQRN, str(mountpoint)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            while not os.path.ismount(mountpoint):
                if daemon.poll() is not None:
                    raise SystemExit(f"cvmfs2 did not mount ({daemon.returncode}): {daemon.communicate()[0]}")
                time.sleep(0.002)
            copy = timed(
                ["cp", "-r", str(mountpoint / get_bench.CID.lstrip("/")), str(dest)], env, dest.parent
            )
        finally:
            if os.path.ismount(mountpoint):
                subprocess.run(["umount", str(mountpoint)], check=True)
            output, _ = daemon.communicate(timeout=120)
        seconds = time.perf_counter() - t0
        if daemon.returncode != 0:
            raise SystemExit(f"cvmfs2 failed ({daemon.returncode}): {output[-2000:]}")
        mount = time_figures(out.read())
    return {
        "seconds": seconds,
        "cpu_seconds": mount["cpu_seconds"] + copy["cpu_seconds"],
        "peak_rss_mib": max(mount["peak_rss_mib"], copy["peak_rss_mib"]),
        "copy_seconds": copy["seconds"],
    }


def listing(root: Path) -> set[tuple[str, str, int]]:
    """Every entry under ``root``: relative path, kind, size of a file (``.cvmfscatalog`` markers left out:
    the stock client shows them, rcds get does not)."""
    entries = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if name == ".cvmfscatalog":
                continue
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            entries.add((str(path.relative_to(root)), kind, st.st_size if kind == "file" else 0))
    return entries


def reads_side_by_side(
    stock: dict[str, tuple[str, dict[str, str]]], rcds_cmd: list[str], info: Any, key_name: str,
    workdir: Path, scratch: Path, jobs: int, repeat: int,
) -> dict[str, list[dict[str, float]]]:  # fmt: skip
    """FUSE-less reads of the CID, cold then warm, by each tool in ``stock`` (``cvmfs2+cp``, ``shrinkwrap``: its
    program and environment) and by ``rcds get``, each tool on a fresh ext4 (destinations and caches), alternating."""
    storage = get_bench.ensure_repo(Path(info.root), key_name, workdir)
    key = Repository(storage).public_key_path
    fqrn, cid = get_bench.FQRN, get_bench.CID
    server = get_bench.RepoServer(storage)
    # rcds get with nothing from this machine's client configuration or RCDS_* variables
    empty_config = scratch / "client.toml"
    empty_config.touch()
    rcds_env = {k: v for k, v in os.environ.items() if not k.startswith("RCDS_")}
    rcds_env["RCDS_CLIENT_CONFIG"] = str(empty_config)
    stratum = server.url.rsplit("/", 1)[0] + "/@fqrn@"

    def cvmfs2_cp(fs: Path, dest: Path) -> dict[str, float]:
        program, env = stock["cvmfs2+cp"]
        return mount_and_copy(program, env, stock_client_config(fs, server.url, key, True), fs / "mnt", dest)

    def shrinkwrap(fs: Path, dest: Path) -> dict[str, float]:
        program, env = stock["shrinkwrap"]
        spec = fs / "spec"
        spec.write_text(f"{cid}*\n")
        config = stock_client_config(fs, server.url, key, False)
        cmd = [program, "-r", fqrn, "-f", str(config), "-t", str(spec), "-x", str(dest), "-j", str(jobs),
               "-p", "0"]  # fmt: skip
        return timed(cmd, env, fs)

    def rcds_get(fs: Path, dest: Path) -> dict[str, float]:
        cmd = [*rcds_cmd, "get", f"/cvmfs/{fqrn}{cid}", str(dest), "--cache", str(fs / "rcds-cache"),
               "--keys", str(key), "--stratum-url", stratum, "--jobs", str(jobs), "-q"]  # fmt: skip
        return timed(cmd, rcds_env, fs)

    tools = {"cvmfs2+cp": cvmfs2_cp, "shrinkwrap": shrinkwrap, "rcds": rcds_get}
    tools = {name: fn for name, fn in tools.items() if name in stock or name == "rcds"}
    where_tree = {"cvmfs2+cp": "", "shrinkwrap": f"{fqrn}{cid}", "rcds": ""}  # the CID in each destination
    # room for inodes too: each cvmfs_shrinkwrap destination has 65,792 directories in its .data (sparse image)
    size = 4 * info.total_bytes + (4 << 30)
    rows: dict[str, list[dict[str, float]]] = {}
    try:
        for i in range(repeat):
            seen: dict[str, set[tuple[str, str, int]]] = {}
            for name in list(tools) if i % 2 == 0 else list(tools)[::-1]:
                with ingest_bench.fresh_filesystem(scratch, size) as fs:
                    for step in ("cold", "warm"):  # warm: a new destination, the caches the cold run filled
                        os.sync()  # the previous step's writes are not charged to this one
                        r = tools[name](fs, fs / f"dest-{step}")
                        rows.setdefault(f"{name} {step}", []).append(r)
                        _say(name, step, r)
                    seen[name] = listing(fs / "dest-cold" / where_tree[name])
            first = seen["rcds"]
            for name, entries in seen.items():
                assert entries == first, (
                    f"{name} read {len(entries - first)} entries rcds get did not, missed {len(first - entries)}"
                )
    finally:
        server.close()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
