"""A pynvml-compatible stand-in for machines without an NVIDIA driver (tests and the overhead bench).

It exposes the subset of nvidia-ml-py's ``pynvml`` that the agent calls, with the same function
names, constants and ``NVMLError`` class hierarchy (``NVMLError(NVML_ERROR_NOT_SUPPORTED)`` is an
``NVMLError_NotSupported``, as in pynvml). Every answer comes from in-memory state, instantly.

The agent only reaches it through its injection seam: ``digital-worker agent --nvml-backend
digital_worker.agents.nvml_fake`` (or ``DW_NVML_BACKEND``). Configuration, read at ``nvmlInit``:

- ``DW_FAKE_NVML``: JSON (or ``@/path/to.json``) like ``{"gpus": 8, "unsupported": {"0":
  ["nvmlDeviceGetPcieReplayCounter"]}, "lost": [3], "no_xid_events": [5], "gpu": {"2":
  {"temperature": 90}}, "uuid_seed": 1}``.
- ``DW_FAKE_NVML_EVENTS``: a file the fake tails for injected XID events, one ``<gpu-index> <xid>``
  per line, so a test can inject a fault into an agent running as a separate process.

In-process callers use ``fake_configure``, ``fake_inject_xid``, ``fake_set`` and ``fake_lose_gpu``.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from types import SimpleNamespace

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
nvmlEventTypeXidCriticalError = 0x0000000000000008
nvmlClocksEventReasonGpuIdle = 0x0000000000000001
nvmlClocksEventReasonSwThermalSlowdown = 0x0000000000000020


class NVMLError(Exception):
    """Same contract as pynvml.NVMLError: constructing it with a code yields the code's subclass."""

    _valClassMapping: dict[int, type] = {}

    def __new__(cls, value):
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        error = Exception.__new__(cls)
        error.value = value
        return error

    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"NVML error {self.value}"

    def __eq__(self, other) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    __hash__ = Exception.__hash__


def _define_error_classes() -> None:
    # Mirror pynvml's generated names: NVML_ERROR_GPU_IS_LOST -> NVMLError_GpuIsLost.
    for constant, code in list(globals().items()):
        if not constant.startswith("NVML_ERROR_"):
            continue
        words = constant[len("NVML_ERROR_"):].split("_")
        class_name = "NVMLError_" + "".join(word.capitalize() for word in words)

        def new(cls, *args, _code=code):
            return NVMLError.__new__(cls, _code)

        error_class = type(class_name, (NVMLError,), {"__new__": new})
        error_class.__module__ = __name__
        globals()[class_name] = error_class
        NVMLError._valClassMapping[code] = error_class


_define_error_classes()


class _FakeDevice:
    """One simulated GPU: plausible H100-like readings that tests may overwrite."""

    def __init__(self, index: int, uuid_seed: int = 0) -> None:
        self.index = index
        self.uuid = f"GPU-fa4e{uuid_seed:04x}-0000-4000-8000-{index:012d}"
        self.name = "NVIDIA H100 80GB HBM3"
        self.pci_bus_id = f"00000000:{0x18 + index:02X}:00.0"
        self.readings = {
            "gpu_util": 37 + index, "memory_util": 21, "fb_total": 81559 * 1024 * 1024,
            "fb_used": 60000 * 1024 * 1024, "temperature": 52, "power_mw": 312_000,
            "power_limit_mw": 700_000, "sm_clock": 1980, "mem_clock": 2619,
            "clock_events": nvmlClocksEventReasonGpuIdle, "ecc_sbe_volatile": 0,
            "ecc_dbe_volatile": 0, "ecc_sbe_aggregate": 2, "ecc_dbe_aggregate": 0,
            "remapped_correctable": 0, "remapped_uncorrectable": 0, "remap_pending": 0,
            "remap_failure": 0, "pcie_replays": 0,
        }
        self.unsupported: set[str] = set()
        self.lost = False
        self.xid_events_supported = True


class _State:
    def __init__(self) -> None:
        self.initialised = 0
        self.devices: list[_FakeDevice] = []
        self.events: queue.Queue = queue.Queue()
        self.event_file: str | None = None
        self.event_file_offset = 0
        self.configured_in_process = False
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}


_state = _State()


