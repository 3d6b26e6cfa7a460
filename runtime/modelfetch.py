"""Fetch model weights into the pod's model cache before SGLang starts.

Sources: ``hf://org/name[@revision]`` (Hugging Face Hub, or any server speaking its file API at
``HF_ENDPOINT``), ``s3://bucket/prefix`` (any S3 API, ``AWS_ENDPOINT_URL_S3`` or ``endpoint_url``),
``pvc://path`` (a volume already mounted in the pod: nothing to copy, only checked).

Cache rules, so that restarts are cheap and a half-written model is never served:
- downloads land in ``<cache>/.partial/<name>`` and survive restarts, so an interrupted file resumes
  from where it stopped (HTTP range requests on both sources);
- every file is checked against the checksum its source publishes (git blob SHA-1 or LFS SHA-256 on
  the Hub; the MD5 ETag of single-part S3 objects, or their SHA-256 checksum when stored);
- only a complete, verified tree is renamed into ``<cache>/<name>`` (one atomic rename on the same
  filesystem) together with a marker file; a later start finding the marker skips the download.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

MARKER_NAME = ".digital-worker-model.json"
VERIFIED_LEDGER_NAME = ".digital-worker-verified.jsonl"
PARTIAL_DIR = ".partial"
HF_TOKEN_ENV = "HF_TOKEN"
HF_TOKEN_PATH_ENV = "HF_TOKEN_PATH"
# Headroom kept free on the cache volume beyond the model's own size (page cache, logs, temp files).
DISK_HEADROOM_BYTES = 64 * 1024
_CHUNK = 1024 * 1024

Progress = Callable[[str], None]


class ModelFetchError(Exception):
    """A fetch failed for a reason the user can act on; the message is one line."""


@dataclass(frozen=True)
class ModelSource:
    scheme: str  # "hf", "s3" or "pvc"
    location: str  # repo id, "bucket/prefix" or a filesystem path
    revision: str | None = None

    @property
    def cache_name(self) -> str:
        """A folder name unique to this source (and revision), safe on any filesystem."""
        raw = f"{self.scheme}--{self.location}" + (f"--{self.revision}" if self.revision else "")
        return re.sub(r"[^A-Za-z0-9._-]+", "--", raw).strip("-")

    @property
    def uri(self) -> str:
        suffix = f"@{self.revision}" if self.revision else ""
        return f"{self.scheme}://{self.location}{suffix}"


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: its path in the model tree, size and the checksum its source publishes."""

    path: str
    size: int
    checksum_kind: str | None = None  # "git-sha1", "sha256", "md5" or None
    checksum: str | None = None


def parse_model_source(uri: str, revision: str | None = None) -> ModelSource:
    match = re.fullmatch(r"(hf|s3|pvc)://(.+)", uri.strip())
    if not match:
        raise ModelFetchError(f"model_source {uri!r} must start with hf://, s3:// or pvc://")
    scheme, rest = match.groups()
    if scheme == "hf":
        repo_id, _, inline_revision = rest.partition("@")
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
            raise ModelFetchError(f"model_source {uri!r}: not a Hub repository id (org/name)")
        return ModelSource("hf", repo_id, inline_revision or revision)
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ModelFetchError(f"model_source {uri!r}: missing bucket name")
        return ModelSource("s3", f"{bucket}/{prefix.strip('/')}".rstrip("/"), revision)
    path = rest if rest.startswith("/") else "/" + rest
    return ModelSource("pvc", path, None)


