"""Collector behaviour against the pynvml-compatible fake (no GPU exists here) and the real no-NVML path."""
from __future__ import annotations

import inspect
import time

import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from digital_worker.agents import nvml_fake
from digital_worker.agents.collector import FATAL_XIDS, GpuCollector, GpuOwner, XidWatcher
from digital_worker.agents.exposition import render


def scrape(collector: GpuCollector, owners=None) -> dict[str, list]:
    """Render and parse with prometheus_client's own parser: name -> samples."""
    text = render(collector.families(owners)).decode()
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # The parser appends _total to counter samples; key by the name as exposed.
            name = sample.name if sample.name in text else family.name
            parsed.setdefault(name, []).append(sample)
    return parsed


def by_gpu(samples) -> dict[str, float]:
    return {sample.labels["gpu"]: sample.value for sample in samples}


@pytest.fixture
def fake():
    nvml_fake.fake_configure(gpus=4)
    yield nvml_fake
    nvml_fake.fake_configure(gpus=0)


def test_fake_mirrors_pynvml_names_constants_and_errors():
    # The fake is only useful if the agent code path is the real one: same names, arities, classes.
    used = [name for name in dir(nvml_fake) if name.startswith("nvml")]
    assert len(used) > 20
    for name in used:
        real = getattr(pynvml, name, None)
        assert real is not None, f"pynvml has no {name}"
        if callable(real):
            real_params = [p for p in inspect.signature(real).parameters.values() if p.default is p.empty]
            fake_params = [p for p in inspect.signature(getattr(nvml_fake, name)).parameters.values()
                           if p.default is p.empty]
            assert len(real_params) == len(fake_params), name
        else:
            assert getattr(nvml_fake, name) == real, name
    for name in dir(nvml_fake):
        if name.startswith("NVML_") or name.startswith("NVMLError_"):
            assert hasattr(pynvml, name), name
            if name.startswith("NVML_"):
                assert getattr(pynvml, name) == getattr(nvml_fake, name), name
    for code in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_TIMEOUT):
        real_error, fake_error = pynvml.NVMLError(code), nvml_fake.NVMLError(code)
        assert type(real_error).__name__ == type(fake_error).__name__
        assert isinstance(fake_error, nvml_fake.NVMLError)


def test_collects_every_reading_under_dcgm_names(fake):
    collector = GpuCollector(fake, "node-a")
    assert collector.start()
    collector.collect()
    metrics = scrape(collector)
    assert by_gpu(metrics["DCGM_FI_DEV_GPU_UTIL"]) == {"0": 37, "1": 38, "2": 39, "3": 40}
    assert by_gpu(metrics["DCGM_FI_DEV_FB_TOTAL"])["0"] == 81559
    assert by_gpu(metrics["DCGM_FI_DEV_FB_USED"])["0"] == 60000
    assert by_gpu(metrics["DCGM_FI_DEV_FB_FREE"])["0"] == 21559
    assert by_gpu(metrics["DCGM_FI_DEV_POWER_USAGE"])["0"] == 312.0
    assert by_gpu(metrics["DCGM_FI_DEV_POWER_MGMT_LIMIT"])["0"] == 700.0
    assert by_gpu(metrics["DCGM_FI_DEV_SM_CLOCK"])["0"] == 1980
    assert by_gpu(metrics["DCGM_FI_DEV_MEM_CLOCK"])["0"] == 2619
    assert by_gpu(metrics["DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"])["0"] == nvml_fake.nvmlClocksEventReasonGpuIdle
    assert by_gpu(metrics["DCGM_FI_DEV_ECC_SBE_AGG_TOTAL"])["0"] == 2
    for name in ("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
                 "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
                 "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DEV_ROW_REMAP_PENDING", "DCGM_FI_DEV_XID_ERRORS"):
        assert len(metrics[name]) == 4, name
    assert by_gpu(metrics["digital_worker_gpu_healthy"]) == {"0": 1, "1": 1, "2": 1, "3": 1}
    assert metrics["digital_worker_nvml_up"][0].value == 1
    # Counters keep dcgm-exporter's exact names (no _total added).
    assert "DCGM_FI_DEV_PCIE_REPLAY_COUNTER" in metrics
    labels = metrics["DCGM_FI_DEV_GPU_UTIL"][0].labels
    assert labels["UUID"] == "GPU-fa4e0000-0000-4000-8000-000000000000"
    assert labels["modelName"] == "NVIDIA H100 80GB HBM3"
    assert labels["Hostname"] == "node-a"
    assert labels["device"] == "nvidia0"
    assert "pod" not in labels


