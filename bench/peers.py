#!/usr/bin/env python3
"""Delay from upload to "readable on the other server's replica", with two real ``rcds serve`` peers.

Server A owns ``a1``/``a2``, server B owns ``b1``/``b2``; each replicates the other's repositories every
``--interval`` seconds (default 15, the original's stratum 1 polling). For each of ``--publishes`` small
uploads (100 files, ~1 MB) to A, the clock runs from the start of the upload until a client reading
**B's replica** over HTTP (fresh signed manifest, catalog lookup, the file's bytes) finds the CID, polled
every 0.05 s. Also reported: until A answers PRESENT (the publish itself) and until B answers PRESENT.
Uploads are spaced by a random 0-``--interval`` s so that they do not line up with the polling.

Target: p50 under 20 s with a 15 s interval (the original's end to end: 2-3 minutes).

``--modes polling,notifications`` (the default) runs the same measurement twice in one run: once with the
replicas only polling (``notifications = false``), once with B following A's notification stream
(``/api/v1/notifications/subscribe``) as well; target with notifications: p50 readable on the replica < 1 s.

    python bench/peers.py                     # 20 publishes per mode, 15 s interval: ~10-15 minutes
    python bench/peers.py --publishes 5 --interval 5
    python bench/peers.py --modes notifications --publishes 50
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contextlib

from publish import free_port, pct, small_tarball
from rcds.cvmfs.reader import ReaderError, RepositoryReader

A_REPOS = ("a1.peers.bench", "a2.peers.bench")
B_REPOS = ("b1.peers.bench", "b2.peers.bench")


class Peer:
    def __init__(self, root: Path, own: tuple[str, ...]) -> None:
        self.root, self.own = root, own
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def storage(self, repo: str) -> Path:
        return self.root / "data" / repo

    def key(self, repo: str) -> Path:
        return self.storage(repo) / ".rcds" / "keys" / f"{repo}.pub"

    def configure(self, other: Peer, interval: float, notifications: bool = True) -> None:
        lines = [f'data_dir = "{self.root / "data"}"', f"replica_interval = {interval}", "auto_cleanup = false",
                 "[server]", f'http = ["127.0.0.1:{self.port}"]', "[auth]", 'gridmapfile = ""']  # fmt: skip
        for r in self.own:
            lines += ["[[repository]]", f'name = "{r}"']
        for r in other.own:
            lines += ["[[repository]]", f'name = "{r}"', "local = false", f'upstream = "{other.url}/cvmfs/{r}"',
                      f'public_key = "{other.key(r)}"']  # fmt: skip
            if not notifications:
                lines.append("notifications = false")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "rcds.toml").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rcds.cli", "serve", "--config", str(self.root / "rcds.toml"),
             "--log-format", "json"],
            stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/pubapi/ping").text == "OK\n":
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)


def one(a: Peer, b: Peer, cid: str, data: bytes, readers: dict[str, RepositoryReader]) -> dict[str, float]:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    with httpx.Client(timeout=60) as c:
        if c.post(f"{a.url}/pubapi/publish", params={"cid": cid}, content=data).text != "OK\n":
            raise RuntimeError(f"publish {cid} refused")
        path = ""
        while "a_present" not in times:
            text = c.get(f"{a.url}/pubapi/exists", params={"cid": cid}).text
            if text.startswith("PRESENT:"):
                times["a_present"] = time.perf_counter() - t0
                path = text.strip().removeprefix("PRESENT:")
            else:
                time.sleep(0.01)
        repo = path.split("/")[2]
        while "replica_readable" not in times or "b_present" not in times:
            if "b_present" not in times and c.get(
                f"{b.url}/pubapi/exists", params={"cid": cid}
            ).text.startswith("PRESENT:"):
                times["b_present"] = time.perf_counter() - t0
            if "replica_readable" not in times:
                try:
                    reader = readers[repo]
                    reader.load_manifest(fresh=True)
                    if reader.lookup(f"sw/{cid}/pkg/mod0/file0.py") is not None:
                        reader.read(f"sw/{cid}/pkg/mod0/file0.py")
                        times["replica_readable"] = time.perf_counter() - t0
                except ReaderError:
                    pass
            time.sleep(0.05)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench/peers"))
    ap.add_argument("--publishes", type=int, default=20)
    ap.add_argument("--interval", type=float, default=15.0)
    ap.add_argument(
        "--modes", default="polling,notifications", help="comma-separated: polling, notifications"
    )
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"polling", "notifications"}:
        ap.error("--modes takes polling and/or notifications")
    summaries = {mode: run_mode(args, mode) for mode in modes}
    print(json.dumps({"benchmark": "rcds-peers", "interval": args.interval, "modes": summaries}))


def run_mode(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    workdir = args.workdir / mode
    if workdir.exists():
        shutil.rmtree(workdir)
    a, b = Peer(workdir / "a", A_REPOS), Peer(workdir / "b", B_REPOS)
    a.configure(b, args.interval, notifications=mode == "notifications")
    b.configure(a, args.interval, notifications=mode == "notifications")
    a.start()
    b.start()
    results: list[dict[str, float]] = []
    readers: dict[str, RepositoryReader] = {}
    try:
        deadline = time.monotonic() + 5 * args.interval + 60
        while len(readers) < len(A_REPOS):  # B's first snapshots of A's repositories
            for r in A_REPOS:
                if r not in readers:
                    with contextlib.suppress(ReaderError):
                        readers[r] = RepositoryReader.open(f"{b.url}/cvmfs/{r}", a.key(r), fqrn=r)
            if time.monotonic() > deadline:
                raise RuntimeError("B never replicated A's repositories")
            time.sleep(0.5)
        for i in range(args.publishes):
            time.sleep(random.uniform(0, args.interval))
            t = one(a, b, f"delay/{i}-{random.randrange(10**9)}", small_tarball(i), readers)
            results.append(t)
            print(f"[bench] {mode} {i + 1}/{args.publishes}: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for r in readers.values():
            r.close()
        a.stop()
        b.stop()
    summary: dict[str, Any] = {"publishes": len(results), "interval": args.interval}
    print(f"{mode}: delay from upload start, {len(results)} publishes, replica interval {args.interval:g} s")
    print(f"{'until':24} {'p50':>8} {'p95':>8} {'max':>8}")
    for key, label in (("a_present", "A says PRESENT"), ("b_present", "B says PRESENT"),
                       ("replica_readable", "readable on B's replica")):  # fmt: skip
        values = [r[key] for r in results]
        summary[key] = {"p50": pct(values, 0.5), "p95": pct(values, 0.95), "max": max(values),
                        "mean": statistics.mean(values)}  # fmt: skip
        print(f"{label:24} {pct(values, 0.5):7.2f}s {pct(values, 0.95):7.2f}s {max(values):7.2f}s")
    limit = 1.0 if mode == "notifications" else 20.0
    ok = summary["replica_readable"]["p50"] < limit
    print(f"target: p50 readable on the replica < {limit:g} s: {'met' if ok else 'MISSED'}\n")
    return summary


if __name__ == "__main__":
    main()
