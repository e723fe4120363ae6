"""How the cost of one publish grows with the number of CIDs already in the same group directory.

Publishes one small CID per commit into ``/sw/grp`` of a fresh repository with 0, 1,000 and 10,000 CIDs
already present (filled in batches of 500 per commit), and prints the median commit latency of 15 single
publishes at each size (after one warm-up), the ratio to the empty case, and the group catalog's size.

    python bench/catalog_scaling.py [--workdir /tmp/rcds-bench] [--sizes 0,1000,10000]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from rcds.cvmfs.hashes import Suffix
from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import EntryKind, TreeEntry


def small_tree(i: int) -> Iterator[TreeEntry]:
    data = f"print({i})\n".encode()
    yield TreeEntry("", EntryKind.DIRECTORY, 0o755, 1)
    yield TreeEntry("main.py", EntryKind.FILE, 0o644, 1, size=len(data), stream=io.BytesIO(data))


def cid(i: int) -> str:
    return "/sw/grp/" + hashlib.sha256(str(i).encode()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    ap.add_argument("--sizes", default="0,1000,10000")
    args = ap.parse_args()
    storage = args.workdir / "catalog-scaling"
    shutil.rmtree(storage, ignore_errors=True)
    repo = Repository.create("scaling.rcds.local", storage)
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        txn.mkdir("/sw/grp", nested=True)
        txn.commit()
    n = 0
    results = []
    for target in (int(s) for s in args.sizes.split(",")):
        while n < target:
            with repo.transaction() as txn:
                for _ in range(min(500, target - n)):
                    txn.add_tree(cid(n), small_tree(n))
                    n += 1
                txn.commit()
        latencies = []
        for k in range(16):  # the first one warms caches and is not counted
            t0 = time.perf_counter()
            with repo.transaction() as txn:
                txn.add_tree(cid(10**9 + n), small_tree(n))
                txn.commit()
            if k:
                latencies.append(time.perf_counter() - t0)
            n += 1
        root = repo.open_catalog(repo.manifest().root_catalog)
        sw_ref = root.nested_ref("/sw")
        assert sw_ref is not None
        group_ref = repo.open_catalog(sw_ref.hash).nested_ref("/sw/grp")
        assert group_ref is not None
        stored = repo.store.size(group_ref.hash.object_name(Suffix.CATALOG))
        results.append(
            {"cids": n, "p50_ms": round(statistics.median(latencies) * 1000, 1),
             "group_catalog_bytes": group_ref.size, "group_catalog_stored_bytes": stored}
        )  # fmt: skip
    base = results[0]["p50_ms"]
    for r in results:
        r["ratio_to_first"] = round(r["p50_ms"] / base, 2)
        print(
            f"{r['cids']:>6} CIDs in the group: publish p50 {r['p50_ms']:7.1f} ms  (x{r['ratio_to_first']:.2f})  "
            f"group catalog {r['group_catalog_bytes'] / 1e6:.2f} MB, {r['group_catalog_stored_bytes'] / 1e6:.2f} MB stored"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