def test_readings_follow_the_device(fake):
    collector = GpuCollector(fake, "node-a")
    collector.start()
    collector.collect()
    fake.fake_set(2, temperature=91, gpu_util=100, fb_used=80000 * 1024 * 1024)
    collector.collect()
    metrics = scrape(collector)
    assert by_gpu(metrics["DCGM_FI_DEV_GPU_TEMP"])["2"] == 91
    assert by_gpu(metrics["DCGM_FI_DEV_GPU_UTIL"])["2"] == 100
    assert by_gpu(metrics["DCGM_FI_DEV_FB_USED"])["2"] == 80000


def test_not_supported_is_skipped_for_that_gpu_once_and_not_retried(fake, caplog):
    fake.fake_configure(gpus=2, unsupported={1: ["nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetRemappedRows"]})
    collector = GpuCollector(fake, "node-a")
    collector.start()
    with caplog.at_level("DEBUG", logger="digital_worker.agents.collector"):
        for _ in range(5):
            collector.collect()
    # Asked once on GPU 1 (then remembered), every time on GPU 0.
    assert fake.fake_call_count("nvmlDeviceGetPcieReplayCounter") == 5 + 1
    assert fake.fake_call_count("nvmlDeviceGetRemappedRows") == 5 + 1
    debug_lines = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(debug_lines) == 2 and all(r.levelname == "DEBUG" for r in debug_lines)
    metrics = scrape(collector)
    assert set(by_gpu(metrics["DCGM_FI_DEV_PCIE_REPLAY_COUNTER"])) == {"0"}
    assert set(by_gpu(metrics["DCGM_FI_DEV_ROW_REMAP_FAILURE"])) == {"0"}
    assert set(by_gpu(metrics["DCGM_FI_DEV_GPU_UTIL"])) == {"0", "1"}  # the rest of GPU 1 is still read
    assert by_gpu(metrics["digital_worker_gpu_healthy"]) == {"0": 1, "1": 1}


def test_gpu_lost_is_reported_unhealthy_never_raised(fake, caplog):
    collector = GpuCollector(fake, "node-a")
    collector.start()
    collector.collect()
    fake.fake_lose_gpu(3)
    with caplog.at_level("ERROR", logger="digital_worker.agents.collector"):
        collector.collect()
        collector.collect()
    metrics = scrape(collector)
    assert by_gpu(metrics["digital_worker_gpu_healthy"]) == {"0": 1, "1": 1, "2": 1, "3": 0}
    assert "3" not in by_gpu(metrics["DCGM_FI_DEV_GPU_UTIL"])  # no stale readings for a lost GPU
    assert sum("is lost" in r.getMessage() for r in caplog.records) == 1  # said once


def test_gpu_lost_before_identification_still_shows_up(fake):
    fake.fake_configure(gpus=2, lost=[1])
    collector = GpuCollector(fake, "node-a")
    assert collector.start()
    collector.collect()
    healthy = scrape(collector)["digital_worker_gpu_healthy"]
    assert {s.labels["gpu"]: s.value for s in healthy} == {"0": 1, "1": 0}


def test_uncorrectable_ecc_and_remap_failure_make_a_gpu_unhealthy(fake):
    collector = GpuCollector(fake, "node-a")
    collector.start()
    fake.fake_set(0, ecc_dbe_volatile=2)
    fake.fake_set(1, remap_failure=1)
    fake.fake_set(2, ecc_sbe_volatile=40, remapped_correctable=3)  # corrected errors: still healthy
    collector.collect()
    assert by_gpu(scrape(collector)["digital_worker_gpu_healthy"]) == {"0": 0, "1": 0, "2": 1, "3": 1}


def test_xid_events_from_the_event_wait_thread(fake):
    fake.fake_configure(gpus=4, no_xid_events=[3])
    collector = GpuCollector(fake, "node-a")
    collector.start()
    watcher = XidWatcher(collector, wait_ms=100)
    assert watcher.register()
    assert [d.index for d in watcher.registered] == [0, 1, 2]  # GPU 3 cannot deliver XID events
    watcher.start()
    try:
        fake.fake_inject_xid(1, 13)  # graphics engine exception: not fatal
        fake.fake_inject_xid(2, 79)  # fell off the bus: fatal
        fake.fake_inject_xid(2, 79)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(d.xid_counts.get(79, 0) for d in collector.devices) < 2:
            time.sleep(0.02)
    finally:
        watcher.stop()
    assert not watcher.is_alive()
    collector.collect()
    metrics = scrape(collector)
    assert by_gpu(metrics["DCGM_FI_DEV_XID_ERRORS"]) == {"0": 0, "1": 13, "2": 79, "3": 0}
    assert by_gpu(metrics["digital_worker_gpu_healthy"]) == {"0": 1, "1": 1, "2": 0, "3": 1}
    counts = {(s.labels["gpu"], s.labels["xid"]): s.value for s in metrics["digital_worker_gpu_xid_errors_total"]}
    assert counts == {("1", "13"): 1, ("2", "79"): 2}


