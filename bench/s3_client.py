"""Which S3 client for the store: obstore vs boto3, measured against the same loopback S3 server.

What the store does with a bucket: PUT and GET of packs (4–16 MB; a materialize GETs many at once,
so also 8 in parallel), PUT of small objects (WAL segments of 1 MB, the catalog snapshots, the
lease) and the round trip of a tiny object (the lease). Each client does the same work against
the same moto server on 127.0.0.1, alternating, and the medians are printed side by side.

    .venv/bin/python bench/s3_client.py [--rounds 3] [--endpoint http://127.0.0.1:PORT]

Without ``--endpoint`` it starts ``moto`` (the test suite's S3 server) in this process. moto is
written in Python, so it is the slower side of every exchange: figures are ratios between the
clients, not what a real bucket does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKET = "lakelet-bench"
MB = 1 << 20


class Boto:
    name = "boto3"

    def __init__(self, endpoint: str) -> None:
        import boto3
        from botocore.config import Config
        self.c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                              aws_secret_access_key="bench", config=Config(max_pool_connections=32))

    def put(self, key: str, data: bytes) -> None:
        self.c.put_object(Bucket=BUCKET, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.c.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def put_if_absent(self, key: str, data: bytes) -> None:
        self.c.put_object(Bucket=BUCKET, Key=key, Body=data, IfNoneMatch="*")


class Obstore:
    name = "obstore"

    def __init__(self, endpoint: str) -> None:
        import obstore
        from obstore.store import S3Store
        self.o = obstore
        self.s = S3Store(BUCKET, endpoint=endpoint, region="us-east-1", access_key_id="bench",
                         secret_access_key="bench", client_options={"allow_http": True})

    def put(self, key: str, data: bytes) -> None:
        self.o.put(self.s, key, data)

    def get(self, key: str) -> bytes:
        return bytes(self.o.get(self.s, key).bytes())

    def put_if_absent(self, key: str, data: bytes) -> None:
        self.o.put(self.s, key, data, mode="create")


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def round_for(client: Boto | Obstore, blobs: dict[int, bytes]) -> dict[str, float]:
    out: dict[str, float] = {}
    tag = uuid.uuid4().hex[:8]
    for size, blob in blobs.items():
        key = f"{tag}/pack-{size}"
        out[f"PUT {size // MB} MB (MB/s)"] = size / MB / timed(lambda k=key, b=blob: client.put(k, b))
        out[f"GET {size // MB} MB (MB/s)"] = size / MB / timed(lambda k=key: client.get(k))
    big = blobs[max(blobs)]
    keys = [f"{tag}/par-{i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        out["PUT 8 × 16 MB in parallel (MB/s)"] = 8 * len(big) / MB / timed(
            lambda: list(pool.map(lambda k: client.put(k, big), keys)))
        out["GET 8 × 16 MB in parallel (MB/s)"] = 8 * len(big) / MB / timed(
            lambda: list(pool.map(client.get, keys)))
    seg = os.urandom(MB)
    out["PUT 1 MB WAL segment (ms)"] = 1000 * statistics.median(
        timed(lambda i=i: client.put(f"{tag}/seg-{i}", seg)) for i in range(20))
    small = os.urandom(200)
    out["PUT 200 B (ms)"] = 1000 * statistics.median(
        timed(lambda i=i: client.put(f"{tag}/s-{i}", small)) for i in range(50))
    out["GET 200 B (ms)"] = 1000 * statistics.median(timed(lambda i=i: client.get(f"{tag}/s-{i}")) for i in range(50))
    out["conditional PUT If-None-Match (ms)"] = 1000 * statistics.median(
        timed(lambda i=i: client.put_if_absent(f"{tag}/c-{i}", small)) for i in range(50))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--endpoint", help="an S3 endpoint with bucket lakelet-bench (default: start moto here)")
    args = ap.parse_args()
    server = None
    endpoint = args.endpoint
    if endpoint is None:
        from moto.server import ThreadedMotoServer
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
    try:
        clients: list[Boto | Obstore] = [Boto(endpoint), Obstore(endpoint)]
        if server is not None:
            clients[0].c.create_bucket(Bucket=BUCKET)  # type: ignore[union-attr]
        blobs = {4 * MB: os.urandom(4 * MB), 16 * MB: os.urandom(16 * MB)}
        results: dict[str, dict[str, list[float]]] = {c.name: {} for c in clients}
        for _ in range(args.rounds):
            for c in clients:
                for k, v in round_for(c, blobs).items():
                    results[c.name].setdefault(k, []).append(v)
        names = list(results["boto3"])
        print(f"{'':40} {'boto3':>10} {'obstore':>10} {'obstore/boto3':>14}")
        for n in names:
            b, o = statistics.median(results["boto3"][n]), statistics.median(results["obstore"][n])
            print(f"{n:40} {b:10.1f} {o:10.1f} {o / b:14.2f}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
