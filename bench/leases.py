#!/usr/bin/env python3
"""Concurrent ingest under leases against the serialized one-worker design, all figures from one run.

For each design (``ingest_slots`` by CPU count, then ``ingest_slots = 1``: one transaction ingests a whole
batch under the writer lock, as before leases), a fresh single-repository ``rcds serve`` on 127.0.0.1:

1. small-publish latency alone: a ~1 MB, 100-file tarball (``publish.py``'s), from upload start until
   ``exists`` answers ``PRESENT``; one client, ``--samples`` in a row; p50/p99;
2. the same while a 1 GiB publish (``publish.py``'s code-like tree, an uncompressed tar) is ingested in
   the same repository: small publishes one after the other from the moment the big one is being
   ingested until it is live (at most ``--samples``); p50/p99 and their ratio to step 1 (target <= 2);
3. publishes per second with 50 concurrent clients (``--burst`` small publishes, each client polling
   ``exists`` until its CID is present).

Prints a table and a final JSON line (also written to ``<workdir>/leases-result.json``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import publish as pub

REPO = "solo.bench.local"
GROUP = "bench"


def start_server(root: Path, slots: int) -> pub.Server:
    """A single-repository ``rcds serve`` with ``ingest_slots`` (0: by CPU count)."""
    return pub.Server(root, repos=(REPO,), settings=(f"ingest_slots = {slots}",))


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "samples": len(values),
        "p50_s": round(pub.pct(values, 0.5), 4) if values else None,
        "p99_s": round(pub.pct(values, 0.99), 4) if values else None,
    }


def state_of(client: httpx.Client, cid: str) -> str:
    return str(client.get("/pubapi/status", params={"cid": cid}).json()["state"])


def during_big(url: str, big_tar: Path, small: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Small publishes in a row while the big one is ingested; the big one's own time."""
    client = httpx.Client(base_url=url, timeout=1800)
    answer: list[str] = []
    t0 = time.perf_counter()

    def upload() -> None:
        with big_tar.open("rb") as f:
            answer.append(client.post("/pubapi/publish", params={"cid": f"{GROUP}/big"}, content=f).text)

    uploader = threading.Thread(target=upload)
    uploader.start()
    while state_of(client, f"{GROUP}/big") != "publishing":
        time.sleep(0.01)
    ingest_started = time.perf_counter()
    uploader.join()
    assert answer == ["OK\n"], answer
    latencies: list[float] = []
    todo = list(small)
    while todo and state_of(client, f"{GROUP}/big") != "published":
        cid, data = todo.pop(0)
        latencies.append(pub.publish_and_wait(client, cid, data, timeout=1800))
    while not client.get("/pubapi/exists", params={"cid": f"{GROUP}/big"}).text.startswith("PRESENT"):
        time.sleep(0.05)
    done = time.perf_counter()
    return {
        **summary(latencies),
        "big_upload_s": round(ingest_started - t0, 2),
        "big_ingest_to_present_s": round(done - ingest_started, 2),
    }


def run_design(work: Path, slots: int, big_tar: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    root = work / f"leases-slots{slots}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    srv = start_server(root, slots)
    n = args.samples
    small = [(f"{GROUP}/s{seed + i:06d}", pub.small_tarball(seed + i)) for i in range(2 * n + args.burst)]
    out: dict[str, Any] = {"ingest_slots": slots or os.cpu_count()}
    try:
        with httpx.Client(base_url=srv.url, timeout=600) as client:
            pub.publish_and_wait(client, f"{GROUP}/warmup", pub.small_tarball(seed - 1))
            out["alone"] = summary([pub.publish_and_wait(client, c, d) for c, d in small[:n]])
        print(f"  slots={slots or 'auto'} alone:", out["alone"], flush=True)
        out["during_1gib"] = during_big(srv.url, big_tar, small[n : 2 * n])
        print(f"  slots={slots or 'auto'} during a 1 GiB publish:", out["during_1gib"], flush=True)
        alone, during = out["alone"], out["during_1gib"]
        out["ratio_p50"] = round(during["p50_s"] / alone["p50_s"], 2)
        out["ratio_p99"] = round(during["p99_s"] / alone["p99_s"], 2)
        out["burst_50_clients"] = pub.latency(srv.url, small[2 * n :], 50)
        print(f"  slots={slots or 'auto'} 50 clients:", out["burst_50_clients"], flush=True)
    finally:
        srv.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench-leases"))
    ap.add_argument("--samples", type=int, default=30, help="small publishes alone, and at most during")
    ap.add_argument("--burst", type=int, default=200, help="small publishes sent by the 50 clients")
    ap.add_argument("--large-gib", type=float, default=1.0)
    args = ap.parse_args(argv)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print("building the large tarball (cached) ...", flush=True)
    _tree, big_tar = pub.large_tar(work, args.large_gib)
    pub.warm(big_tar)
    result: dict[str, Any] = {"cpus": os.cpu_count(), "big_tar_bytes": big_tar.stat().st_size}
    for i, slots in enumerate((0, 1)):  # 0: by CPU count (the default); 1: the serialized design
        print(f"ingest_slots = {slots} ...", flush=True)
        result[f"slots_{slots or 'auto'}"] = run_design(work, slots, big_tar, args, seed=100_000 * (i + 1))
    new, old = result["slots_auto"], result["slots_1"]
    print()
    print(f"{'':34} {'leases (slots=auto)':>20} {'one worker (slots=1)':>22}")
    for label, key in (("alone p50 / p99 s", "alone"), ("during 1 GiB p50 / p99 s", "during_1gib")):
        a, b = new[key], old[key]
        print(f"{label:34} {a['p50_s']:>9} / {a['p99_s']:<9} {b['p50_s']:>10} / {b['p99_s']:<10}")
    print(f"{'ratio during/alone p50 / p99':34} {new['ratio_p50']:>9} / {new['ratio_p99']:<9} "
          f"{old['ratio_p50']:>10} / {old['ratio_p99']:<10}")  # fmt: skip
    print(f"{'1 GiB: ingest start to PRESENT s':34} {new['during_1gib']['big_ingest_to_present_s']:>20} "
          f"{old['during_1gib']['big_ingest_to_present_s']:>22}")  # fmt: skip
    print(f"{'50 clients: publishes/s':34} {new['burst_50_clients']['publishes_per_s']:>20} "
          f"{old['burst_50_clients']['publishes_per_s']:>22}")  # fmt: skip
    line = json.dumps(result)
    (work / "leases-result.json").write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
