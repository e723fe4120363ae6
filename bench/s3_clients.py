"""Which S3 client for rcds's object store: boto3, obstore or aiobotocore, on rcds's workload.

A publish writes many small content-addressed objects in parallel (after an existence check), GC deletes
in batches, readers GET. Each client does, against one local ``juicefs gateway`` (tests/s3server.py,
badger metadata): N PUTs of ``--size`` bytes (default 50 KB, the mean object of bench/s3.py's 1 GiB
tree) with 16 in flight, N HEADs, N GETs, and the N keys deleted with DeleteObjects (1,000 keys a
request; obstore's bulk delete, whose reply from this server it rejects, is tried and reported).

Besides requests per second it reports the CPU per request of the client (this process: every thread,
obstore's Rust ones included) and of the server: on 2 cores shared by the writer, the client and a
local server, CPU per request is what bounds a publish, not latency.

    python bench/s3_clients.py [--objects 2000] [--size 50000] [--clients boto3,obstore]

Needs boto3 and obstore (the ``s3`` extra), aiobotocore for its row (``pip install aiobotocore``; it
pins its own botocore, so a separate venv is best; skipped when missing), and the ``juicefs`` binary.
The machine is shared: compare the clients within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import ingest  # process_cpu, shared by the benchmarks
from s3server import S3Server, run_s3_server

PARALLEL = 16


def _md5_header(params: dict[str, Any], **_: Any) -> None:
    body = params["body"]
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


SERVER_PID = 0  # the S3 server's process, for its CPU per request


class Cpu:
    """Wall time and the CPU of client and server over a block: ``<op>/s``, ``<op> client ms``,
    ``<op> server ms`` (CPU milliseconds per request) into ``out``."""

    def __init__(self, op: str, n: int, out: dict[str, float]) -> None:
        self.op, self.n, self.out = op, n, out

    def __enter__(self) -> None:
        self.t0, self.c0, self.s0 = time.perf_counter(), time.process_time(), ingest.process_cpu(SERVER_PID)

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        self.out[f"{self.op}/s"] = round(self.n / wall, 1)
        self.out[f"{self.op} client ms"] = round(1e3 * (time.process_time() - self.c0) / self.n, 3)
        self.out[f"{self.op} server ms"] = round(1e3 * (ingest.process_cpu(SERVER_PID) - self.s0) / self.n, 3)


def _timed(op: str, n: int, fn: Callable[[], object], out: dict[str, float]) -> None:
    with Cpu(op, n, out):
        fn()


def bench_boto3(server: S3Server, bucket: str, keys: list[str], payload: bytes) -> dict[str, float]:
    import boto3
    import botocore.handlers
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=PARALLEL,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    client.meta.events.register("before-call.s3.DeleteObjects", _md5_header)
    client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)  # as rcds does
    out: dict[str, float] = {}
    with ThreadPoolExecutor(PARALLEL) as pool:
        _timed(
            "put",
            len(keys),
            lambda: list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=payload), keys)),
            out,
        )
        _timed(
            "head",
            len(keys),
            lambda: list(pool.map(lambda k: client.head_object(Bucket=bucket, Key=k), keys)),
            out,
        )
        _timed(
            "get",
            len(keys),
            lambda: list(pool.map(lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(), keys)),
            out,
        )

    def delete() -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    _timed("delete", len(keys), delete, out)
    return out


def bench_obstore(server: S3Server, bucket: str, keys: list[str], payload: bytes) -> dict[str, float]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        region="us-east-1",
        client_options={"allow_http": True},
    )
    out: dict[str, float] = {}
    with ThreadPoolExecutor(PARALLEL) as pool:
        _timed("put", len(keys), lambda: list(pool.map(lambda k: obstore.put(store, k, payload), keys)), out)
        _timed("head", len(keys), lambda: list(pool.map(lambda k: obstore.head(store, k), keys)), out)
        _timed("get", len(keys), lambda: list(pool.map(lambda k: obstore.get(store, k).bytes(), keys)), out)
    try:  # obstore.delete with many paths sends DeleteObjects of up to 1,000 keys
        _timed("delete", len(keys), lambda: obstore.delete(store, keys), out)
    except Exception as exc:  # juicefs's reply has <Deleted> without <Key>: object_store rejects it
        print(f"obstore delete failed: {str(exc).splitlines()[0]}", flush=True)
        out.pop("delete client ms", None)
        out.pop("delete server ms", None)
        out["delete/s"] = 0.0  # failed
    return out


def bench_aiobotocore(server: S3Server, bucket: str, keys: list[str], payload: bytes) -> dict[str, float]:
    import botocore.handlers
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    async def run() -> dict[str, float]:
        out: dict[str, float] = {}
        async with get_session().create_client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=server.access_key,
            aws_secret_access_key=server.secret_key,
            region_name="us-east-1",
            config=AioConfig(
                s3={"addressing_style": "path"},
                max_pool_connections=PARALLEL,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        ) as client:
            client.meta.events.register("before-call.s3.DeleteObjects", _md5_header)
            client.meta.events.unregister("before-call.s3", botocore.handlers.add_expect_header)
            gate = asyncio.Semaphore(PARALLEL)

            async def each(fn: Callable[[str], Any]) -> None:
                async def one(k: str) -> None:
                    async with gate:
                        await fn(k)

                await asyncio.gather(*(one(k) for k in keys))

            async def get(k: str) -> None:
                resp = await client.get_object(Bucket=bucket, Key=k)
                async with resp["Body"] as body:
                    await body.read()

            steps: list[tuple[str, Callable[[str], Any]]] = [
                ("put", lambda k: client.put_object(Bucket=bucket, Key=k, Body=payload)),
                ("head", lambda k: client.head_object(Bucket=bucket, Key=k)),
                ("get", get),
            ]
            for label, fn in steps:
                with Cpu(label, len(keys), out):
                    await each(fn)
            with Cpu("delete", len(keys), out):
                for i in range(0, len(keys), 1000):
                    batch = [{"Key": k} for k in keys[i : i + 1000]]
                    await client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return out

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=50_000, help="bytes per object")
    parser.add_argument("--clients", default="boto3,obstore,aiobotocore")
    parser.add_argument("--meta", choices=("badger", "sqlite3"), default="badger")
    args = parser.parse_args()
    global SERVER_PID
    payload = os.urandom(args.size)
    results: dict[str, dict[str, float]] = {}
    benches = {"boto3": bench_boto3, "obstore": bench_obstore, "aiobotocore": bench_aiobotocore}
    with tempfile.TemporaryDirectory() as tmp, run_s3_server(Path(tmp) / "s3", meta=args.meta) as server:
        SERVER_PID = server.process.pid
        for name in args.clients.split(","):
            fn = benches[name]
            if importlib.util.find_spec(name) is None:
                print(f"{name}: not installed, skipped", flush=True)
                continue
            bucket = f"bench-{name}"
            server.create_bucket(bucket)
            keys = [
                f"repo/data/{i % 256:02x}/{hashlib.sha1(str(i).encode()).hexdigest()}"
                for i in range(args.objects)
            ]
            results[name] = fn(server, bucket, keys, payload)
            print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
