"""Per-GPU readings through NVML, under dcgm-exporter's metric and label names.

`GpuCollector` talks to a pynvml-compatible module (the real ``pynvml`` from nvidia-ml-py, or the
fake for tests) and turns each collection into metric families. `XidWatcher` blocks on NVML's event
set for ``nvmlEventTypeXidCriticalError`` in its own thread and records XIDs as they happen.

Rules that keep a node agent from hurting its node:
- no NVML (no driver) is a state, not an error: ``digital_worker_nvml_up 0``, retried slowly;
- a reading a GPU does not support is skipped for that GPU once and for all (one debug line);
- a GPU that fell off the bus (``GpuIsLost``) is reported unhealthy, never raised.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from digital_worker.agents.exposition import MetricFamily, label_string

log = logging.getLogger("digital_worker.agents.collector")

# XIDs after which the GPU (or its memory) cannot be trusted until reset; the operator replaces the
# pod and taints the node. 48: double-bit ECC; 63/64: row remapping recorded/failed; 74: NVLink;
# 79: fell off the bus; 94/95: contained/uncontained ECC. Kept equal to operator/gpu_health.py's
# copy (a test checks): agents import nothing from the operator.
FATAL_XIDS = frozenset({48, 63, 64, 74, 79, 94, 95})

MIB = 1024 * 1024

# name -> (type, help); the render order is this order.
METRICS: dict[str, tuple[str, str]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("gauge", "GPU utilization (in %)."),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("gauge", "Memory utilization (in %)."),
    "DCGM_FI_DEV_FB_USED": ("gauge", "Framebuffer memory used (in MiB)."),
    "DCGM_FI_DEV_FB_FREE": ("gauge", "Framebuffer memory free (in MiB)."),
    "DCGM_FI_DEV_FB_TOTAL": ("gauge", "Framebuffer memory total (in MiB)."),
    "DCGM_FI_DEV_GPU_TEMP": ("gauge", "GPU temperature (in C)."),
    "DCGM_FI_DEV_POWER_USAGE": ("gauge", "Power draw (in W)."),
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": ("gauge", "Power management limit (in W)."),
    "DCGM_FI_DEV_SM_CLOCK": ("gauge", "SM clock frequency (in MHz)."),
    "DCGM_FI_DEV_MEM_CLOCK": ("gauge", "Memory clock frequency (in MHz)."),
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": ("gauge", "Current clock event (throttle) reasons, NVML bitmask."),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": ("counter", "Total number of single-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("counter", "Total number of double-bit volatile ECC errors."),
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": ("counter", "Total number of single-bit persistent ECC errors."),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": ("counter", "Total number of double-bit persistent ECC errors."),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for correctable errors."),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("counter", "Number of remapped rows for uncorrectable errors."),
    "DCGM_FI_DEV_ROW_REMAP_PENDING": ("gauge", "Whether a row remapping is pending (1) until the next GPU reset."),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": ("gauge", "Whether remapping of rows has failed."),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("counter", "Total number of PCIe retries."),
    "DCGM_FI_DEV_XID_ERRORS": ("gauge", "Value of the last XID error encountered (0: none since the agent started)."),
    "digital_worker_gpu_healthy": ("gauge", "1 unless the GPU is lost, saw a fatal XID, uncorrectable ECC or a row remap failure."),
}


def _utilization(nvml, handle) -> dict[str, float]:
    rates = nvml.nvmlDeviceGetUtilizationRates(handle)
    return {"DCGM_FI_DEV_GPU_UTIL": rates.gpu, "DCGM_FI_DEV_MEM_COPY_UTIL": rates.memory}


def _framebuffer(nvml, handle) -> dict[str, float]:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    return {"DCGM_FI_DEV_FB_USED": memory.used // MIB, "DCGM_FI_DEV_FB_FREE": memory.free // MIB,
            "DCGM_FI_DEV_FB_TOTAL": memory.total // MIB}


def _temperature(nvml, handle) -> dict[str, float]:
    return {"DCGM_FI_DEV_GPU_TEMP": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)}


def _power_usage(nvml, handle) -> dict[str, float]:
    return {"DCGM_FI_DEV_POWER_USAGE": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0}


def _power_limit(nvml, handle) -> dict[str, float]:
    return {"DCGM_FI_DEV_POWER_MGMT_LIMIT": nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0}


def _sm_clock(nvml, handle) -> dict[str, float]:
    return {"DCGM_FI_DEV_SM_CLOCK": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)}


def _memory_clock(nvml, handle) -> dict[str, float]:
    return {"DCGM_FI_DEV_MEM_CLOCK": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)}


def _clock_events(nvml, handle) -> dict[str, float]:
    # "Clocks event reasons" is the newer NVML name of "clocks throttle reasons".
    getter = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return {"DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": getter(handle)}


def _ecc_volatile(nvml, handle) -> dict[str, float]:
    return {
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC),
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC),
    }


def _ecc_aggregate(nvml, handle) -> dict[str, float]:
    return {
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_AGGREGATE_ECC),
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_AGGREGATE_ECC),
    }


def _remapped_rows(nvml, handle) -> dict[str, float]:
    correctable, uncorrectable, pending, failure = nvml.nvmlDeviceGetRemappedRows(handle)
    return {"DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": correctable,
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": uncorrectable,
            "DCGM_FI_DEV_ROW_REMAP_PENDING": 1 if pending else 0,
            "DCGM_FI_DEV_ROW_REMAP_FAILURE": 1 if failure else 0}


def _pcie_replays(nvml, handle) -> dict[str, float]:
    return {"DCGM_FI_DEV_PCIE_REPLAY_COUNTER": nvml.nvmlDeviceGetPcieReplayCounter(handle)}


# One entry per NVML query; "not supported" is remembered per GPU and query name.
QUERIES: tuple[tuple[str, Callable], ...] = (
    ("utilization", _utilization), ("framebuffer", _framebuffer), ("temperature", _temperature),
    ("power_usage", _power_usage), ("power_limit", _power_limit), ("sm_clock", _sm_clock),
    ("memory_clock", _memory_clock), ("clock_events", _clock_events), ("ecc_volatile", _ecc_volatile),
    ("ecc_aggregate", _ecc_aggregate), ("remapped_rows", _remapped_rows), ("pcie_replays", _pcie_replays),
)


@dataclass(frozen=True)
class GpuOwner:
    """The pod container that holds a GPU, as the kubelet's PodResources API reports it."""

    pod: str
    namespace: str
    container: str


