#!/usr/bin/env python3
"""Benchmark of garbage collection (``rcds.cvmfs.gc.collect_garbage``) on a large repository.

1. builds (once, cached in ``--workdir`` as ``gc-v<V>-<cids>x<files>/`` + ``.json`` marker written last)
   a repository with ``--cids`` CIDs at ``/sw/gNNN/<cid>`` (every CID and every group a nested catalog, as
   rcds publishes them; 100 CIDs per group), each with ``--files`` small distinct files, published
   ``--batch`` CIDs per transaction at time T0; then one transaction at T0 + 1 day removes every other
   CID, and one at T0 + 5 days adds a last small CID. With the default 3-day horizon, a GC at T0 + 5 days
   keeps the last two revisions and sweeps every build revision: the removed half of the objects;
2. makes a scratch copy of it (hard links: ``cp -al``; the SQLite files changed in place are real copies)
   so that the cached repository stays intact;
3. runs ``collect_garbage`` twice, each in a fresh subprocess that reports its own peak RSS: first a dry
   run, then the real run; then (unless ``--no-check``) ``check_repository`` without object hashing on the
   result, and a second GC that must find nothing. Peak RSS is the child's ``VmHWM`` (reset by ``exec``);
   ``getrusage`` of the child is printed too, but on Linux its ``ru_maxrss`` also counts the parent's
   memory at the time of the fork (after the checker ran, the parent is several hundred MB).

Targets: the real GC under 5 minutes and peak RSS under 500 MB at 10,000 CIDs / 1,000,000 objects.

    python bench/gc.py --cids 1000            # 100,000 objects: ~1 min to build, seconds to run
    python bench/gc.py                        # 10,000 CIDs, 1,000,000 objects: see bench/README.md
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import EntryKind, TreeEntry

FQRN = "gc.bench.local"
DAY = 86400
GEN_VERSION = 1  # bump when the way the repository is built changes: part of its cache key
TARGET_SECONDS = 300
TARGET_RSS_MB = 500
CIDS_PER_GROUP = 100

CHILD = r"""
import json, resource, sys, time
from rcds.cvmfs.gc import collect_garbage
from rcds.cvmfs.repository import Repository

phases = {}
t0 = time.monotonic()

def progress(phase, done, total):
    phases.setdefault(phase, round(time.monotonic() - t0, 3))

report = collect_garbage(Repository(sys.argv[1]), now=float(sys.argv[2]), dry_run=sys.argv[3] == "dry",
                         progress=progress)
