#!/usr/bin/env python3
"""End-to-end benchmark of the publish service (``rcds serve``), all figures from one run.

1. small-publish latency: a ~1 MB, 100-file tarball, from the start of the upload until ``exists``
   answers ``PRESENT`` (polled every 5 ms); p50/p99 with 1 client and with 20 concurrent clients;
2. ``exists`` requests per second (keep-alive connections, 64 in flight, from one client process on the
   same machine, so client and server share the cores);
3. large publish: a 1 GiB tar of the code-like tree of ``bench/ingest.py``, and the same as a .tar.gz
   (``gzip -6``), each from upload start to ``PRESENT``, as a ratio to the repository core ingesting the
   same file in-process (``add_tree(tar_entries(...))``), measured side by side (target: service/core
   <= 1.0); also the core's ``add_directory`` of the unpacked tree. ``--large-only`` runs only this step;
4. the small-publish latency (1 client) with 10,000 CIDs already published in the same group of every
   repository, as a ratio to the empty server of step 1.

Servers run as real subprocesses on 127.0.0.1 with the default two repositories. Prints a table and a
final JSON line (also written to ``<workdir>/publish-result.json``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench

REPOS = ("user1.bench.local", "user2.bench.local")
GROUP = "bench"
MB = 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``rcds serve`` on 127.0.0.1 with ``repos``; ``settings``: top-level configuration lines."""

    def __init__(self, root: Path, repos: tuple[str, ...] = REPOS, settings: tuple[str, ...] = ()) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        lines = [f'data_dir = "{root / "data"}"', *settings, "[server]", f'http = ["127.0.0.1:{self.port}"]',
                 "[auth]", 'gridmapfile = ""']  # fmt: skip
        for r in repos:
            lines += ["[[repository]]", f'name = "{r}"']
        (root / "rcds.toml").write_text("\n".join(lines) + "\n")
        log = open(root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rcds.cli",
                "serve",
                "--config",
                str(root / "rcds.toml"),
                "--log-format",
                "json",
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/pubapi/ping").text == "OK\n":
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "server.log").read_text()[-3000:])
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(300)


def small_tarball(seed: int, files: int = 100, size: int = 1 * MB) -> bytes:
    """~``size`` bytes of text-like content in ``files`` files; unique per seed; uncompressed tar."""
    rng = __import__("random").Random(seed)
    words = [f"w{rng.randrange(10**6)}" for _ in range(400)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(files):
            text = " ".join(rng.choice(words) for _ in range(size // files // 8)).encode()[: size // files]
            info = tarfile.TarInfo(f"pkg/mod{i // 10}/file{i}.py")
            info.size = len(text)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(text))
    return buf.getvalue()


def publish_and_wait(
    client: httpx.Client, cid: str, data: bytes, timeout: float = 600, poll: float = 0.005
) -> float:
    t0 = time.perf_counter()
    r = client.post("/pubapi/publish", params={"cid": cid}, content=data)
    if r.text != "OK\n":
        raise RuntimeError(f"publish {cid}: {r.status_code} {r.text}")
    while True:
        if client.get("/pubapi/exists", params={"cid": cid}).text.startswith("PRESENT:"):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(cid)
        time.sleep(poll)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def latency(url: str, tarballs: list[tuple[str, bytes]], clients: int) -> dict[str, Any]:
    results: list[float] = []
    lock = threading.Lock()
    todo = list(tarballs)

    def run() -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    cid, data = todo.pop()
                # Every client polls every 5 ms x clients: ~200 polls/s in all, so that polling does not
                # eat the server's CPU (real clients poll every few seconds).
                dt = publish_and_wait(client, cid, data, poll=0.005 * clients)
                with lock:
                    results.append(dt)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "samples": len(results),
        "p50_s": round(statistics.median(results), 4),
        "p99_s": round(pct(results, 0.99), 4),
        "mean_s": round(statistics.fmean(results), 4),
        "publishes_per_s": round(len(results) / wall, 2),
    }


def exists_rate(url: str, cids: list[str], seconds: float = 5.0, inflight: int = 64) -> dict[str, Any]:
    import aiohttp

    async def main() -> tuple[int, float]:
        count = 0
        stop_at = time.perf_counter() + seconds
        conn = aiohttp.TCPConnector(limit=inflight)
        async with aiohttp.ClientSession(url, connector=conn) as session:

            async def worker(i: int) -> None:
                nonlocal count
                k = i
                while time.perf_counter() < stop_at:
                    async with session.get("/pubapi/exists", params={"cid": cids[k % len(cids)]}) as resp:
                        await resp.read()
                        assert resp.status == 200
                    count += 1
                    k += inflight

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(inflight)))
            return count, time.perf_counter() - t0

    count, wall = asyncio.run(main())
    return {"requests": count, "seconds": round(wall, 2), "per_s": round(count / wall)}