@dataclass
class GpuDevice:
    index: int
    handle: object
    uuid: str
    model_name: str
    pci_bus_id: str = ""
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False
    last_xid: int = 0
    fatal_xid: int | None = None
    xid_counts: dict[int, int] = field(default_factory=dict)
    readings: dict[str, float] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return (not self.lost and self.fatal_xid is None
                and not self.readings.get("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL")
                and not self.readings.get("DCGM_FI_DEV_ROW_REMAP_FAILURE"))


def _error_class(nvml, name: str) -> type:
    return getattr(nvml, name, None) or type(name, (Exception,), {})


class GpuCollector:
    """Reads every GPU of the node; thread-safe for one collecting thread plus the XID watcher."""

    def __init__(self, nvml, hostname: str, fatal_xids=FATAL_XIDS, nvml_retry_seconds: float = 60.0) -> None:
        self.nvml = nvml
        self.hostname = hostname
        self.fatal_xids = frozenset(fatal_xids)
        self.nvml_retry_seconds = nvml_retry_seconds
        self.nvml_up = False
        self.driver_version = ""
        self.devices: list[GpuDevice] = []
        self.collection_seconds = 0.0
        self._lock = threading.Lock()
        self._next_init_attempt = 0.0
        self._init_failure_logged = False
        self._label_cache: dict[tuple, str] = {}
        self._nvml_error = _error_class(nvml, "NVMLError")
        # Errors that will not go away by asking again: skip that reading on that GPU for good.
        self._permanent_errors = tuple(_error_class(nvml, name) for name in (
            "NVMLError_NotSupported", "NVMLError_FunctionNotFound", "NVMLError_NoPermission"))
        self._gpu_lost_error = _error_class(nvml, "NVMLError_GpuIsLost")

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> bool:
        """Initialise NVML and enumerate GPUs; False (and nvml_up 0) when there is no driver."""
        self._next_init_attempt = time.monotonic() + self.nvml_retry_seconds
        try:
            self.nvml.nvmlInit()
        except Exception as exc:  # no driver, no library, wrong version: all mean "no NVML here"
            if not self._init_failure_logged:
                log.warning("NVML unavailable (%s); serving digital_worker_nvml_up 0, retrying every %ss",
                            exc, self.nvml_retry_seconds)
                self._init_failure_logged = True
            self.nvml_up = False
            return False
        try:
            self.driver_version = self._text(self.nvml.nvmlSystemGetDriverVersion())
        except Exception:
            self.driver_version = ""
        try:
            device_count = self.nvml.nvmlDeviceGetCount()
        except Exception as exc:  # a driver in a bad state: same as no driver, try again later
            if not self._init_failure_logged:
                log.warning("NVML initialised but cannot count GPUs (%s); retrying every %ss",
                            exc, self.nvml_retry_seconds)
                self._init_failure_logged = True
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml_up = False
            return False
        devices = []
        for index in range(device_count):
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = self._text(self.nvml.nvmlDeviceGetUUID(handle))
                model = self._text(self.nvml.nvmlDeviceGetName(handle))
            except Exception as exc:
                # A GPU lost before we even saw its UUID still has to show up as unhealthy.
                log.warning("GPU %d cannot be identified: %s", index, exc)
                devices.append(GpuDevice(index=index, handle=None, uuid=f"unknown-gpu-{index}",
                                         model_name="", lost=True))
                continue
            try:
                pci_bus_id = self._text(self.nvml.nvmlDeviceGetPciInfo(handle).busId)
            except Exception:
                pci_bus_id = ""
            devices.append(GpuDevice(index=index, handle=handle, uuid=uuid, model_name=model,
                                     pci_bus_id=pci_bus_id))
        with self._lock:
            self.devices = devices
            self._label_cache.clear()
        self.nvml_up = True
        log.info("NVML up: driver %s, %d GPU(s)", self.driver_version or "?", len(devices))
        return True

    def shutdown(self) -> None:
        if self.nvml_up:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
            self.nvml_up = False

    # --- collection -----------------------------------------------------------------------------
    def collect(self) -> None:
        started = time.perf_counter()
        if not self.nvml_up:
            if time.monotonic() >= self._next_init_attempt:
                self.start()
            if not self.nvml_up:
                self.collection_seconds = time.perf_counter() - started
                return
        for device in self.devices:
            self._collect_device(device)
        self.collection_seconds = time.perf_counter() - started

    def _collect_device(self, device: GpuDevice) -> None:
        if device.handle is None:
            return
        readings: dict[str, float] = {}
        for query_name, query in QUERIES:
            if query_name in device.unsupported:
                continue
            try:
                readings.update(query(self.nvml, device.handle))
            except self._gpu_lost_error:
                if not device.lost:
                    log.error("GPU %d (%s) is lost: reporting it unhealthy", device.index, device.uuid)
                device.lost = True
                break
            except self._permanent_errors as exc:
                device.unsupported.add(query_name)
                log.debug("GPU %d: %s not available (%s); not asking again", device.index, query_name, exc)
            except self._nvml_error as exc:
                log.warning("GPU %d: reading %s failed: %s", device.index, query_name, exc)
        else:
            device.lost = False  # answered every query: back on the bus (after a reset)
        device.readings = readings

    def record_xid(self, uuid: str, xid: int) -> None:
        with self._lock:
            for device in self.devices:
                if device.uuid == uuid:
                    device.last_xid = xid
                    device.xid_counts[xid] = device.xid_counts.get(xid, 0) + 1
                    if xid in self.fatal_xids:
                        device.fatal_xid = xid
                    count = device.xid_counts[xid]
                    if count & (count - 1) == 0:  # 1st, 2nd, 4th, 8th...: a storm must not flood the log
                        log.warning("GPU %d (%s): XID %d%s (seen %d times)", device.index, uuid, xid,
                                    " (fatal)" if xid in self.fatal_xids else "", count)
                    return
        log.warning("XID %d on unknown GPU %s", xid, uuid)

    # --- exposition -----------------------------------------------------------------------------
    def _labels(self, device: GpuDevice, owner: GpuOwner | None, previous: dict[tuple, str]) -> str:
        # Only series of this round stay cached: pods come and go for months on a node.
        key = (device.index, device.uuid, owner)
        cached = previous.get(key)
        if cached is not None:
            self._label_cache[key] = cached
        else:
            labels = [("gpu", str(device.index)), ("UUID", device.uuid), ("device", f"nvidia{device.index}"),
                      ("modelName", device.model_name), ("Hostname", self.hostname)]
            if device.pci_bus_id:
                labels.append(("pci_bus_id", device.pci_bus_id))
            if self.driver_version:
                labels.append(("DCGM_FI_DRIVER_VERSION", self.driver_version))
            if owner is not None:
                labels += [("container", owner.container), ("namespace", owner.namespace), ("pod", owner.pod)]
            cached = self._label_cache[key] = label_string(tuple(labels))
        return cached

    def families(self, owners_by_device: dict[str, tuple[GpuOwner, ...]] | None = None) -> list[MetricFamily]:
        """Metric families for the latest collection; `owners_by_device` maps GPU UUID or index to pods."""
        owners_by_device = owners_by_device or {}
        families = {name: MetricFamily(name, help_text, kind) for name, (kind, help_text) in METRICS.items()}
        xid_counts = MetricFamily("digital_worker_gpu_xid_errors_total",
                                  "XID critical errors seen since the agent started, by XID.", "counter")
        with self._lock:
            devices = list(self.devices)
        previous_labels, self._label_cache = self._label_cache, {}
        for device in devices:
            owners = owners_by_device.get(device.uuid) or owners_by_device.get(str(device.index)) or (None,)
            readings = dict(device.readings)
            readings["DCGM_FI_DEV_XID_ERRORS"] = device.last_xid
            readings["digital_worker_gpu_healthy"] = 1 if device.healthy else 0
            for owner in owners:
                labels = self._labels(device, owner, previous_labels)
                for name, value in readings.items():
                    families[name].add(labels, value)
                for xid, count in sorted(device.xid_counts.items()):
                    xid_counts.add(labels[:-1] + f',xid="{xid}"}}', count)
        nvml_up = MetricFamily("digital_worker_nvml_up", "1 when NVML answered (a driver is loaded).")
        nvml_up.add(label_string({"Hostname": self.hostname}), 1 if self.nvml_up else 0)
        duration = MetricFamily("digital_worker_agent_collection_seconds", "Duration of the last NVML collection.")
        duration.add("", round(self.collection_seconds, 6))
        return [nvml_up, duration, *[family for family in (*families.values(), xid_counts) if family.samples]]

    @staticmethod
    def _text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)