def fetch_model(
    uri: str,
    cache_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    hf_token: str | None = None,
    hf_endpoint: str | None = None,
    s3_endpoint_url: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Make the model at `uri` available locally and return its folder (what --model-path gets)."""
    source = parse_model_source(uri, revision)
    say = progress or (lambda message: None)
    if source.scheme == "pvc":
        return _check_mounted(source)

    cache = Path(cache_dir)
    final = cache / source.cache_name
    marker = final / MARKER_NAME
    if marker.is_file():
        say(f"model {source.uri} already in cache at {final}")
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(f"model_cache_dir {cache}: cannot create it ({exc.strerror})") from None
    staging = cache / PARTIAL_DIR / source.cache_name
    staging.mkdir(parents=True, exist_ok=True)

    if source.scheme == "hf":
        fetcher: _Fetcher = _HubFetcher(source, hf_token or hub_token_from_environment(), hf_endpoint)
    else:
        fetcher = _S3Fetcher(source, s3_endpoint_url)
    files = fetcher.list_files()
    if not files:
        raise ModelFetchError(f"model_source {source.uri}: no files found")
    _check_free_space(staging, files)

    started = time.monotonic()
    total = sum(item.size for item in files)
    ledger = _VerifiedLedger(staging / VERIFIED_LEDGER_NAME)
    for index, item in enumerate(files, 1):
        target = staging / item.path
        if _is_complete(target, item) and ledger.holds(item):
            # Verified before the last restart: hashing it again would only cost time.
            say(f"[{index}/{len(files)}] {item.path} already verified")
            continue
        computed = None
        if not _is_complete(target, item):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                computed = fetcher.download(item, target)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise ModelFetchError(
                        f"model_cache_dir {cache}: disk full while writing {item.path}"
                    ) from None
                raise
        _verify(target, item, source, computed)
        ledger.add(item)
        say(f"[{index}/{len(files)}] {item.path} ({item.size} bytes) ok")
    fetcher.finish(staging)
    ledger.path.unlink(missing_ok=True)

    record = {
        "source": source.uri,
        "resolved_revision": fetcher.resolved_revision,
        "files": [{"path": f.path, "size": f.size, f.checksum_kind or "checksum": f.checksum} for f in files],
        "bytes": total,
        "seconds": round(time.monotonic() - started, 3),
    }
    (staging / MARKER_NAME).write_text(json.dumps(record, indent=2))
    _atomic_replace(staging, final)
    say(f"model {source.uri} ready at {final} ({total} bytes)")
    return final


def hub_token_from_environment() -> str | None:
    """The Hub token a Secret provides: env HF_TOKEN, or the file named by HF_TOKEN_PATH."""
    token = os.environ.get(HF_TOKEN_ENV, "").strip()
    if token:
        return token
    token_path = os.environ.get(HF_TOKEN_PATH_ENV)
    if token_path:
        try:
            return Path(token_path).read_text().strip() or None
        except OSError as exc:
            raise ModelFetchError(f"{HF_TOKEN_PATH_ENV}: cannot read {token_path} ({exc.strerror})") from None
    return None


def _check_mounted(source: ModelSource) -> Path:
    path = Path(source.location)
    if not path.exists():
        raise ModelFetchError(f"model_source {source.uri}: {path} does not exist (is the volume mounted?)")
    if path.is_dir() and not any(path.iterdir()):
        raise ModelFetchError(f"model_source {source.uri}: {path} is empty")
    return path


def _check_free_space(staging: Path, files: Iterable[RemoteFile]) -> None:
    missing = 0
    for item in files:
        target = staging / item.path
        have = target.stat().st_size if target.is_file() else 0
        missing += max(0, item.size - have)
    free = shutil.disk_usage(staging).free
    if missing + DISK_HEADROOM_BYTES > free:
        raise ModelFetchError(
            f"model_cache_dir {staging.parent.parent}: not enough disk space "
            f"(need {missing} bytes more, {free} free)"
        )


def _is_complete(target: Path, item: RemoteFile) -> bool:
    return target.is_file() and target.stat().st_size == item.size


def _verify(target: Path, item: RemoteFile, source: ModelSource, computed: str | None = None) -> None:
    """Check size and checksum; `computed` is the checksum a fetcher already took while writing."""
    size = target.stat().st_size
    if size != item.size:
        target.unlink()
        raise ModelFetchError(f"model_source {source.uri}: {item.path} has {size} bytes, expected {item.size}")
    if item.checksum_kind is None:
        return
    actual = computed or file_checksum(target, item.checksum_kind)
    if actual != item.checksum:
        # A corrupt file must not be resumed from: drop it so the next attempt starts it afresh.
        target.unlink()
        raise ModelFetchError(
            f"model_source {source.uri}: {item.path} failed its {item.checksum_kind} check "
            f"(got {actual}, expected {item.checksum})"
        )


def new_digest(kind: str, size: int):
    if kind == "git-sha1":
        # Git hashes a blob as "blob <size>\0<content>": the Hub publishes this for non-LFS files.
        return hashlib.sha1(f"blob {size}\0".encode())
    if kind in ("sha256", "sha256-b64"):
        return hashlib.sha256()
    if kind == "md5":
        return hashlib.md5()
    raise ValueError(f"unknown checksum kind {kind!r}")


def digest_text(digest, kind: str) -> str:
    if kind == "sha256-b64":
        return base64.b64encode(digest.digest()).decode()
    return digest.hexdigest()


def file_checksum(path: Path, kind: str) -> str:
    digest = new_digest(kind, path.stat().st_size)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest_text(digest, kind)


class _VerifiedLedger:
    """Files of an unfinished download already verified, so a restart does not hash them again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: set[tuple[str, int, str | None]] = set()
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries.add((entry["path"], entry["size"], entry["checksum"]))
                except (ValueError, KeyError):
                    continue  # a line torn by the kill: that file is simply checked again

    def holds(self, item: RemoteFile) -> bool:
        return (item.path, item.size, item.checksum) in self.entries

    def add(self, item: RemoteFile) -> None:
        self.entries.add((item.path, item.size, item.checksum))
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"path": item.path, "size": item.size, "checksum": item.checksum}) + "\n")


