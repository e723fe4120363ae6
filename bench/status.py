"""How long the status page takes with 10,000 CIDs and a day of history (issue 17: under 100 ms).

Builds, once per work directory, a server state:

* repository ``bench1.rcds.local`` with ``--cids`` CIDs (default 10,000) in 20 groups, written through the
  writer API in commits of 500, and an empty ``bench2.rcds.local``;
* ``state.db`` with ``--jobs`` finished jobs (default 20,000: one every ~4 s for a day, 3% failed, a few
  still queued) made through ``StateDB``'s own calls, then spread over the last 24 hours (their times are
  the only thing set with SQL: ``StateDB`` stamps the present), and a last-use time for every CID (made
  anew each run, as the times are relative to the present);
* ``status.db`` with a day of samples every minute (queue depth, waiting jobs).

Then measures, median of ``--runs``:

* server side, in process: ``StatusCollector.build`` (every query) plus ``render_status`` (the HTML), with
  no cache, and each part alone;
* over HTTP against a real ``rcds serve`` on that state: ``GET /status`` with the document cache off
  (``[status] cache_seconds = 0``, every request queries and renders) and on (the default 2 s);
* ``GET /status.json`` and ``GET /status/cid?cid=...`` (the tree of one CID from the live catalogs).

    python bench/status.py [--workdir /tmp/rcds-bench] [--cids 10000] [--jobs 20000] [--runs 200]
    python bench/status.py --screenshots docs/      # docs/status.png and docs/status-phone.png
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from rcds.cvmfs.repository import Repository
from rcds.cvmfs.tree import EntryKind, TreeEntry
from rcds.publish.config import load_settings
from rcds.publish.presence import PUBLISHER_FILE
from rcds.publish.service import PublishService
from rcds.publish.state import StateDB
from rcds.publish.status import StatusCollector, StatusHistory
from rcds.web.status_page import Viewer, render_status

GROUPS = 20
REPOS = ("bench1.rcds.local", "bench2.rcds.local")


def small_tree(i: int) -> Iterator[TreeEntry]:
    data = f"print({i})\n".encode()
    who = b"bench\n"
    yield TreeEntry("", EntryKind.DIRECTORY, 0o755, 1)
    yield TreeEntry("main.py", EntryKind.FILE, 0o644, 1, size=len(data), stream=io.BytesIO(data))
    yield TreeEntry(PUBLISHER_FILE, EntryKind.FILE, 0o644, 1, size=len(who), stream=io.BytesIO(who))


def cid(i: int) -> str:
    return f"exp{i % GROUPS:02d}/" + hashlib.sha256(str(i).encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(workdir: Path, n_cids: int, n_jobs: int) -> Path:
    """The server state (once per parameters); returns the data directory."""
    data = workdir / f"status-{n_cids}"
    if not (data / "ready.json").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        seconds = build_repository(data, n_cids)
        (data / "ready.json").write_text(json.dumps({"cids": n_cids, "seconds_to_build": round(seconds, 1)}))
    # The jobs and samples are made anew each run: their times are relative to now.
    build_state(data, n_cids, n_jobs)
    return data


def build_repository(data: Path, n_cids: int) -> float:
    t0 = time.perf_counter()
    repo = Repository.create(REPOS[0], data / REPOS[0])
    Repository.create(REPOS[1], data / REPOS[1])
    with repo.transaction() as txn:
        txn.mkdir("/sw", nested=True)
        for g in range(GROUPS):
            txn.mkdir(f"/sw/exp{g:02d}", nested=True)
        txn.commit()
    n = 0
    while n < n_cids:
        with repo.transaction() as txn:
            for _ in range(min(500, n_cids - n)):
                txn.add_tree(f"/sw/{cid(n)}", small_tree(n), nested=True)
                n += 1
            txn.commit()
        print(f"  {n} CIDs", file=sys.stderr, flush=True)
    return time.perf_counter() - t0


def build_state(data: Path, n_cids: int, n_jobs: int) -> None:
    queue = data / "queue"
    shutil.rmtree(queue, ignore_errors=True)
    queue.mkdir()
    state = StateDB(queue / "state.db")
    now = time.time()
    rng = random.Random(17)
    ids, times, access = [], [], {}
    for k in range(n_jobs):
        c = cid(k % n_cids) if k < n_cids else f"late{k % GROUPS:02d}/{k:08d}"
        job = state.enqueue(c, f"/nonexistent/{k}.tar", rng.randint(2_000, 50_000_000), 0, f"user{k % 37}")
        assert job is not None
        if rng.random() < 0.03:
            state.mark_failed(job, "rejected: member '../x' leaves the tree")
        else:
            state.mark_published([(job, rng.randint(3, 3000))], REPOS[0], 1 + k // 500)
        finished = now - 86400 + 86400 * (k + 1) / (n_jobs + 1)
        ids.append(job)
        times.append((finished - rng.uniform(0.2, 30.0), finished, job))
        access[c] = finished
    state.record_access(access)
    state.close()
    # StateDB stamps the present; the history must cover the day, so only the times are set here.
    db = sqlite3.connect(queue / "state.db")
    with db:
        db.executemany("UPDATE jobs SET submitted = ?, finished = ? WHERE id = ?", times)
    db.close()
    history = StatusHistory(queue / "status.db")
    for m in range(24 * 60):
        t = now - 86400 + 60 * m
        history.add(t, {"queue_depth": float(abs(30 * math.sin(m / 90))), "waiting": 0.0})
    history.close()


def write_config(data: Path, port: int, cache_seconds: float) -> Path:
    lines = [f'data_dir = "{data}"', "auto_cleanup = false", "[server]", f'http = ["127.0.0.1:{port}"]',
             "[auth]", 'gridmapfile = ""', "[status]", f"cache_seconds = {cache_seconds}"]  # fmt: skip
    for r in REPOS:
        lines += ["[[repository]]", f'name = "{r}"']
    path = data / f"rcds-{port}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def in_process(config: Path, runs: int) -> dict[str, float]:
    settings = load_settings(config)
    svc = PublishService(settings)
    svc.open()  # state and presence index, no workers
    svc.status_history = StatusHistory(settings.queue_dir / "status.db")
    collector = StatusCollector(settings, svc)
    viewer = Viewer(None, False)
    t0 = time.perf_counter()
    collector.build(False)  # the first one also sums up the 23 finished hours and past days, once
    first_ms = round((time.perf_counter() - t0) * 1000, 2)
    collector.wait_estimates(300)  # the cleanup estimate runs in the background once: not in the timing
    builds, renders, both = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        doc = collector.build(False)
        t1 = time.perf_counter()
        render_status(doc, viewer)
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        renders.append(t2 - t1)
        both.append(t2 - t0)
    expiring = [r["next_cleanup"]["expiring"] for r in doc["repositories"]]
    collector.close()
    svc.close()
    return {
        "first_build_ms": first_ms,
        "build_ms": median_ms(builds), "render_ms": median_ms(renders), "build_and_render_ms": median_ms(both),
        "html_bytes": len(render_status(doc, viewer)), "cids": doc["repositories"][0]["cids"],
        "jobs_last_day": doc["publishes"]["last_day"] + doc["publishes"]["failed_last_day"],
        "cleanup_estimate": expiring,
    }  # fmt: skip


def over_http(data: Path, runs: int, cache_seconds: float) -> dict[str, float]:
    port = free_port()
    config = write_config(data, port, cache_seconds)
    log = open(data / f"server-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "rcds.cli", "serve", "--config", str(config)],
                            stdout=log, stderr=log, env={**os.environ})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if c.get("/pubapi/ping").text == "OK\n":
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
            while None in [r["next_cleanup"]["expiring"] for r in c.get("/status.json").json()["repositories"]
                           if "next_cleanup" in r]:  # fmt: skip
                time.sleep(0.5)  # the background cleanup estimate, once: not in the timing
            out: dict[str, float] = {}
            for name, path in (("status", "/status"), ("status_json", "/status.json"),
                               ("cid_page", f"/status/cid?cid={cid(1234)}")):  # fmt: skip
                samples = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    r = c.get(path)
                    samples.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
                out[f"{name}_ms"] = median_ms(samples)
                out[f"{name}_p95_ms"] = round(sorted(samples)[int(len(samples) * 0.95)] * 1000, 2)
            return out
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def screenshots(data: Path, target: Path) -> None:
    """The page on this state in headless Chromium, at a laptop's and a phone's width (for docs/)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    port = free_port()
    config = write_config(data, port, 2.0)
    log = open(data / f"server-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "rcds.cli", "serve", "--config", str(config)],
                            stdout=log, stderr=log)  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--user-data-dir={data / 'chromium-profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                try:
                    doc = c.get("/status.json").json()
                    if None not in [r["next_cleanup"]["expiring"] for r in doc["repositories"]]:
                        break
                except (httpx.TransportError, json.JSONDecodeError):
                    pass
                time.sleep(0.5)
        target.mkdir(parents=True, exist_ok=True)
        for name, (w, h) in (("status.png", (1366, 1300)), ("status-phone.png", (390, 1400))):
            driver.set_window_size(w, h)
            driver.get(f"{url}/status")
            driver.save_screenshot(str(target / name))
            print(f"wrote {target / name}", file=sys.stderr)
    finally:
        driver.quit()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    ap.add_argument("--cids", type=int, default=10_000)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--screenshots", type=Path, default=None, metavar="DIR",
                    help="only take screenshots of the page on this state into DIR (needs chromium, selenium)")  # fmt: skip
    args = ap.parse_args()
    data = build(args.workdir, args.cids, args.jobs)
    if args.screenshots is not None:
        screenshots(data, args.screenshots)
        return
    config = write_config(data, free_port(), 0)
    result = {"cids": args.cids, "jobs": args.jobs, "runs": args.runs}
    result["server_side"] = in_process(config, args.runs)
    result["http_uncached"] = over_http(data, args.runs, 0)
    result["http_cached"] = over_http(data, args.runs, 2.0)
    worst = max(result["server_side"]["build_and_render_ms"], result["http_uncached"]["status_ms"])
    result["target_ms"] = 100
    result["within_target"] = worst < 100
    print(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
