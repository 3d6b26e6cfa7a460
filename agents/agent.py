"""The node agent process: a collection loop, an XID watcher and one small HTTP server.

Every `interval` seconds the loop reads NVML, refreshes GPU -> pod attribution and renders the
exposition once; `/metrics` serves those bytes, so a scrape costs a dictionary lookup and a socket
write however often Prometheus comes. `/healthz` says the loop is alive, `/readyz` that a first
collection exists. Nothing here may take the node down: NVML or kubelet trouble degrades metrics,
never the process.

The HTTP server is a few lines on `socketserver` rather than `http.server`, whose imports (email,
html, mimetypes) cost about 5 MB of RSS out of a 40 MB budget.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass

from digital_worker.agents.collector import GpuCollector, XidWatcher
from digital_worker.agents.exposition import CONTENT_TYPE, MetricFamily, label_string, render
from digital_worker.agents.podresources import DEFAULT_SOCKET, PodAttribution

log = logging.getLogger("digital_worker.agents.agent")

NVML_BACKEND_ENV = "DW_NVML_BACKEND"


def load_nvml(backend: str | None = None):
    """The pynvml-compatible module to use: `backend` (a module name or a .py path), else
    $DW_NVML_BACKEND, else nvidia-ml-py's real ``pynvml``. Returns None if that cannot be imported."""
    spec = backend or os.environ.get(NVML_BACKEND_ENV) or "pynvml"
    try:
        if spec.endswith(".py") or os.sep in spec:
            module_spec = importlib.util.spec_from_file_location("dw_nvml_backend", spec)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"cannot load {spec}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except ImportError as exc:
        log.warning("NVML backend %s cannot be imported: %s", spec, exc)
        return None


@dataclass(frozen=True)
class AgentConfig:
    port: int = 9400
    listen_address: str = "0.0.0.0"
    interval: float = 1.0
    node_name: str = ""
    nvml_backend: str | None = None
    pod_resources_socket: str | None = DEFAULT_SOCKET
    pod_resources_refresh: float = 10.0
    pod_resources_transport: str = "http2"
    nvml_retry: float = 60.0


