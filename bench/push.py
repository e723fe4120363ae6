#!/usr/bin/env python3
"""``rcds push`` of the 1 GiB code-like tree of ``bench/ingest.py``, side by side with ``rcds publish`` of
the same tree and with copying it (``cp -r``), all in one run against one real ``rcds serve``:

1. ``cp -r`` of the tree to a scratch directory on the same disk (the floor: reading and writing it);
2. ``rcds publish DIR --wait`` (tar on the client, upload, server-side ingest, until ``PRESENT``);
3. the first ``rcds push DIR REPO:/users/bench`` (local compression into a fresh work directory, the
   missing-objects question, upload of every object, commit);
4. ``rcds push`` again after one text file changed (the target: under 2 s).

Targets (issue 15): first push within 1.2x of ``rcds publish``; one-file re-push under 2 s. Prints a table
and a final JSON line (also ``<workdir>/push-result.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench

REPO = "push.bench.local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


LAST_CPU = [0.0]  # CPU seconds (user + system) of the last ``rcds`` command: the machine is shared


def rcds(*args: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    started, cpu = time.monotonic(), children_cpu()
    proc = subprocess.run([sys.executable, "-m", "rcds.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)  # fmt: skip
    seconds = time.monotonic() - started
    LAST_CPU[0] = children_cpu() - cpu
    if proc.returncode != 0:
        raise SystemExit(f"rcds {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return seconds, proc.stdout


class Server:
    """``rcds serve`` with the gateway on, in its own data directory; the key file is ``<run>/gateway.keys``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.port = free_port()
        keys = root.parent / "gateway.keys"
        keys.write_text("plain_text bench bench-secret\n")
        (root / "rcds.toml").write_text(
            f'data_dir = "{root / "data"}"\n[server]\nhttp = ["127.0.0.1:{self.port}"]\n[auth]\n'
            f'gridmapfile = ""\n[gateway]\nkey_files = ["{keys}"]\n[gateway.key_paths]\n'
            f'bench = ["{REPO}/users"]\n[[repository]]\nname = "{REPO}"\n'
        )

    def __enter__(self) -> str:
        url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rcds.cli", "serve", "--config", str(self.root / "rcds.toml")],
            stdout=self.log, stderr=self.log,
        )  # fmt: skip
        for _ in range(600):
            try:
                if httpx.get(f"{url}/pubapi/ping").text == "OK\n":
                    return url
            except httpx.TransportError:
                time.sleep(0.1)
        raise SystemExit(f"rcds serve did not start: {self.root / 'server.log'}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rcds-bench"))
    args = parser.parse_args()
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    info, _ = ingest_bench.ensure_tree(ingest_bench.TreeSpec(args.size_gib), workdir)
    tree = workdir / f"tree-{ingest_bench.TreeSpec(args.size_gib).key}"
    run = workdir / "push-run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    # The re-push changes a file: push a copy, so the cached tree stays as generated.
    source = run / "source"
    subprocess.run(["cp", "-a", str(tree), str(source)], check=True)
    ingest_bench.warm_cache(ingest_bench.content_files(source))

    figures: dict[str, Any] = {"size_gib": args.size_gib, "files": info.text_files + info.binaries,
                               "bytes": info.total_bytes}  # fmt: skip
    started = time.monotonic()
    subprocess.run(["cp", "-r", str(source), str(run / "copy")], check=True)
    figures["cp_s"] = round(time.monotonic() - started, 2)
    shutil.rmtree(run / "copy")

    # Each on a server of its own: neither finds the other's objects already stored.
    with Server(run / "publish") as url:
        seconds, _ = rcds("publish", str(source), "--server", url, "--group", "bench", "--wait", "-q")
        figures["publish_s"] = round(seconds, 2)
    with Server(run / "push") as url:
        push = ["push", str(source), f"{REPO}:/users/bench", "--server", url, "--key", str(run / "gateway.keys"),
                "--work-dir", str(run / "push-cache"), "--json", "-q"]  # fmt: skip
        seconds, out = rcds(*push)
        first = json.loads(out)
        figures["push_first_s"] = round(seconds, 2)
        figures["push_first_bytes_sent"] = first["bytes_sent"]

        changed = next(
            p for p, _ in ingest_bench.content_files(source) if p.suffix in (".c", ".h", ".py", ".cc")
        )
        with open(changed, "ab") as f:
            f.write(b"\n// changed\n")
        seconds, out = rcds(*push)
        again = json.loads(out)
        figures["repush_one_file_s"] = round(seconds, 2)
        figures["repush_client_cpu_s"] = round(LAST_CPU[0], 2)
        figures["load_average"] = round(os.getloadavg()[0], 1)
        figures["repush_objects_sent"] = again["objects_sent"]
        figures["repush_bytes_sent"] = again["bytes_sent"]
    figures["push_vs_publish"] = round(figures["push_first_s"] / figures["publish_s"], 2)
    figures["push_vs_cp"] = round(figures["push_first_s"] / max(figures["cp_s"], 0.01), 2)

    print(f"{'cp -r':32} {figures['cp_s']:>8} s")
    print(f"{'rcds publish --wait':32} {figures['publish_s']:>8} s")
    print(f"{'rcds push (first)':32} {figures['push_first_s']:>8} s  "
          f"{figures['push_vs_publish']}x publish (target <= 1.2), {figures['push_vs_cp']}x cp")  # fmt: skip
    print(f"{'rcds push (one file changed)':32} {figures['repush_one_file_s']:>8} s  "
          f"{figures['repush_objects_sent']} objects, {figures['repush_bytes_sent']} bytes (target < 2 s), "
          f"client CPU {figures['repush_client_cpu_s']} s")  # fmt: skip
    (workdir / "push-result.json").write_text(json.dumps(figures))
    print(json.dumps(figures))
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
