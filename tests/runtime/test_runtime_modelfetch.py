"""Model fetch with real clients: huggingface_hub against a Hub-API server on loopback, boto3 against
moto's S3 server, pvc:// and the cache rules with real files (a real tmpfs for the full disk)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dwtest_support import free_port, wait_http
from digital_worker.runtime.modelfetch import (
    MARKER_NAME,
    ModelFetchError,
    fetch_model,
    file_checksum,
    parse_model_source,
)
from runtime_fakehub import FakeHub, FakeRepo

REPO = "acme/tiny-llm"
WEIGHTS = bytes(range(256)) * 2048  # 512 KiB "safetensors"
FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 64}',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "model.safetensors": WEIGHTS,
    "nested/extra.txt": b"nested file\n",
}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub(token="hf_good_token").start()
    server.repos[REPO] = FakeRepo(dict(FILES), lfs={"model.safetensors"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no user token or cache leaks in
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    try:
        yield server
    finally:
        server.stop()


def assert_model_tree(path: Path) -> None:
    for name, data in FILES.items():
        assert (path / name).read_bytes() == data, name
    assert (path / MARKER_NAME).is_file()
    assert not (path / ".cache").exists()  # the library's bookkeeping stays out of the served folder


def test_parse_sources():
    assert parse_model_source("hf://org/name@v1").revision == "v1"
    assert parse_model_source("hf://org/name", revision="main").revision == "main"
    assert parse_model_source("s3://bucket/a/b/").location == "bucket/a/b"
    assert parse_model_source("pvc://models/x").location == "/models/x"
    for bad in ("http://x/y", "hf://", "hf://a b", "s3:///prefix"):
        with pytest.raises(ModelFetchError):
            parse_model_source(bad)


def test_checksums_match_git_and_sha256(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"hello\n")
    # `git hash-object` of "hello\n" is this well-known id.
    assert file_checksum(path, "git-sha1") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert file_checksum(path, "sha256") == hashlib.sha256(b"hello\n").hexdigest()


# ---- hf:// ------------------------------------------------------------------------------------------

def test_hf_download_verifies_and_marks(hub, tmp_path):
    lines: list[str] = []
    path = fetch_model(f"hf://{REPO}", tmp_path / "cache", progress=lines.append)
    assert_model_tree(path)
    assert path.parent == tmp_path / "cache" and not any((tmp_path / "cache" / ".partial").iterdir())
    assert any("model.safetensors" in line for line in lines)

    # A restart finds the marker and touches the network no more.
    before = len(hub.requests)
    assert fetch_model(f"hf://{REPO}", tmp_path / "cache") == path
    assert len(hub.requests) == before


def test_hf_interrupted_download_resumes_with_a_range_request(hub, tmp_path):
    # huggingface_hub writes in 10 MiB chunks, so only a cut past the first chunk leaves bytes to resume from.
    big = os.urandom(12 * 1024 * 1024)
    hub.repos[REPO].files["model-big.safetensors"] = big
    hub.repos[REPO].lfs.add("model-big.safetensors")
    hub.cut_after["model-big.safetensors"] = 11 * 1024 * 1024
    try:
        path = fetch_model(f"hf://{REPO}", tmp_path / "cache")
    except Exception:
        # The first attempt died with the connection (a pod restart): the next one resumes.
        path = fetch_model(f"hf://{REPO}", tmp_path / "cache")
    assert (path / "model-big.safetensors").read_bytes() == big
    ranges = [r for method, p, r in hub.requests if method == "GET" and p.endswith("model-big.safetensors") and r]
    assert ranges and ranges[-1] == f"bytes={10 * 1024 * 1024}-"


def test_hf_corrupt_file_is_rejected_and_not_served(hub, tmp_path):
    hub.corrupt.add("model.safetensors")
    with pytest.raises(ModelFetchError, match="model.safetensors failed its sha256 check"):
        fetch_model(f"hf://{REPO}", tmp_path / "cache")
    assert not (tmp_path / "cache" / "hf--acme--tiny-llm").exists()
    hub.corrupt.clear()  # the source is fixed: the next start downloads it afresh
    assert_model_tree(fetch_model(f"hf://{REPO}", tmp_path / "cache"))


def test_hf_private_repo_needs_the_token(hub, tmp_path, monkeypatch):
    hub.repos[REPO].private = True
    with pytest.raises(ModelFetchError, match="repository not found"):
        fetch_model(f"hf://{REPO}", tmp_path / "cache")
    with pytest.raises(ModelFetchError, match="token was refused"):
        fetch_model(f"hf://{REPO}", tmp_path / "cache", hf_token="hf_wrong")
    token_file = tmp_path / "secret" / "token"
    token_file.parent.mkdir()
    token_file.write_text("hf_good_token\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))  # a Secret mounted as a file
    assert_model_tree(fetch_model(f"hf://{REPO}", tmp_path / "cache"))
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.delenv("HF_TOKEN_PATH")
    monkeypatch.setenv("HF_TOKEN", "hf_good_token")  # a Secret as an env var
    assert_model_tree(fetch_model(f"hf://{REPO}", tmp_path / "cache"))


def test_hf_missing_repo_and_revision(hub, tmp_path):
    with pytest.raises(ModelFetchError, match="repository not found"):
        fetch_model("hf://acme/absent", tmp_path / "cache")
    with pytest.raises(ModelFetchError, match="revision 'v9' not found"):
        fetch_model(f"hf://{REPO}@v9", tmp_path / "cache")


def test_hf_unreachable_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ModelFetchError, match="cannot reach"):
        fetch_model(f"hf://{REPO}", tmp_path / "cache", hf_endpoint=f"http://127.0.0.1:{free_port()}")


def test_full_disk_is_a_clear_error(hub, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("tmpfs mounts are not permitted here")
    try:
        with pytest.raises(ModelFetchError, match="not enough disk space"):
            fetch_model(f"hf://{REPO}", small / "cache")
    finally:
        subprocess.run(["umount", str(small)], check=True)


# ---- s3:// ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    """One moto S3 server for the module (its start-up is the slow part), holding the model."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([shutil.which("moto_server") or "moto_server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd="/")
    try:
        wait_http(f"http://127.0.0.1:{port}/moto-api/", timeout=60)
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="models")
        for name, data in FILES.items():
            client.put_object(Bucket="models", Key=f"tiny-llm/{name}", Body=data)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3(moto_s3, monkeypatch):
    # What the pod gets from its Secret and config: credentials and the endpoint, as env vars.
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": moto_s3}.items():
        monkeypatch.setenv(name, value)
    return moto_s3