seconds = time.monotonic() - t0
doc = {k: v for k, v in vars(report).items() if k != "revisions_kept"}
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
doc.update(revisions_kept=len(report.revisions_kept), wall_seconds=round(seconds, 2), phase_starts=phases,
           peak_rss_mib=round(hwm / 1024, 1),
           getrusage_maxrss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
print(json.dumps(doc))
"""


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cid_path(i: int) -> str:
    return f"/sw/g{i // CIDS_PER_GROUP:03d}/" + hashlib.sha256(f"cid-{i}".encode()).hexdigest()


def cid_tree(i: int, files: int) -> Iterator[TreeEntry]:
    """``files`` distinct text files of ~300 bytes in two directories (like a small code drop)."""
    yield TreeEntry("", EntryKind.DIRECTORY, 0o755, 1)
    yield TreeEntry("src", EntryKind.DIRECTORY, 0o755, 1)
    for j in range(files):
        seed = hashlib.blake2b(f"{i}/{j}".encode()).hexdigest()
        data = (
            f"# file {j} of CID {i}\n" + "\n".join(seed[k:] + seed[:k] for k in (0, 16, 32, 48)) + "\n"
        ).encode()
        name = f"src/m{j}.py" if j % 2 else f"f{j}.txt"
        yield TreeEntry(name, EntryKind.FILE, 0o644, 1, size=len(data), stream=io.BytesIO(data))


def build(storage: Path, cids: int, files: int, batch: int) -> dict[str, Any]:
    """The repository described in the module docstring; returns its marker document."""
    marker = storage.with_name(storage.name + ".json")
    if marker.is_file() and storage.is_dir():
        return dict(json.loads(marker.read_text()))
    marker.unlink(missing_ok=True)
    if storage.exists():
        shutil.rmtree(storage)
    t0 = int(time.time())
    started = time.monotonic()
    repo = Repository.create(FQRN, storage, now=t0)

    def txn_at(when: int):  # type: ignore[no-untyped-def]
        txn = repo.transaction()
        txn.clock = lambda: when
        return txn

    with txn_at(t0) as txn:
        txn.mkdir("/sw", nested=True)
        for g in range((cids + CIDS_PER_GROUP - 1) // CIDS_PER_GROUP):
            txn.mkdir(f"/sw/g{g:03d}", nested=True)
        txn.commit()
    revisions = 1
    for first in range(0, cids, batch):
        with txn_at(t0) as txn:
            for i in range(first, min(cids, first + batch)):
                txn.add_tree(cid_path(i), cid_tree(i, files))
            txn.commit()
        revisions += 1
        done = min(cids, first + batch)
        rate = done * files / (time.monotonic() - started)
        say(f"built {done}/{cids} CIDs ({rate:.0f} files/s)")
    with txn_at(t0 + DAY) as txn:
        for i in range(0, cids, 2):
            assert txn.remove(cid_path(i))
        txn.commit()
    with txn_at(t0 + 5 * DAY) as txn:
        txn.add_tree("/sw/last/" + "0" * 64, cid_tree(cids, 1))
        txn.commit()
    seconds = time.monotonic() - started
    objects = sum(1 for _ in repo.store.iter_keys())
    doc = {
        "t0": t0,
        "cids": cids,
        "files_per_cid": files,
        "batch": batch,
        "revisions": revisions + 3,
        "objects": objects,
        "build_seconds": round(seconds, 1),
    }
    marker.write_text(json.dumps(doc))
    say(f"built the repository in {seconds:.0f} s: {objects} objects")
    return doc


def scratch_copy(storage: Path, dest: Path) -> float:
    """Hard-link copy; files SQLite changes in place are copied for real."""
    started = time.monotonic()
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["cp", "-al", str(storage), str(dest)], check=True)
    for f in (dest / ".rcds").glob("content-index.db*"):
        tmp = f.with_name(f.name + ".copy")
        shutil.copy2(f, tmp)
        os.replace(tmp, f)
    return time.monotonic() - started


def run_gc(storage: Path, now: int, dry: bool) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(storage), str(now), "dry" if dry else "real"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"gc failed: {proc.stderr}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def check(storage: Path) -> tuple[int, float]:
    from rcds.cvmfs.checker import check_repository
    from rcds.cvmfs.reader import RepositoryReader

    started = time.monotonic()
    repo = Repository(storage)
    with RepositoryReader.open(storage, repo.public_key_path) as reader:
        report = check_repository(reader, verify_objects=False)
    for issue in report.errors[:10]:
        say(f"check: {issue}")
    return len(report.errors), time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    ap.add_argument("--cids", type=int, default=10_000)
    ap.add_argument("--files", type=int, default=100, help="files per CID")
    ap.add_argument("--batch", type=int, default=500, help="CIDs per build transaction")
    ap.add_argument("--no-check", action="store_true", help="skip the checker and the second GC")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy afterwards")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    storage = args.workdir / f"gc-v{GEN_VERSION}-{args.cids}x{args.files}"
    built = build(storage, args.cids, args.files, args.batch)
    now = built["t0"] + 5 * DAY + 60
    scratch = args.workdir / "gc-scratch"
    copy_seconds = scratch_copy(storage, scratch)
    say(f"scratch copy in {copy_seconds:.0f} s; dry run ...")
    dry = run_gc(scratch, now, dry=True)
    say(f"dry run {dry['wall_seconds']} s; real run ...")
    real = run_gc(scratch, now, dry=False)
    remaining = sum(1 for p in (scratch / "data").rglob("*") if p.is_file())
    errors, check_seconds, again = None, None, None
    if not args.no_check:
        say("checking the collected repository ...")
        errors, check_seconds = check(scratch)
        again = run_gc(scratch, now, dry=False)
    if not args.keep:
        shutil.rmtree(scratch)

    swept = real["objects_swept"] + real["catalogs_swept"] + real["aux_swept"]
    rate = swept / real["wall_seconds"] if real["wall_seconds"] else 0.0
    ok_time = real["wall_seconds"] < TARGET_SECONDS
    ok_rss = real["peak_rss_mib"] * 1.048576 < TARGET_RSS_MB
    rows = [
        ("repository", f"{args.cids} CIDs x {args.files} files, {built['revisions']} revisions"),
        ("objects before", f"{built['objects']:,}"),
        ("objects after", f"{remaining:,}"),
        ("build (once, cached)", f"{built['build_seconds']} s"),
        ("dry run", f"{dry['wall_seconds']} s, peak RSS {dry['peak_rss_mib']} MiB"),
        ("getrusage maxrss", f"{real['getrusage_maxrss_mib']} MiB (includes the parent at fork time)"),
        (
            "GC wall",
            f"{real['wall_seconds']} s (target < {TARGET_SECONDS} s: {'ok' if ok_time else 'MISSED'})",
        ),
        (
            "GC peak RSS",
            f"{real['peak_rss_mib']} MiB (target < {TARGET_RSS_MB} MB: {'ok' if ok_rss else 'MISSED'})",
        ),
        (
            "swept",
            f"{real['objects_swept']:,} objects, {real['catalogs_swept']:,} catalogs, {real['aux_swept']} aux, "
            f"{real['roots_swept']} roots",
        ),
        ("bytes freed", f"{real['bytes_freed']:,} ({real['bytes_freed'] / 2**20:.1f} MiB stored)"),
        ("objects swept / s", f"{rate:,.0f}"),
        ("phase starts (s)", " ".join(f"{k}={v}" for k, v in real["phase_starts"].items())),
    ]
    if errors is not None and again is not None:
        rows.append(("check after GC", f"{errors} errors ({check_seconds:.0f} s, no object hashing)"))
        rows.append(
            (
                "second GC",
                f"{again['wall_seconds']} s, swept {again['objects_swept']} objects, "
                f"peak RSS {again['peak_rss_mib']} MiB",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    doc = {
        "benchmark": "rcds-gc",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "build": built,
        "scratch_copy_seconds": round(copy_seconds, 1),
        "dry_run": dry,
        "gc": real,
        "objects_after": remaining,
        "objects_swept_per_second": round(rate),
        "check_errors": errors,
        "second_gc": again,
        "targets_met": ok_time and ok_rss and not errors,
    }
    (args.workdir / "gc-result.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