def test_pod_labels_from_attribution(fake):
    collector = GpuCollector(fake, "node-a")
    collector.start()
    collector.collect()
    owners = {
        "GPU-fa4e0000-0000-4000-8000-000000000001": (GpuOwner("worker-abc", "team-a", "sglang"),),
        # Two pods time-slicing one GPU: one series per pod, as dcgm-exporter does.
        "GPU-fa4e0000-0000-4000-8000-000000000002": (GpuOwner("p1", "team-b", "c"), GpuOwner("p2", "team-b", "c")),
    }
    util = scrape(collector, owners)["DCGM_FI_DEV_GPU_UTIL"]
    pods = sorted((s.labels["gpu"], s.labels.get("pod"), s.labels.get("namespace"), s.labels.get("container"))
                  for s in util)
    assert pods == [("0", None, None, None), ("1", "worker-abc", "team-a", "sglang"),
                    ("2", "p1", "team-b", "c"), ("2", "p2", "team-b", "c"), ("3", None, None, None)]


def test_agent_and_operator_agree_on_fatal_xids():
    from digital_worker.operator.gpu_health import FATAL_XIDS as OPERATOR_FATAL_XIDS

    assert FATAL_XIDS == OPERATOR_FATAL_XIDS
    assert {48, 63, 64, 74, 79, 94, 95} <= FATAL_XIDS


def test_real_pynvml_without_a_driver_reports_nvml_down(caplog):
    # This machine has no NVIDIA driver: the real nvidia-ml-py path must degrade, not raise.
    collector = GpuCollector(pynvml, "node-a", nvml_retry_seconds=3600)
    with caplog.at_level("WARNING", logger="digital_worker.agents.collector"):
        assert collector.start() is False
        collector.collect()
        collector.collect()
    metrics = scrape(collector)
    assert metrics["digital_worker_nvml_up"][0].value == 0
    assert "DCGM_FI_DEV_GPU_UTIL" not in metrics
    assert sum("NVML unavailable" in r.getMessage() for r in caplog.records) == 1


def test_nvml_init_is_retried_until_a_driver_appears(fake):
    class LateDriver:
        """The fake, but nvmlInit fails until the 'driver' is loaded."""

        loaded = False

        def __getattr__(self, name):
            return getattr(nvml_fake, name)

        def nvmlInit(self):
            if not self.loaded:
                raise nvml_fake.NVMLError(nvml_fake.NVML_ERROR_DRIVER_NOT_LOADED)
            nvml_fake.nvmlInit()

    late = LateDriver()
    collector = GpuCollector(late, "node-a", nvml_retry_seconds=0.0)
    assert not collector.start()
    collector.collect()
    assert not collector.nvml_up
    late.loaded = True
    collector.collect()
    assert collector.nvml_up and len(collector.devices) == 4


def test_label_cache_does_not_grow_with_pod_churn(fake):
    collector = GpuCollector(fake, "node-a")
    collector.start()
    collector.collect()
    for generation in range(50):
        owners = {device.uuid: (GpuOwner(f"pod-{generation}-{device.index}", "ns", "c"),)
                  for device in collector.devices}
        collector.families(owners)
    assert len(collector._label_cache) == len(collector.devices)


def test_an_xid_storm_is_counted_exactly_but_logged_sparsely(fake, caplog):
    collector = GpuCollector(fake, "node-a")
    collector.start()
    with caplog.at_level("WARNING", logger="digital_worker.agents.collector"):
        for _ in range(1000):
            collector.record_xid(collector.devices[0].uuid, 13)
    assert collector.devices[0].xid_counts == {13: 1000}
    assert collector.devices[0].healthy  # XID 13 is an application error, not a GPU fault
    assert len([r for r in caplog.records if "XID 13" in r.getMessage()]) == 10  # 1, 2, 4, ... 512