def _check(device: _FakeDevice, function: str) -> None:
    _state.calls[function] = _state.calls.get(function, 0) + 1
    if not _state.initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    if device.lost:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    if function in device.unsupported:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)


# --- test controls (not part of pynvml) -------------------------------------------------------

def fake_configure(gpus: int = 8, unsupported: dict | None = None, lost=(), no_xid_events=(),
                   gpu: dict | None = None, uuid_seed: int = 0) -> None:
    """Reset the simulated node to `gpus` devices; the same keys as the DW_FAKE_NVML JSON.
    `uuid_seed` gives each simulated node its own GPU UUIDs."""
    with _state.lock:
        _state.devices = [_FakeDevice(index, int(uuid_seed)) for index in range(int(gpus))]
        for index, functions in (unsupported or {}).items():
            _state.devices[int(index)].unsupported.update(functions)
        for index in lost:
            _state.devices[int(index)].lost = True
        for index in no_xid_events:
            _state.devices[int(index)].xid_events_supported = False
        for index, readings in (gpu or {}).items():
            _state.devices[int(index)].readings.update(readings)
        _state.events = queue.Queue()
        _state.calls = {}
        _state.configured_in_process = True


def fake_inject_xid(index: int, xid: int) -> None:
    """Queue an XID critical error on GPU `index`, as the driver would report it."""
    _state.events.put((int(index), int(xid)))


def fake_set(index: int, **readings) -> None:
    _state.devices[int(index)].readings.update(readings)


def fake_lose_gpu(index: int) -> None:
    """From now on every call on GPU `index` raises NVMLError_GpuIsLost (fell off the bus)."""
    _state.devices[int(index)].lost = True


def fake_call_count(function: str | None = None) -> int:
    """How often `function` (or any per-GPU function) was called since the last fake_configure."""
    if function is None:
        return sum(_state.calls.values())
    return _state.calls.get(function, 0)


def _configure_from_environment() -> None:
    raw = os.environ.get("DW_FAKE_NVML", "")
    if raw.startswith("@"):
        with open(raw[1:], encoding="utf-8") as handle:
            raw = handle.read()
    fake_configure(**(json.loads(raw) if raw.strip() else {}))
    _state.event_file = os.environ.get("DW_FAKE_NVML_EVENTS") or None
    _state.event_file_offset = 0


def _read_event_file() -> None:
    path = _state.event_file
    if not path:
        return
    try:
        if os.stat(path).st_size <= _state.event_file_offset:
            return
        with open(path, encoding="utf-8") as handle:
            handle.seek(_state.event_file_offset)
            text = handle.read()
    except FileNotFoundError:
        return
    complete, _, _partial = text.rpartition("\n")
    if not complete and not text.endswith("\n"):
        return  # a line still being written
    _state.event_file_offset += len(complete.encode()) + 1
    for line in complete.splitlines():
        fields = line.split()
        if len(fields) == 2:
            _state.events.put((int(fields[0]), int(fields[1])))


# --- the pynvml surface -------------------------------------------------------------------------

def nvmlInit() -> None:
    if not _state.configured_in_process:
        _configure_from_environment()
    _state.initialised += 1


def nvmlInitWithFlags(flags: int) -> None:
    nvmlInit()


def nvmlShutdown() -> None:
    if not _state.initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    _state.initialised -= 1


def nvmlSystemGetDriverVersion() -> str:
    return "560.35.03"


def nvmlDeviceGetCount() -> int:
    if not _state.initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return len(_state.devices)


def nvmlDeviceGetHandleByIndex(index: int) -> _FakeDevice:
    if not _state.initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    if not 0 <= index < len(_state.devices):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _state.devices[index]


def nvmlDeviceGetUUID(handle: _FakeDevice) -> str:
    _check(handle, "nvmlDeviceGetUUID")
    return handle.uuid


def nvmlDeviceGetName(handle: _FakeDevice) -> str:
    _check(handle, "nvmlDeviceGetName")
    return handle.name


