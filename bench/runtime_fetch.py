"""Benchmarks of the model fetch step (runtime/modelfetch.py) against real servers on loopback.

For hf:// (huggingface_hub against the Hub-API test server) and s3:// (boto3 against moto's S3
server): a cold download of a generated model, a restart that finds the finished marker, and a
restart that resumes a download interrupted half way. Loopback speeds are an upper bound for the
client and verification cost, not a network figure: the ratios are what carries over.

Usage: python bench/runtime_fetch.py [--json FILE] [--size-mib N]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "runtime"))

from runtime_fakehub import FakeHub, FakeRepo  # noqa: E402

from digital_worker.runtime.modelfetch import PARTIAL_DIR, fetch_model  # noqa: E402


def model_files(size_mib: int) -> dict[str, bytes]:
    shard = os.urandom(size_mib * 1024 * 1024 // 2)
    return {"config.json": b'{"architectures": ["LlamaForCausalLM"]}', "tokenizer.json": b"{}" * 1000,
            "model-00001-of-00002.safetensors": shard, "model-00002-of-00002.safetensors": shard[::-1]}


class _Killed(Exception):
    pass


def interrupt_after_first_shard(uri: str, cache: Path, first_shard: str) -> None:
    """A real fetch, stopped as a killed pod would be, right after the first shard is verified."""
    def progress(line: str) -> None:
        if first_shard in line and line.endswith("ok"):
            raise _Killed

    try:
        fetch_model(uri, cache, progress=progress)
    except _Killed:
        return
    raise AssertionError("the fetch was not interrupted")


def timed(function) -> float:
    start = time.monotonic()
    function()
    return time.monotonic() - start


def run_case(uri: str, files: dict[str, bytes], workdir: Path, make_partial) -> dict:
    total = sum(len(data) for data in files.values())
    cache = workdir / "cache"
    cold = timed(lambda: fetch_model(uri, cache))
    warm = timed(lambda: fetch_model(uri, cache))
    shutil.rmtree(cache)
    make_partial(cache)  # a pod killed half way through the download
    resumed = timed(lambda: fetch_model(uri, cache))
    shutil.rmtree(cache)
    return {"bytes": total, "cold_seconds": cold, "cold_mib_per_second": total / 2**20 / cold,
            "marker_restart_seconds": warm, "resume_half_seconds": resumed,
            "resume_over_cold": resumed / cold, "restart_over_cold": warm / cold}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--size-mib", type=int, default=128)
    args = parser.parse_args()
    files = model_files(args.size_mib)
    shard_names = sorted(name for name in files if name.endswith(".safetensors"))
    results = {}
    workdir = Path(tempfile.mkdtemp(prefix="dw-bench-fetch-"))
    os.environ["HF_HOME"] = str(workdir / "hf-home")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    try:
        hub = FakeHub().start()
        hub.repos["acme/bench"] = FakeRepo(dict(files), lfs=set(shard_names))
        os.environ["HF_ENDPOINT"] = hub.url

        def hub_partial(cache: Path) -> None:
            interrupt_after_first_shard("hf://acme/bench", cache, shard_names[0])

        try:
            results["hf"] = run_case("hf://acme/bench", files, workdir / "hf", hub_partial)
        finally:
            hub.stop()

        port = 45000 + os.getpid() % 10000
        moto = subprocess.Popen([shutil.which("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                              AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
            import boto3

            client = boto3.client("s3")
            client.create_bucket(Bucket="models")
            for name, data in files.items():
                client.put_object(Bucket="models", Key=f"bench/{name}", Body=data)

            def s3_partial(cache: Path) -> None:
                interrupt_after_first_shard("s3://models/bench", cache, shard_names[0])
                # ...and killed again half way through the second shard.
                staging = cache / PARTIAL_DIR / "s3--models--bench"
                (staging / shard_names[1]).write_bytes(files[shard_names[1]][: len(files[shard_names[1]]) // 2])

            results["s3"] = run_case("s3://models/bench", files, workdir / "s3", s3_partial)
        finally:
            moto.terminate()
            moto.wait(timeout=10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"model: {args.size_mib} MiB in {len(files)} files (2 LFS shards), loopback servers; interrupted after "
          f"shard 1 (hf: 50% done) and inside shard 2 (s3: 75% done)")
    print(f"{'source':8}{'cold s':>9}{'MiB/s':>9}{'restart s':>11}{'resume s':>10}{'resume/cold':>13}{'restart/cold':>14}")
    for source, row in results.items():
        print(f"{source:8}{row['cold_seconds']:9.2f}{row['cold_mib_per_second']:9.1f}{row['marker_restart_seconds']:11.3f}"
              f"{row['resume_half_seconds']:10.2f}{row['resume_over_cold']:13.2f}{row['restart_over_cold']:14.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
