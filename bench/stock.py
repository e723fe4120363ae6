#!/usr/bin/env python3
"""Side by side with the stock CVMFS tools: a stratum 1 snapshot, initial and with nothing new.

The same repository (the ``get.py`` repository of the ``ingest.py`` tree, published once with rcds) is
served by ``rcds.web.repo_http`` on 127.0.0.1; ``cvmfs_swissknife pull`` and ``rcds replicate`` each
snapshot it into a fresh directory, then again with nothing new. Each is a whole command run under
``/usr/bin/time`` (wall seconds, CPU seconds, peak RSS of that command alone), alternating stock and rcds
``--repeat`` times; the fastest run of each is reported with its ratio. Both replicas must end up with
the same objects.

    RCDS_CVMFS_BIN=/path/to/cvmfs/build/cvmfs python bench/stock.py --size-gib 0.1

The stock tools are looked up in ``$RCDS_CVMFS_BIN`` (also put on ``LD_LIBRARY_PATH``, for a build tree),
then on ``PATH``; without them the script says so and exits 0. Nothing of CVMFS is part of rcds.
Ingest (``cvmfs_server publish``) and reads through a ``cvmfs2`` mount need a configured stratum 0 and
FUSE, and are not measured here yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import get as get_bench  # the served repository
import ingest as ingest_bench  # the tree
from rcds.cvmfs.repository import Repository

MB = 1_000_000
TIME = "/usr/bin/time"


def find_swissknife() -> tuple[str, dict[str, str]] | None:
    env = dict(os.environ)
    where = os.environ.get("RCDS_CVMFS_BIN")
    if where:
        tool = Path(where) / "cvmfs_swissknife"
        if tool.is_file():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [where, env.get("LD_LIBRARY_PATH")]))
            return str(tool), env
    found = shutil.which("cvmfs_swissknife")
    return (found, env) if found else None


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Wall, CPU seconds and peak RSS of one command, measured by /usr/bin/time around it alone."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        done = subprocess.run(
            [TIME, "-o", out.name, "-f", "%e %U %S %M", *cmd],
            env=env, cwd=cwd, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(
                f"{cmd[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        wall, user, system, rss_kib = out.read().split()[-4:]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, default=0.1, help="tree size (default 0.1)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=8, help="download threads of both tools (default 8)")
    args = parser.parse_args(argv)
    tool = find_swissknife()
    if tool is None:
        print(
            "stock CVMFS tools not found (set RCDS_CVMFS_BIN to the directory of cvmfs_swissknife): skipped"
        )
        return 0
    if not Path(TIME).is_file():
        print(f"{TIME} not found (apt-get install time): skipped")
        return 0
    swissknife, env = tool
    workdir: Path = args.workdir.resolve()
    spec = ingest_bench.TreeSpec(args.size_gib)
    info, _ = ingest_bench.ensure_tree(spec, workdir)
    storage = get_bench.ensure_repo(Path(info.root), spec.key, workdir)
    key = Repository(storage).public_key_path
    fqrn = get_bench.FQRN
    scratch = workdir / "stock-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    server = get_bench.RepoServer(storage)
    rows: dict[str, list[dict[str, float]]] = {}

    def stock(replica: Path) -> list[str]:
        return [
            swissknife, "pull", "-u", server.url, "-w", server.url, "-m", fqrn, "-k", str(key),
            "-r", f"local,{replica}/data/txn,{replica}", "-x", str(replica / "data" / "txn"),
            "-n", str(args.jobs), "-p",
        ]  # fmt: skip

    def rcds(replica: Path) -> list[str]:
        return [
            sys.executable, "-m", "rcds.cli", "replicate", server.url, "--storage", str(replica),
            "--key", str(key), "--fqrn", fqrn, "--jobs", str(args.jobs),
        ]  # fmt: skip

    try:
        for i in range(args.repeat):
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
    finally:
        server.close()
    best = {step: min(runs, key=lambda r: r["seconds"]) for step, runs in rows.items()}
    n = len(objects(scratch / "rcds-0"))
    print(
        f"stratum 1 snapshot, stock cvmfs_swissknife pull against rcds replicate: {info.total_bytes / MB:.0f} MB "
        f"tree, {n} objects, served by repo_http on 127.0.0.1; {os.cpu_count()} CPUs; best of {args.repeat}"
    )
    print(f"{'step':<22}{'seconds':>9}{'CPU s':>8}{'RSS MiB':>9}{'stock/rcds':>12}")
    for step in ("initial", "nothing new"):
        for name in ("stock", "rcds"):
            r = best[f"{name} {step}"]
            ratio = best[f"stock {step}"]["seconds"] / r["seconds"] if name == "rcds" else 1.0
            print(
                f"{name + ' ' + step:<22}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}"
                f"{r['peak_rss_mib']:>9.0f}{ratio:>12.2f}"
            )
    result: dict[str, Any] = {"benchmark": "rcds-stock", "objects": n, "runs": rows, "best": best}
    (workdir / "stock-result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
