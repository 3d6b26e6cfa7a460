"""Start `python -m digital_worker.agents agent` as a real process for tests, and stop it by pid."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dwtest_support import free_port, stop_process  # noqa: F401  (free_port re-exported for the agent tests)


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout}s")
        time.sleep(0.1)


class AgentProcess:
    def __init__(self, workdir: Path, *, fake_gpus: int | None = 4, node_name: str = "gpu-node-1",
                 pod_resources_socket: str = "", extra_args: tuple[str, ...] = (), fake_config: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.events_file = workdir / f"xid-events-{self.port}"
        self.log_path = workdir / f"agent-{self.port}.log"
        self.argv = [sys.executable, "-m", "digital_worker.agents", "agent", "--port", str(self.port),
                     "--listen-address", "127.0.0.1", "--node-name", node_name,
                     "--pod-resources-socket", pod_resources_socket, "--pod-resources-refresh", "0.5",
                     "--interval", "0.5", *extra_args]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DW_")}
        if fake_gpus is not None:
            self.argv += ["--nvml-backend", "digital_worker.agents.nvml_fake"]
            self.env["DW_FAKE_NVML"] = json.dumps({"gpus": fake_gpus, **(fake_config or {})})
            self.env["DW_FAKE_NVML_EVENTS"] = str(self.events_file)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "AgentProcess":
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/readyz", timeout=30)
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=10)
        self.log.close()

    def inject_xid(self, gpu_index: int, xid: int) -> None:
        with open(self.events_file, "a", encoding="utf-8") as handle:
            handle.write(f"{gpu_index} {xid}\n")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def output(self) -> str:
        return self.log_path.read_text()