def populate(root: Path, n: int) -> None:
    """``n`` CIDs of ``GROUP`` in every repository, written with the repository core (fast set-up)."""
    from rcds.cvmfs.repository import Repository
    from rcds.cvmfs.tree import EntryKind, TreeEntry

    for name in REPOS:
        repo = Repository.create(name, root / "data" / name)
        with repo.transaction() as txn:
            txn.mkdir("/sw", nested=True)
            txn.mkdir(f"/sw/{GROUP}", nested=True)
            for i in range(n):
                body = f"cid {i}\n".encode()
                entries = [
                    TreeEntry("", EntryKind.DIRECTORY, 0o755),
                    TreeEntry("run.sh", EntryKind.FILE, 0o755, size=len(body), stream=io.BytesIO(body)),
                    TreeEntry(".publisher", EntryKind.FILE, size=10, stream=io.BytesIO(b"populate!\n")),
                ]
                txn.add_tree(f"/sw/{GROUP}/pre{i:06d}", entries)
            txn.commit()


def large_tar(workdir: Path, size_gib: float) -> tuple[Path, Path]:
    _info, _ = ingest_bench.ensure_tree(ingest_bench.TreeSpec(size_gib=size_gib), workdir)
    tree = workdir / f"tree-{ingest_bench.TreeSpec(size_gib=size_gib).key}"
    tar_path = workdir / f"tree-{ingest_bench.TreeSpec(size_gib=size_gib).key}.tar"
    if not tar_path.exists():
        tmp = tar_path.with_suffix(".tmp")
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(tree, arcname=".")
        tmp.rename(tar_path)
    return tree, tar_path


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a running process and of its running descendants (the server's small-file workers),
    from /proc; 0 where /proc cannot tell."""
    total = 0.0
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            total += ingest_bench.process_cpu(p)
            for task in os.listdir(f"/proc/{p}/task"):
                pending += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def core_ingest(storage: Path, what: str, source: Path) -> tuple[float, float]:
    """Seconds and CPU seconds (with the small-file workers, stopped to count them) of one ingest."""
    from rcds.cvmfs import smallfiles
    from rcds.cvmfs.repository import Repository
    from rcds.ingest.tarstream import tar_entries

    if storage.exists():
        shutil.rmtree(storage)
    repo = Repository.create("core.bench.local", storage)
    smallfiles.POOL.stop()
    cpu0 = ingest_bench._own_cpu()
    t0 = time.perf_counter()
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        txn.mkdir(f"/sw/{GROUP}", nested=True)
        if what == "tar":
            with open(source, "rb") as f:
                txn.add_tree(f"/sw/{GROUP}/large", tar_entries(f))
        else:
            txn.add_directory(f"/sw/{GROUP}/large", source)
        txn.commit()
    seconds = time.perf_counter() - t0
    smallfiles.POOL.stop()
    return seconds, ingest_bench._own_cpu() - cpu0


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def gzipped(tar_path: Path) -> Path:
    """The tar as a .tar.gz (gzip -6, as users make them), made once next to it."""
    gz_path = tar_path.with_name(tar_path.name + ".gz")
    if not gz_path.exists():
        tmp = gz_path.with_suffix(".tmp")
        with open(tar_path, "rb") as src, open(tmp, "wb") as dst:
            subprocess.run(["gzip", "-6", "-c"], stdin=src, stdout=dst, check=True)
        tmp.rename(gz_path)
    return gz_path


def large_publish(work: Path, upload: Path) -> dict[str, Any]:
    """One upload through ``rcds serve`` from its first byte to PRESENT, and the core ingesting the same
    file in-process (``add_tree(tar_entries(...))``); the file is in the page cache for both."""
    warm(upload)
    core, core_cpu = core_ingest(work / "pub-core", "tar", upload)
    root = work / "pub-large"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    srv = Server(root)
    try:
        with httpx.Client(base_url=srv.url, timeout=3600) as client, open(upload, "rb") as f:
            server_cpu0, client_cpu0 = tree_cpu_seconds(srv.proc.pid), time.process_time()
            t0 = time.perf_counter()
            r = client.post("/pubapi/publish", params={"cid": f"{GROUP}/large"}, content=f)
            acknowledged = time.perf_counter() - t0
            assert r.text == "OK\n", r.text
            while not client.get("/pubapi/exists", params={"cid": f"{GROUP}/large"}).text.startswith(
                "PRESENT"
            ):
                time.sleep(0.02)
            service = time.perf_counter() - t0
            server_cpu = tree_cpu_seconds(srv.proc.pid) - server_cpu0
            client_cpu = time.process_time() - client_cpu0
    finally:
        srv.stop()
    shutil.rmtree(root, ignore_errors=True)
    return {
        "bytes": upload.stat().st_size,
        "service_s": round(service, 2),
        "upload_s": round(acknowledged, 2),
        "core_s": round(core, 2),
        "service_vs_core": round(service / core, 3),
        # On one machine the uploading client shares the server's cores: its CPU is part of the gap.
        "core_cpu_s": round(core_cpu, 2),
        "server_cpu_s": round(server_cpu, 2),
        "client_cpu_s": round(client_cpu, 2),
    }


def small_steps(args: argparse.Namespace, work: Path, result: dict[str, Any]) -> None:
    """Steps 1, 2 and 4: small-publish latency, empty and populated, and the exists rate."""
    print("building tarballs ...", flush=True)
    n_small = 2 * args.samples + args.concurrent_samples
    small = [(f"{GROUP}/s{i:06d}", small_tarball(i)) for i in range(n_small)]
    result["small_tarball_bytes"] = len(small[0][1])

    template = work / f"pub-populated-{args.populated}"
    if not (template / "done").exists():
        print(f"populating {args.populated} CIDs per repository (cached in {template}) ...", flush=True)
        shutil.rmtree(template, ignore_errors=True)
        template.mkdir()
        populate(template, args.populated)
        (template / "done").write_text("ok")

    # 1 + 2: empty server.
    root = work / "pub-empty"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    srv = Server(root)
    try:
        publish_and_wait(httpx.Client(base_url=srv.url), f"{GROUP}/warmup", small_tarball(-1))
        result["latency_empty_1"] = latency(srv.url, small[: args.samples], 1)
        print("1 client, empty:", result["latency_empty_1"], flush=True)
        result["latency_empty_20"] = latency(
            srv.url, small[args.samples : args.samples + args.concurrent_samples], 20
        )
        print("20 clients, empty:", result["latency_empty_20"], flush=True)
        present = [c for c, _ in small[: args.samples]]
        result["exists"] = exists_rate(
            srv.url, present + [f"{GROUP}/missing{i}" for i in range(len(present))]
        )
        print("exists:", result["exists"], flush=True)
    finally:
        srv.stop()

    # 4: populated server.
    root = work / "pub-populated"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root, symlinks=True)
    srv = Server(root)
    try:
        publish_and_wait(httpx.Client(base_url=srv.url), f"{GROUP}/warmup", small_tarball(-1))
        result["latency_populated_1"] = latency(srv.url, small[-args.samples :], 1)
        print(f"1 client, {args.populated} CIDs:", result["latency_populated_1"], flush=True)
    finally:
        srv.stop()
    result["populated_ratio_p50"] = round(
        result["latency_populated_1"]["p50_s"] / result["latency_empty_1"]["p50_s"], 3
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    ap.add_argument("--samples", type=int, default=60, help="single-client small publishes per server")
    ap.add_argument("--concurrent-samples", type=int, default=200)
    ap.add_argument("--populated", type=int, default=10_000, help="CIDs per repository for step 4")
    ap.add_argument("--large-gib", type=float, default=1.0, help="0 skips the large publish")
    ap.add_argument("--large-only", action="store_true", help="only step 3 (the large publishes vs the core)")
    args = ap.parse_args(argv)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"cpus": os.cpu_count()}

    if not args.large_only:
        small_steps(args, work, result)

    # 3: large publish vs the core, as a tar and as a .tar.gz.
    if args.large_gib > 0:
        tree, tar_path = large_tar(work, args.large_gib)
        result["large_tar_bytes"] = tar_path.stat().st_size
        gz_path = gzipped(tar_path)
        result["large_tar_gz_bytes"] = gz_path.stat().st_size
        if not args.large_only:
            result["large_core_dir_s"] = round(core_ingest(work / "pub-core", "dir", tree)[0], 2)
        for name, upload in (("large", tar_path), ("large_gz", gz_path)):
            result[name] = large_publish(work, upload)
            print(f"{name}:", result[name], flush=True)
        shutil.rmtree(work / "pub-core", ignore_errors=True)

    print()
    for name in ("large", "large_gz"):
        if name in result:
            lg = result[name]
            print(f"{name}: service {lg['service_s']} s (upload acknowledged after {lg['upload_s']} s); "
                  f"core {lg['core_s']} s; service/core {lg['service_vs_core']} (target <= 1.0); CPU s: "
                  f"server {lg['server_cpu_s']}, its client {lg['client_cpu_s']}, core {lg['core_cpu_s']}")  # fmt: skip
    if "latency_empty_1" not in result:
        line = json.dumps(result)
        (work / "publish-result.json").write_text(line + "\n")
        print(line)
        return 0
    e1, e20, p1 = result["latency_empty_1"], result["latency_empty_20"], result["latency_populated_1"]
    print(f"small publish p50/p99, 1 client:    {e1['p50_s'] * 1000:.0f} / {e1['p99_s'] * 1000:.0f} ms")
    print(f"small publish p50/p99, 20 clients:  {e20['p50_s'] * 1000:.0f} / {e20['p99_s'] * 1000:.0f} ms "
          f"({e20['publishes_per_s']} publishes/s)")  # fmt: skip
    print(f"exists:                             {result['exists']['per_s']} requests/s")
    print(f"with {args.populated} CIDs per repository: p50 {p1['p50_s'] * 1000:.0f} ms, "
          f"ratio {result['populated_ratio_p50']}")  # fmt: skip
    line = json.dumps(result)
    (work / "publish-result.json").write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
