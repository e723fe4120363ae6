"""Which S3 client for rcds's object store: boto3, obstore or aiobotocore, on rcds's workload.

A publish writes many small content-addressed objects in parallel (after an existence check), GC deletes
in batches, readers GET. Each client does, against one local ``juicefs gateway`` (tests/s3server.py):
N PUTs of 4 KiB objects with 16 in flight, N HEADs, N GETs, and the N keys deleted with DeleteObjects
(1,000 keys a request; obstore's delete of one key, 16 in flight, is itself a DeleteObjects request).

    python bench/s3_clients.py [--objects 2000]

Needs boto3, obstore and aiobotocore (``pip install boto3 obstore aiobotocore``; aiobotocore pins its own
botocore, so a separate venv is best) and the ``juicefs`` binary. The machine is shared: compare the
clients within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3server import S3Server, run_s3_server

PARALLEL = 16
SIZE = 4096


def _md5_header(params: dict[str, Any], **_: Any) -> None:
    body = params["body"]
    params["headers"]["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def _timed(label: str, n: int, fn: Callable[[], object], out: dict[str, float]) -> None:
    t0 = time.perf_counter()
    fn()
    out[label] = round(n / (time.perf_counter() - t0), 1)


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
            "put/s",
            len(keys),
            lambda: list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=payload), keys)),
            out,
        )
        _timed(
            "head/s",
            len(keys),
            lambda: list(pool.map(lambda k: client.head_object(Bucket=bucket, Key=k), keys)),
            out,
        )
        _timed(
            "get/s",
            len(keys),
            lambda: list(pool.map(lambda k: client.get_object(Bucket=bucket, Key=k)["Body"].read(), keys)),
            out,
        )

    def delete() -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    _timed("delete/s", len(keys), delete, out)
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
        _timed(
            "put/s", len(keys), lambda: list(pool.map(lambda k: obstore.put(store, k, payload), keys)), out
        )
        _timed("head/s", len(keys), lambda: list(pool.map(lambda k: obstore.head(store, k), keys)), out)
        _timed("get/s", len(keys), lambda: list(pool.map(lambda k: obstore.get(store, k).bytes(), keys)), out)
        try:
            _timed(
                "delete/s", len(keys), lambda: list(pool.map(lambda k: obstore.delete(store, k), keys)), out
            )
        except Exception as exc:  # juicefs's DeleteObjects reply lacks <Key>: object_store rejects it
            print(f"obstore delete failed: {str(exc).splitlines()[0]}", flush=True)
            out["delete/s"] = 0.0
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
                ("put/s", lambda k: client.put_object(Bucket=bucket, Key=k, Body=payload)),
                ("head/s", lambda k: client.head_object(Bucket=bucket, Key=k)),
                ("get/s", get),
            ]
            for label, fn in steps:
                t0 = time.perf_counter()
                await each(fn)
                out[label] = round(len(keys) / (time.perf_counter() - t0), 1)
            t0 = time.perf_counter()
            for i in range(0, len(keys), 1000):
                batch = [{"Key": k} for k in keys[i : i + 1000]]
                await client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            out["delete/s"] = round(len(keys) / (time.perf_counter() - t0), 1)
        return out

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=2000)
    args = parser.parse_args()
    payload = bytes(range(256)) * (SIZE // 256)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, run_s3_server(Path(tmp) / "s3") as server:
        for name, fn in (
            ("boto3", bench_boto3),
            ("obstore", bench_obstore),
            ("aiobotocore", bench_aiobotocore),
        ):
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