def test_s3_download_with_md5_check_and_marker(s3, tmp_path):
    path = fetch_model("s3://models/tiny-llm", tmp_path / "cache")
    assert_model_tree(path)
    assert fetch_model("s3://models/tiny-llm", tmp_path / "cache") == path


def test_s3_partial_file_resumes_from_its_size(s3, tmp_path):
    staging = tmp_path / "cache" / ".partial" / "s3--models--tiny-llm"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(WEIGHTS[:100_000])  # left by a killed pod
    path = fetch_model("s3://models/tiny-llm", tmp_path / "cache")
    assert_model_tree(path)


def test_s3_corrupt_partial_file_fails_its_md5_and_is_dropped(s3, tmp_path):
    staging = tmp_path / "cache" / ".partial" / "s3--models--tiny-llm"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 100_000)  # resumed onto garbage
    with pytest.raises(ModelFetchError, match="failed its md5 check"):
        fetch_model("s3://models/tiny-llm", tmp_path / "cache")
    assert not (staging / "model.safetensors").exists()
    assert_model_tree(fetch_model("s3://models/tiny-llm", tmp_path / "cache"))


def test_s3_errors(s3, tmp_path):
    with pytest.raises(ModelFetchError, match="not found"):
        fetch_model("s3://no-such-bucket/x", tmp_path / "cache")
    with pytest.raises(ModelFetchError, match="no files found"):
        fetch_model("s3://models/absent-prefix", tmp_path / "cache")


# ---- pvc:// -----------------------------------------------------------------------------------------

def test_pvc_is_used_in_place(tmp_path):
    volume = tmp_path / "volume" / "tiny-llm"
    volume.mkdir(parents=True)
    (volume / "config.json").write_text("{}")
    assert fetch_model(f"pvc://{volume}", tmp_path / "cache") == volume
    assert not (tmp_path / "cache").exists()  # nothing copied
    with pytest.raises(ModelFetchError, match="does not exist"):
        fetch_model(f"pvc://{tmp_path}/absent", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFetchError, match="is empty"):
        fetch_model(f"pvc://{tmp_path}/empty", tmp_path / "cache")


def test_stale_unmarked_folder_is_replaced(hub, tmp_path):
    stale = tmp_path / "cache" / "hf--acme--tiny-llm"
    stale.mkdir(parents=True)
    (stale / "leftover.bin").write_bytes(b"old")
    path = fetch_model(f"hf://{REPO}", tmp_path / "cache")
    assert path == stale and not (path / "leftover.bin").exists()
    assert_model_tree(path)


def test_cli_fetch_prints_the_path_and_fails_in_one_line(hub, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    cli = shutil.which("digital-worker")
    ok = subprocess.run([cli, "runtime", "fetch", "--source", f"hf://{REPO}", "--cache-dir", str(tmp_path / "c")],
                        capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert ok.returncode == 0, ok.stderr
    assert_model_tree(Path(ok.stdout.strip()))
    bad = subprocess.run([cli, "runtime", "fetch", "--source", "hf://acme/absent", "--cache-dir", str(tmp_path / "c")],
                         capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert bad.returncode == 2 and "repository not found" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


class _Killed(Exception):
    pass


def test_restart_after_a_kill_keeps_verified_files(s3, tmp_path):
    """A pod killed mid-download: files verified before the kill are neither fetched nor hashed again."""
    def kill_after_weights(line: str) -> None:
        if "model.safetensors" in line and line.endswith("ok"):
            raise _Killed

    with pytest.raises(_Killed):
        fetch_model("s3://models/tiny-llm", tmp_path / "cache", progress=kill_after_weights)
    assert not (tmp_path / "cache" / "s3--models--tiny-llm").exists()  # nothing half-done is served
    lines: list[str] = []
    path = fetch_model("s3://models/tiny-llm", tmp_path / "cache", progress=lines.append)
    assert "[2/4] model.safetensors already verified" in lines
    assert "[1/4] config.json already verified" in lines
    assert any(line.startswith("[4/4] tokenizer.json") and line.endswith("ok") for line in lines)
    assert_model_tree(path)
    assert not (path / ".digital-worker-verified.jsonl").exists()