def _atomic_replace(staging: Path, final: Path) -> None:
    if final.exists():
        # A folder without a marker is a leftover of something else: move it aside, then drop it.
        stale = final.with_name(final.name + f".stale-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(staging, final)


def _require(module: str, scheme: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelFetchError(f"model_source: {scheme} sources need the {module} package in the image") from None


class _Fetcher:
    resolved_revision: str | None = None

    def list_files(self) -> list[RemoteFile]:
        raise NotImplementedError

    def download(self, item: RemoteFile, target: Path) -> str | None:
        """Write the file (resuming a partial one); return its checksum if taken while writing."""
        raise NotImplementedError

    def finish(self, staging: Path) -> None:
        """Remove the fetcher's own bookkeeping from the staging folder before it goes live."""


class _HubFetcher(_Fetcher):
    """Hugging Face Hub through huggingface_hub: repo info, tree listing, per-file resumable downloads."""

    def __init__(self, source: ModelSource, token: str | None, endpoint: str | None) -> None:
        HfApi = _require("huggingface_hub", "hf://").HfApi

        self.source = source
        self.token = token
        self.endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
        self.api = HfApi(endpoint=self.endpoint, token=token or False)

    def list_files(self) -> list[RemoteFile]:
        from huggingface_hub.hf_api import RepoFile

        with self._errors():
            info = self.api.repo_info(self.source.location, revision=self.source.revision or "main")
            self.resolved_revision = info.sha
            entries = list(
                self.api.list_repo_tree(self.source.location, revision=info.sha, recursive=True)
            )
        files = []
        for entry in entries:
            if not isinstance(entry, RepoFile):
                continue
            if entry.lfs is not None:
                files.append(RemoteFile(entry.path, entry.size, "sha256", entry.lfs.sha256))
            else:
                files.append(RemoteFile(entry.path, entry.size, "git-sha1", entry.blob_id))
        return sorted(files, key=lambda f: f.path)

    def download(self, item: RemoteFile, target: Path) -> str | None:
        from huggingface_hub import hf_hub_download

        staging = target.parents[len(Path(item.path).parts) - 1]
        with self._errors():
            # local_dir keeps an .incomplete file per download under .cache/, which the library
            # resumes with a range request after a restart.
            hf_hub_download(
                self.source.location,
                item.path,
                revision=self.resolved_revision,
                local_dir=staging,
                token=self.token or False,
                endpoint=self.endpoint,
            )
        return None  # the library wrote it: read it back to verify

    def finish(self, staging: Path) -> None:
        shutil.rmtree(staging / ".cache", ignore_errors=True)

    def _errors(self):
        return _translate_hub_errors(self.source)


class _translate_hub_errors:
    def __init__(self, source: ModelSource) -> None:
        self.source = source

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from huggingface_hub import errors

        uri = self.source.uri
        if isinstance(exc, errors.GatedRepoError):
            raise ModelFetchError(f"model_source {uri}: gated repository, the token has no access") from None
        if isinstance(exc, errors.RepositoryNotFoundError):
            raise ModelFetchError(
                f"model_source {uri}: repository not found (or private and the token cannot see it)"
            ) from None
        if isinstance(exc, errors.RevisionNotFoundError):
            raise ModelFetchError(f"model_source {uri}: revision {self.source.revision!r} not found") from None
        if isinstance(exc, errors.EntryNotFoundError):
            raise ModelFetchError(f"model_source {uri}: a listed file is missing on the server") from None
        if isinstance(exc, errors.HfHubHTTPError):
            status = getattr(exc.response, "status_code", None)
            if status in (401, 403):
                raise ModelFetchError(f"model_source {uri}: the Hub token was refused (HTTP {status})") from None
            raise ModelFetchError(f"model_source {uri}: Hub error HTTP {status}") from None
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise ModelFetchError(f"model_source {uri}: disk full while downloading") from None
        if exc_type.__name__ in {"ConnectError", "ConnectTimeout", "ReadTimeout"} or isinstance(
            exc, ConnectionError
        ):
            raise ModelFetchError(f"model_source {uri}: cannot reach the Hub ({exc})") from None
        return False


class _S3Fetcher(_Fetcher):
    """Any S3 API through boto3: list the prefix, then ranged GETs that append to partial files."""

    def __init__(self, source: ModelSource, endpoint_url: str | None) -> None:
        boto3 = _require("boto3", "s3://")

        self.source = source
        self.bucket, _, self.prefix = source.location.partition("/")
        self.client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3"))

    def list_files(self) -> list[RemoteFile]:
        prefix = f"{self.prefix}/" if self.prefix else ""
        files: list[RemoteFile] = []
        with self._errors():
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for entry in page.get("Contents", []):
                    relative = entry["Key"][len(prefix):]
                    if not relative or relative.endswith("/"):
                        continue
                    files.append(self._describe(entry["Key"], relative, entry))
        return sorted(files, key=lambda f: f.path)

    def _describe(self, key: str, relative: str, entry: dict) -> RemoteFile:
        head = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        sha256 = head.get("ChecksumSHA256")
        if sha256 and "-" not in sha256:
            return RemoteFile(relative, entry["Size"], "sha256-b64", sha256)
        etag = entry.get("ETag", "").strip('"')
        if etag and "-" not in etag:  # single-part uploads: the ETag is the content's MD5
            return RemoteFile(relative, entry["Size"], "md5", etag)
        return RemoteFile(relative, entry["Size"])  # multipart without stored checksum: size only

    def download(self, item: RemoteFile, target: Path) -> str | None:
        key = f"{self.prefix}/{item.path}" if self.prefix else item.path
        have = target.stat().st_size if target.is_file() else 0
        if have > item.size:
            target.unlink()
            have = 0
        # Hash as the bytes go by (the part already on disk first), instead of reading the file again.
        digest = new_digest(item.checksum_kind, item.size) if item.checksum_kind else None
        if digest is not None and have:
            with open(target, "rb") as handle:
                for chunk in iter(lambda: handle.read(_CHUNK), b""):
                    digest.update(chunk)
        with self._errors():
            extra = {"Range": f"bytes={have}-"} if have else {}
            body = self.client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"]
            with open(target, "ab" if have else "wb") as handle:
                for chunk in iter(lambda: body.read(_CHUNK), b""):
                    handle.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
        return digest_text(digest, item.checksum_kind) if digest is not None else None

    def _errors(self):
        return _translate_s3_errors(self.source)


class _translate_s3_errors:
    def __init__(self, source: ModelSource) -> None:
        self.source = source

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from botocore import exceptions

        uri = self.source.uri
        if isinstance(exc, exceptions.ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "NoSuchKey", "404"):
                raise ModelFetchError(f"model_source {uri}: not found ({code})") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise ModelFetchError(f"model_source {uri}: access denied by S3 ({code})") from None
            raise ModelFetchError(f"model_source {uri}: S3 error {code}") from None
        if isinstance(exc, exceptions.NoCredentialsError):
            raise ModelFetchError(f"model_source {uri}: no S3 credentials in the environment") from None
        if isinstance(exc, exceptions.EndpointConnectionError):
            raise ModelFetchError(f"model_source {uri}: cannot reach the S3 endpoint") from None
        return False
