"""Run the real kopf operator: in the foreground (`digital-worker run`) or on a thread (dev mode, tests)."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any


def _import_handlers() -> None:
    # Registering happens at import: the handlers module is the operator's whole surface.
    import digital_worker.operator.handlers  # noqa: F401


def run_foreground(*, namespaces: list[str] | None, liveness: str | None, peering: str | None,
                   verbose: bool = False, metrics_port: int = 0) -> None:
    import kopf

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        # kopf logs every handler call per object at INFO: thousands of lines a second on a busy
        # cluster. Problems still show (WARNING and up); --verbose brings the rest back.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    _import_handlers()
    if metrics_port:
        import prometheus_client

        from digital_worker.operator.metrics import operator_metrics

        operator_metrics()  # register before the first scrape
        try:
            prometheus_client.start_http_server(metrics_port, addr="0.0.0.0")
        except OSError as exc:  # metrics are worth a warning, never an operator that will not start
            logging.getLogger("digital_worker.operator").warning("metrics port %s unavailable: %s", metrics_port, exc)
    # Standalone unless a peering name is given: kopf waits for its peering CRD whenever a name is set.
    peering_args = {"peering_name": peering, "standalone": False} if peering else {"standalone": True}
    kopf.run(clusterwide=not namespaces, namespaces=namespaces or (), liveness_endpoint=liveness, **peering_args)


class OperatorThread:
    """The real operator on its own thread and event loop, against the cluster KUBECONFIG points at."""

    def __init__(self, kubeconfig: str, *, resync_seconds: float = 60.0, log_level: int = logging.WARNING,
                 env: dict[str, str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.resync_seconds = resync_seconds
        self.log_level = log_level
        self.env = env or {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> "OperatorThread":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        # The operator reads its settings from the environment at start; put back what was there on stop,
        # so that one operator's settings (e.g. a Prometheus URL) never leak into the next one's.
        settings = {"KUBECONFIG": self.kubeconfig, "DW_RESYNC_SECONDS": str(self.resync_seconds), **self.env}
        self._saved_env = {key: os.environ.get(key) for key in settings}
        os.environ.update(settings)
        logging.getLogger("kopf").setLevel(self.log_level)
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"operator did not start within {timeout}s: {self.error}")
        if self.error is not None:
            raise RuntimeError(f"operator failed to start: {self.error}")

    def stop(self, timeout: float = 30) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        import kopf

        _import_handlers()
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ready = asyncio.Event()

        async def mark_ready() -> None:
            await ready.wait()
            self._ready.set()

        watcher = asyncio.create_task(mark_ready())
        try:
            await kopf.operator(clusterwide=True, standalone=True, ready_flag=ready, stop_flag=self._stop)
        finally:
            watcher.cancel()
