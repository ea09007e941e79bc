"""Throughput of S3Store.upload_file / download_file against raw boto3, on one rclone S3 server on loopback.

    python bench/store.py [--size-mb 200] [--rounds 5]

Raw boto3 is the baseline: ``client.upload_file`` / ``client.download_file`` with boto3's default
TransferConfig (8 MiB threshold and parts, 10 threads). S3Store uses its own configuration (the spec's defaults:
64 MiB threshold, 16 MiB parts, 8 threads); both download to a temporary file and rename it into place. Each
round measures the baseline first, then S3Store, on the same server and file; the best and the median of the
rounds are reported, with the ratios S3Store / boto3 (>= 1: S3Store is as fast or faster). On a shared machine
single runs vary by 2x: use several rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the test servers' helper module
from s3server import RcloneS3Server  # noqa: E402

from alignfake.s3 import S3Store  # noqa: E402

MiB = 1024 * 1024


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200, help="size of the random file (MiB)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (baseline, S3Store); the median is reported")
    ap.add_argument("--threshold-mb", type=int, default=64, help="S3Store multipart_threshold_mb")
    ap.add_argument("--concurrency", type=int, default=8, help="S3Store max_concurrency")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="alignfake-bench-") as tmp_s:
        tmp = Path(tmp_s)
        src = tmp / "payload.bin"
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(MiB))
        digest = sha256(src)
        size_mb = src.stat().st_size / MiB

        with RcloneS3Server(tmp / "root", "bench") as server:
            ep = server.endpoint
            os.environ.update(ep.env())
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            raw = boto3.client("s3", endpoint_url=ep.endpoint_url)
            store = S3Store(f"s3://{ep.bucket}/bench", endpoint_url=ep.endpoint_url,
                            multipart_threshold_mb=args.threshold_mb, max_concurrency=args.concurrency)
            # make both clients before timing (loading botocore's models is not transfer time)
            raw.list_objects_v2(Bucket=ep.bucket, MaxKeys=1)
            store.list()

            results: dict[str, list[float]] = {k: [] for k in ("raw_up", "ours_up", "raw_down", "ours_down")}
            for r in range(args.rounds):
                raw_dest, ours_dest = tmp / f"raw-{r}.bin", tmp / f"ours-{r}.bin"
                results["raw_up"].append(timed(raw.upload_file, str(src), ep.bucket, "raw/payload.bin"))
                results["ours_up"].append(timed(store.upload_file, src, "payload.bin"))
                results["raw_down"].append(timed(raw.download_file, ep.bucket, "raw/payload.bin", str(raw_dest)))
                results["ours_down"].append(timed(store.download_file, "payload.bin", ours_dest))
                for dest in (raw_dest, ours_dest):
                    if sha256(dest) != digest:
                        raise SystemExit(f"round {r}: {dest.name} differs from what was uploaded")
                    dest.unlink()

    # Best of the rounds is the least disturbed by other load on a shared machine (as timeit takes the minimum);
    # the median shows the typical run. Both are printed, with both ratios.
    best = {k: size_mb / min(v) for k, v in results.items()}
    median = {k: size_mb / statistics.median(v) for k, v in results.items()}
    print(f"file {size_mb:.0f} MiB, {args.rounds} round(s), rclone serve s3 on loopback, {os.cpu_count()} CPUs")
    print(f"S3Store: multipart_threshold_mb={args.threshold_mb}, max_concurrency={args.concurrency}, "
          f"part size {store.transfer_config.multipart_chunksize // MiB} MiB; raw boto3: default TransferConfig")
    for op in ("up", "down"):
        name = "upload  " if op == "up" else "download"
        for who in ("raw", "ours"):
            runs = ", ".join(f"{size_mb / t:.0f}" for t in results[f"{who}_{op}"])
            label = "boto3  " if who == "raw" else "S3Store"
            print(f"{name} {label}  best {best[f'{who}_{op}']:6.1f} MiB/s  median {median[f'{who}_{op}']:6.1f} MiB/s"
                  f"  runs [{runs}]")
        print(f"{name} ratio S3Store/boto3: best {best[f'ours_{op}'] / best[f'raw_{op}']:.2f}, "
              f"median {median[f'ours_{op}'] / median[f'raw_{op}']:.2f}")

if __name__ == "__main__":
    main()