class _NoNvml:
    """Stands in when not even the pynvml module imports: every init fails like a missing driver."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError("pynvml is not installed")


class NodeAgent:
    def __init__(self, config: AgentConfig, nvml=None) -> None:
        self.config = config
        self.hostname = config.node_name or os.environ.get("NODE_NAME") or socket.gethostname()
        nvml = nvml if nvml is not None else (load_nvml(config.nvml_backend) or _NoNvml())
        self.collector = GpuCollector(nvml, self.hostname, nvml_retry_seconds=config.nvml_retry)
        self.attribution = PodAttribution(config.pod_resources_socket, config.pod_resources_refresh,
                                          config.pod_resources_transport)
        self.xid_watcher: XidWatcher | None = None
        self.metrics_body = b""
        self.last_loop = 0.0
        self.stop_event = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._loop_thread: threading.Thread | None = None

    # --- collection -----------------------------------------------------------------------------
    def collect_once(self) -> None:
        was_up = self.collector.nvml_up
        self.collector.collect()
        if self.collector.nvml_up and (not was_up or self.xid_watcher is None):
            self._start_xid_watcher()
        owners = self.attribution.refresh()
        families = self.collector.families(owners)
        pod_resources_up = MetricFamily("digital_worker_pod_resources_up",
                                        "1 when the kubelet PodResources API answered the last List.")
        pod_resources_up.add(label_string({"Hostname": self.hostname}), 1 if self.attribution.up else 0)
        families.append(pod_resources_up)
        self.metrics_body = render(families)
        self.last_loop = time.monotonic()

    def _start_xid_watcher(self) -> None:
        if self.xid_watcher is not None:
            self.xid_watcher.stop()
            self.xid_watcher = None
        watcher = XidWatcher(self.collector)
        try:
            if not watcher.register():
                log.info("no GPU supports XID events; XIDs will not be reported")
                return
        except Exception as exc:
            log.warning("cannot watch XID events: %s", exc)
            return
        watcher.start()
        self.xid_watcher = watcher

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                self.collect_once()
            except Exception:  # a bug in one cycle must not stop the metrics for good
                log.exception("collection failed")
                self.last_loop = time.monotonic()
            self.stop_event.wait(max(0.0, self.config.interval - (time.monotonic() - started)))

    # --- health ---------------------------------------------------------------------------------
    def healthy(self) -> bool:
        # Alive unless the loop stalled for many intervals; NVML being down is not a reason to restart.
        return time.monotonic() - self.last_loop < max(30.0, 10 * self.config.interval)

    def ready(self) -> bool:
        return bool(self.metrics_body)  # the loop renders at least digital_worker_nvml_up

    # --- process --------------------------------------------------------------------------------
    def start(self) -> int:
        """Start collecting and serving; returns the bound port."""
        try:
            self.collector.start()
            self.collect_once()
        except Exception:  # whatever NVML or the kubelet did, serve what we have and keep retrying
            log.exception("first collection failed")
        self._server = _HttpServer((self.config.listen_address, self.config.port), self)
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()
        self._loop_thread = threading.Thread(target=self._loop, name="collector", daemon=True)
        self._loop_thread.start()
        return self._server.server_address[1]

    def stop(self) -> None:
        self.stop_event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=self.config.interval + 5)
        if self.xid_watcher is not None:
            self.xid_watcher.stop()
        self.attribution.close()
        self.collector.shutdown()

    def run_forever(self) -> int:
        port = self.start()
        log.info("node agent for %s serving /metrics on %s:%d", self.hostname, self.config.listen_address, port)
        done = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: done.set())
        done.wait()
        self.stop()
        return 0


class _HttpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, agent: NodeAgent) -> None:
        self.agent = agent
        super().__init__(address, _HttpHandler)


class _HttpHandler(socketserver.StreamRequestHandler):
    """HTTP/1.1 GET/HEAD for three paths, with keep-alive (Prometheus reuses its connection)."""

    timeout = 30
    MAX_LINE = 8192
    MAX_HEADERS = 100

    def handle(self) -> None:
        try:
            while self._handle_one():
                pass
        except (ConnectionError, socket.timeout, TimeoutError):
            pass

    def _handle_one(self) -> bool:
        request_line = self.rfile.readline(self.MAX_LINE + 1)
        if not request_line:
            return False
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or len(request_line) > self.MAX_LINE:
            self._send(400, b"bad request\n", close=True)
            return False
        method, target, version = parts
        keep_alive = version == "HTTP/1.1"
        for _ in range(self.MAX_HEADERS + 1):
            header = self.rfile.readline(self.MAX_LINE + 1)
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.decode("latin-1").partition(":")
            if name.strip().lower() == "connection":
                token = value.strip().lower()
                keep_alive = token == "keep-alive" or (keep_alive and token != "close")
        else:
            self._send(431, b"too many headers\n", close=True)
            return False
        if method not in ("GET", "HEAD"):
            self._send(405, b"method not allowed\n", close=not keep_alive, head=False, extra="Allow: GET, HEAD\r\n")
            return keep_alive
        agent: NodeAgent = self.server.agent
        path = target.split("?", 1)[0]
        head = method == "HEAD"
        if path == "/metrics":
            self._send(200, agent.metrics_body, CONTENT_TYPE, close=not keep_alive, head=head)
        elif path == "/healthz":
            ok = agent.healthy()
            self._send(200 if ok else 503, b"ok\n" if ok else b"collection loop stalled\n",
                       close=not keep_alive, head=head)
        elif path == "/readyz":
            ok = agent.ready()
            self._send(200 if ok else 503, b"ok\n" if ok else b"no collection yet\n", close=not keep_alive, head=head)
        else:
            self._send(404, b"not found\n", close=not keep_alive, head=head)
        return keep_alive

    _REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                431: "Request Header Fields Too Large", 503: "Service Unavailable"}

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              close: bool = False, head: bool = False, extra: str = "") -> None:
        header = (f"HTTP/1.1 {status} {self._REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\n{extra}{'Connection: close' if close else 'Connection: keep-alive'}"
                  "\r\n\r\n").encode("latin-1")
        self.wfile.write(header if head else header + body)
        self.wfile.flush()


def main(config: AgentConfig, log_level: str = "INFO") -> int:
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return NodeAgent(config).run_forever()
