#!/usr/bin/env python3
"""Benchmark of a daily cleanup: expiry of unused CIDs, then garbage collection, on a large repository.

It reuses the repository ``bench/gc.py`` builds and caches (10,000 CIDs at ``/sw/gNNN/<cid>``, about
1,000,000 objects; 5,000 CIDs removed one day after the build, one small CID added at day 5). On a
hard-link scratch copy, in one fresh subprocess (so its peak RSS is its own):

1. **plan**: scan the CIDs and ts records of the live revision and pick the expired ones, as of day 40,
   with every other remaining CID marked used at day 35 in the last-use state (so half of them expire);
2. **apply**: one revision removing the expired CIDs (day 40), then an ordinary revision at day 41 (so
   ``trunk-previous``, which GC keeps like any tag, no longer holds the expired CIDs);
3. **gc**: ``collect_garbage`` as of day 44 (3-day horizon): the build's revisions and the expired CIDs
   go (the half removed at day 1, then half of the rest).

Targets (the issue's): cleanup plus GC under 5 minutes, peak RSS under 500 MB.

    python bench/cleanup.py --cids 1000       # 100,000 objects
    python bench/cleanup.py                   # 10,000 CIDs, ~1,000,000 objects
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# bench/gc.py builds and caches the repository; loaded by path, since "gc" is also a standard module.
_spec = importlib.util.spec_from_file_location("gc_bench", Path(__file__).resolve().parent / "gc.py")
assert _spec is not None and _spec.loader is not None
gc_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc_bench)

DAY = 86400

CHILD = r"""
import json, sys, time
from pathlib import Path
from rcds.cvmfs.gc import collect_garbage
from rcds.cvmfs.repository import Repository
from rcds.publish.cleanup import apply_cleanup, plan_cleanup
from rcds.publish.presence import StorageView, scan_cid_dirs

storage, t0 = Path(sys.argv[1]), int(sys.argv[2])
repo = Repository(storage)
with StorageView(storage) as view:
    cids = sorted(scan_cid_dirs(view, "sw"))
used = {cid: t0 + 35 * 86400 for cid in cids[::2]}  # every other one was used recently
times = {}
started = time.monotonic()
plan = plan_cleanup(repo.fqrn, {repo.fqrn: storage}, used, "sw", 30, t0 + 40 * 86400)
times["plan"] = time.monotonic() - started
started = time.monotonic()
revision = apply_cleanup(repo, plan, "sw", clock=lambda: t0 + 40 * 86400)
times["apply"] = time.monotonic() - started
# A day of ordinary publishing follows (trunk-previous, kept like any tag, is then the cleanup's revision).
with repo.transaction() as txn:
    txn.clock = lambda: t0 + 41 * 86400
    txn.mkdir("/sw/next-day")
    txn.commit()
started = time.monotonic()
report = collect_garbage(repo, now=t0 + 44 * 86400)
times["gc"] = time.monotonic() - started
peak = 0
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        peak = int(line.split()[1]) // 1024
print(json.dumps({
    "cids": len(cids), "expired": len(plan.expired), "kept": plan.kept, "revision": revision,
    "seconds": {k: round(v, 2) for k, v in times.items()}, "total_seconds": round(sum(times.values()), 2),
    "objects_swept": report.objects_swept, "catalogs_swept": report.catalogs_swept,
    "bytes_freed": report.bytes_freed, "peak_rss_mib": peak,
}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    ap.add_argument("--cids", type=int, default=10_000)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--batch", type=int, default=500)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    storage = args.workdir / f"gc-v{gc_bench.GEN_VERSION}-{args.cids}x{args.files}"
    built = gc_bench.build(storage, args.cids, args.files, args.batch)
    scratch = args.workdir / "cleanup-scratch"
    gc_bench.scratch_copy(storage, scratch)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(scratch), str(built["t0"])], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"cleanup failed:\n{proc.stderr}")
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    s = result["seconds"]
    swept = result["objects_swept"] + result["catalogs_swept"]
    print(f"rcds cleanup + gc: {result['cids']} CIDs, {built['objects']} objects before")
    print(f"  plan   {s['plan']:8.2f} s  ({result['expired']} expired, {result['kept']} kept)")
    print(f"  apply  {s['apply']:8.2f} s  (one revision)")
    print(f"  gc     {s['gc']:8.2f} s  ({swept} objects and catalogs, {result['bytes_freed']:,} bytes)")
    print(
        f"  total  {result['total_seconds']:8.2f} s  (target < 300 s); peak RSS {result['peak_rss_mib']} MiB (< 500)"
    )
    print(f"  swept per second (gc): {swept / max(s['gc'], 1e-9):,.0f}")
    print(json.dumps({"benchmark": "rcds-cleanup", "build": built, **result}))


if __name__ == "__main__":
    main()
