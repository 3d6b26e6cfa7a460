"""A tiny stand-in for the Hugging Face Hub's file API, served over real HTTP on loopback.

It answers the endpoints huggingface_hub calls for a download, the way the Hub does:
- GET  /api/models/{repo}/revision/{rev}     repo info with the resolved commit sha
- GET  /api/models/{repo}/tree/{rev}[/path]  file listing (oid = git blob sha1, lfs.oid = sha256)
- HEAD/GET /{repo}/resolve/{rev}/{file}      X-Repo-Commit, ETag (X-Linked-Etag for LFS), ranges
Errors carry the Hub's X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound) and a
wrong bearer token gets 401 "Invalid credentials in Authorization header".
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths stored in LFS (checksummed by sha256)
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    private: bool = False


class FakeHub:
    def __init__(self, token: str | None = None) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.token = token
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.corrupt: set[str] = set()  # files served with flipped bytes
        self.cut_after: dict[str, int] = {}  # file -> bytes sent before the connection drops (once)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                hub._handle(self, body=True)

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ---- request handling -------------------------------------------------------------------
    def _handle(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = request.path.split("?", 1)[0]
        self.requests.append((request.command, path, request.headers.get("Range")))
        auth = request.headers.get("Authorization")
        if auth is not None and self.token is not None and auth != f"Bearer {self.token}":
            return self._error(request, 401, message="Invalid credentials in Authorization header")
        authorized = auth is not None and self.token is not None

        if match := re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path):
            repo = self._repo(request, match.group(1), authorized)
            if repo and self._revision_ok(request, match.group(2)):
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                info = {"id": match.group(1), "modelId": match.group(1), "sha": repo.commit,
                        "private": repo.private, "siblings": siblings, "tags": [], "downloads": 0}
                self._json(request, info, body)
            return None
        if match := re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path):
            repo = self._repo(request, match.group(1), authorized)
            if repo and self._revision_ok(request, match.group(2)):
                entries = []
                for name, data in sorted(repo.files.items()):
                    entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
                    if name in repo.lfs:
                        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                        "pointerSize": 134}
                    entries.append(entry)
                self._json(request, entries, body)
            return None
        if match := re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(request, match.group(1), authorized)
            if repo is None or not self._revision_ok(request, match.group(2)):
                return None
            name = match.group(3)
            if name not in repo.files:
                return self._error(request, 404, code="EntryNotFound")
            return self._file(request, repo, name, body)
        return self._error(request, 404)

    def _repo(self, request, repo_id: str, authorized: bool) -> FakeRepo | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            # The Hub hides private repositories behind the same answer as missing ones.
            self._error(request, 401 if repo else 404, code="RepoNotFound")
            return None
        return repo

    def _revision_ok(self, request, revision: str) -> bool:
        known = {"main"} | {repo.commit for repo in self.repos.values()}
        if revision not in known:
            self._error(request, 404, code="RevisionNotFound")
            return False
        return True

    def _file(self, request, repo: FakeRepo, name: str, body: bool) -> None:
        data = repo.files[name]
        if name in self.corrupt:
            data = bytes(b ^ 0xFF for b in data)
        etag = hashlib.sha256(data).hexdigest() if name in repo.lfs else git_blob_sha1(repo.files[name])
        start = 0
        range_header = request.headers.get("Range")
        if range_header and (match := re.fullmatch(r"bytes=(\d+)-(\d*)", range_header)):
            start = int(match.group(1))
        chunk = data[start:]
        request.send_response(206 if start else 200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(chunk)))
        request.send_header("Accept-Ranges", "bytes")
        request.send_header("ETag", f'"{etag}"')
        if name in repo.lfs:
            request.send_header("X-Linked-Etag", f'"{etag}"')
            request.send_header("X-Linked-Size", str(len(data)))
        request.send_header("X-Repo-Commit", repo.commit)
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.end_headers()
        if not body:
            return
        cut = self.cut_after.pop(name, None) if request.command == "GET" else None
        if cut is not None:
            # Simulate a dropped connection mid-file: send part of it, then hang up.
            request.wfile.write(chunk[:cut])
            request.wfile.flush()
            request.close_connection = True
            request.connection.shutdown(2)
            return
        request.wfile.write(chunk)

    def _json(self, request, payload, body: bool) -> None:
        data = json.dumps(payload).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _error(self, request, status: int, code: str | None = None, message: str | None = None) -> None:
        data = json.dumps({"error": message or code or "not found"}).encode()
        request.send_response(status)
        if code:
            request.send_header("X-Error-Code", code)
        if message:
            request.send_header("X-Error-Message", message)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(data)