class XidWatcher(threading.Thread):
    """Waits on NVML's event set for XID critical errors and hands them to the collector."""

    def __init__(self, collector: GpuCollector, wait_ms: int = 500) -> None:
        super().__init__(name="xid-watcher", daemon=True)
        self.collector = collector
        self.nvml = collector.nvml
        self.wait_ms = wait_ms
        self.stop_event = threading.Event()
        self.registered: list[GpuDevice] = []
        self._event_set = None

    def register(self) -> bool:
        """Register every GPU that supports XID events; False if none does (then do not start)."""
        nvml = self.nvml
        event_type = nvml.nvmlEventTypeXidCriticalError
        self._event_set = nvml.nvmlEventSetCreate()
        for device in self.collector.devices:
            if device.handle is None:
                continue
            try:
                nvml.nvmlDeviceRegisterEvents(device.handle, event_type, self._event_set)
                self.registered.append(device)
            except self.collector._nvml_error as exc:
                log.debug("GPU %d: XID events not available (%s)", device.index, exc)
        return bool(self.registered)

    def run(self) -> None:
        timeout_error = _error_class(self.nvml, "NVMLError_Timeout")
        while not self.stop_event.is_set():
            try:
                data = self.nvml.nvmlEventSetWait_v2(self._event_set, self.wait_ms)
            except timeout_error:
                continue
            except Exception as exc:  # keep watching: one bad wait must not end XID reporting
                log.warning("waiting for NVML events failed: %s", exc)
                self.stop_event.wait(1.0)
                continue
            if not data.eventType & self.nvml.nvmlEventTypeXidCriticalError:
                continue
            self.collector.record_xid(self._uuid_of(data.device), int(data.eventData))

    def _uuid_of(self, handle) -> str:
        try:
            return self.collector._text(self.nvml.nvmlDeviceGetUUID(handle))
        except Exception:
            # A GPU that just fell off the bus may not answer: match the handle itself.
            for device in self.registered:
                if device.handle is handle:
                    return device.uuid
            return "unknown"

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=self.wait_ms / 1000.0 + 2)
        if self._event_set is not None:
            try:
                self.nvml.nvmlEventSetFree(self._event_set)
            except Exception:
                pass
            self._event_set = None
