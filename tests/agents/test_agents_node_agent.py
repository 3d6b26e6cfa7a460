"""NodeAgent wiring in process: health and readiness, NVML arriving late, the XID watcher lifecycle."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

from digital_worker.agents import nvml_fake
from digital_worker.agents.agent import AgentConfig, NodeAgent, load_nvml


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_healthz_turns_503_when_the_collection_loop_stalls():
    nvml_fake.fake_configure(gpus=1)
    agent = NodeAgent(AgentConfig(port=0, listen_address="127.0.0.1", interval=0.2, pod_resources_socket=None),
                      nvml=nvml_fake)
    port = agent.start()
    try:
        base = f"http://127.0.0.1:{port}"
        assert get(base + "/healthz") == (200, "ok\n")
        assert get(base + "/readyz") == (200, "ok\n")
        agent.last_loop -= 3600  # as if the loop had been stuck for an hour
        agent.stop_event.set()  # and stop it from catching up
        time.sleep(0.3)
        assert get(base + "/healthz")[0] == 503
    finally:
        agent.stop()


def test_not_ready_before_the_first_collection():
    agent = NodeAgent(AgentConfig(pod_resources_socket=None), nvml=nvml_fake)
    assert not agent.ready()
    nvml_fake.fake_configure(gpus=1)
    agent.collector.start()
    agent.collect_once()
    assert agent.ready()
    agent.stop()


def test_xid_watcher_starts_when_nvml_appears_late():
    class LateDriver:
        loaded = False

        def __getattr__(self, name):
            return getattr(nvml_fake, name)

        def nvmlInit(self):
            if not self.loaded:
                raise nvml_fake.NVMLError(nvml_fake.NVML_ERROR_DRIVER_NOT_LOADED)
            nvml_fake.nvmlInit()

    nvml_fake.fake_configure(gpus=2)
    late = LateDriver()
    agent = NodeAgent(AgentConfig(pod_resources_socket=None, nvml_retry=0.0), nvml=late)
    try:
        agent.collector.start()
        agent.collect_once()
        assert agent.xid_watcher is None and b"digital_worker_nvml_up{" in agent.metrics_body
        assert b"} 0\n" in agent.metrics_body.split(b"digital_worker_nvml_up{", 1)[1][:40]
        late.loaded = True
        agent.collect_once()
        assert agent.collector.nvml_up and agent.xid_watcher is not None and agent.xid_watcher.is_alive()
        nvml_fake.fake_inject_xid(1, 94)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and agent.collector.devices[1].last_xid != 94:
            time.sleep(0.02)
        agent.collect_once()
        assert b'DCGM_FI_DEV_XID_ERRORS{gpu="1"' in agent.metrics_body
        line = [l for l in agent.metrics_body.decode().splitlines() if l.startswith('DCGM_FI_DEV_XID_ERRORS{gpu="1"')][0]
        assert line.endswith(" 94")
    finally:
        agent.stop()
    assert agent.xid_watcher is None or not agent.xid_watcher.is_alive()


def test_nvml_backend_seam(tmp_path, monkeypatch):
    assert load_nvml("digital_worker.agents.nvml_fake") is nvml_fake
    import pynvml

    monkeypatch.delenv("DW_NVML_BACKEND", raising=False)
    assert load_nvml(None) is pynvml  # the real nvidia-ml-py by default
    monkeypatch.setenv("DW_NVML_BACKEND", "digital_worker.agents.nvml_fake")
    assert load_nvml(None) is nvml_fake
    module_file = tmp_path / "my_nvml.py"
    module_file.write_text("def nvmlInit():\n    raise RuntimeError('no driver')\n")
    assert load_nvml(str(module_file)).nvmlInit is not None
    assert load_nvml("no_such_nvml_module") is None
    # An unimportable backend still gives a running agent reporting NVML down.
    agent = NodeAgent(AgentConfig(pod_resources_socket=None, nvml_backend="no_such_nvml_module"))
    agent.collector.start()
    agent.collect_once()
    assert b"digital_worker_nvml_up" in agent.metrics_body and not agent.collector.nvml_up
    agent.stop()


def test_a_driver_in_a_bad_state_never_stops_the_agent():
    class BrokenDriver:
        """nvmlInit works, then counting GPUs fails, as with a driver/library version mismatch."""

        def __getattr__(self, name):
            return getattr(nvml_fake, name)

        def nvmlDeviceGetCount(self):
            raise nvml_fake.NVMLError(nvml_fake.NVML_ERROR_LIB_RM_VERSION_MISMATCH)

    nvml_fake.fake_configure(gpus=2)
    agent = NodeAgent(AgentConfig(port=0, listen_address="127.0.0.1", interval=0.2, pod_resources_socket=None,
                                  nvml_retry=0.1), nvml=BrokenDriver())
    port = agent.start()
    try:
        time.sleep(0.5)  # a few retries
        status, body = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and 'digital_worker_nvml_up{Hostname="' in body
        assert [l for l in body.splitlines() if l.startswith("digital_worker_nvml_up")][0].endswith(" 0")
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        agent.stop()