def nvmlDeviceGetIndex(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetIndex")
    return handle.index


def nvmlDeviceGetMinorNumber(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetMinorNumber")
    return handle.index


def nvmlDeviceGetPciInfo(handle: _FakeDevice):
    _check(handle, "nvmlDeviceGetPciInfo")
    return SimpleNamespace(busId=handle.pci_bus_id, busIdLegacy=handle.pci_bus_id[4:])


def nvmlDeviceGetUtilizationRates(handle: _FakeDevice):
    _check(handle, "nvmlDeviceGetUtilizationRates")
    return SimpleNamespace(gpu=handle.readings["gpu_util"], memory=handle.readings["memory_util"])


def nvmlDeviceGetMemoryInfo(handle: _FakeDevice, version=None):
    _check(handle, "nvmlDeviceGetMemoryInfo")
    total, used = handle.readings["fb_total"], handle.readings["fb_used"]
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetTemperature(handle: _FakeDevice, sensor: int) -> int:
    _check(handle, "nvmlDeviceGetTemperature")
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return handle.readings["temperature"]


def nvmlDeviceGetPowerUsage(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetPowerUsage")
    return handle.readings["power_mw"]


def nvmlDeviceGetPowerManagementLimit(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetPowerManagementLimit")
    return handle.readings["power_limit_mw"]


def nvmlDeviceGetEnforcedPowerLimit(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetEnforcedPowerLimit")
    return handle.readings["power_limit_mw"]


def nvmlDeviceGetClockInfo(handle: _FakeDevice, clock_type: int) -> int:
    _check(handle, "nvmlDeviceGetClockInfo")
    if clock_type == NVML_CLOCK_SM or clock_type == NVML_CLOCK_GRAPHICS:
        return handle.readings["sm_clock"]
    if clock_type == NVML_CLOCK_MEM:
        return handle.readings["mem_clock"]
    raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def nvmlDeviceGetCurrentClocksEventReasons(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetCurrentClocksEventReasons")
    return handle.readings["clock_events"]


def nvmlDeviceGetCurrentClocksThrottleReasons(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetCurrentClocksThrottleReasons")
    return handle.readings["clock_events"]


def nvmlDeviceGetTotalEccErrors(handle: _FakeDevice, error_type: int, counter_type: int) -> int:
    _check(handle, "nvmlDeviceGetTotalEccErrors")
    kind = "sbe" if error_type == NVML_MEMORY_ERROR_TYPE_CORRECTED else "dbe"
    scope = "volatile" if counter_type == NVML_VOLATILE_ECC else "aggregate"
    return handle.readings[f"ecc_{kind}_{scope}"]


def nvmlDeviceGetRemappedRows(handle: _FakeDevice) -> tuple[int, int, int, int]:
    _check(handle, "nvmlDeviceGetRemappedRows")
    readings = handle.readings
    return (readings["remapped_correctable"], readings["remapped_uncorrectable"],
            readings["remap_pending"], readings["remap_failure"])


def nvmlDeviceGetPcieReplayCounter(handle: _FakeDevice) -> int:
    _check(handle, "nvmlDeviceGetPcieReplayCounter")
    return handle.readings["pcie_replays"]


class _FakeEventSet:
    def __init__(self) -> None:
        self.devices: list[_FakeDevice] = []


def nvmlEventSetCreate() -> _FakeEventSet:
    if not _state.initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _FakeEventSet()


def nvmlDeviceRegisterEvents(handle: _FakeDevice, event_types: int, event_set: _FakeEventSet) -> None:
    _check(handle, "nvmlDeviceRegisterEvents")
    if event_types & nvmlEventTypeXidCriticalError and not handle.xid_events_supported:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    event_set.devices.append(handle)


def nvmlEventSetWait_v2(event_set: _FakeEventSet, timeoutms: int):
    """Block up to `timeoutms` for an injected XID on a registered GPU; NVMLError_Timeout otherwise."""
    deadline = time.monotonic() + timeoutms / 1000.0
    while True:
        _read_event_file()
        try:
            index, xid = _state.events.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise NVMLError(NVML_ERROR_TIMEOUT) from None
            continue
        device = _state.devices[index]
        if device in event_set.devices:
            return SimpleNamespace(device=device, eventType=nvmlEventTypeXidCriticalError,
                                   eventData=xid, gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)


def nvmlEventSetWait(event_set: _FakeEventSet, timeoutms: int):
    return nvmlEventSetWait_v2(event_set, timeoutms)


def nvmlEventSetFree(event_set: _FakeEventSet) -> None:
    event_set.devices.clear()
