"""The launch contract between the operator and the SGLang launcher: one place, so they never drift.

The operator renders a `LaunchConfig` as JSON into the runtime ConfigMap; the launcher inside the
pod reads it back and turns it into SGLang's argv with `build_argv`. The operator validates
`spec.runtime.extraArgs` against `ALLOWED_EXTRA_ARGS` from here.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from digital_worker import __version__

# The SGLang release this contract targets; the argv is checked against its real argument parser.
SGLANG_VERSION = "0.5.23"
# SGLang's own image, the base `digital-worker runtime image build` adds the launcher to.
SGLANG_BASE_IMAGE = f"lmsysorg/sglang:v{SGLANG_VERSION}"
RUNTIME_IMAGE_REPOSITORY = "ghcr.io/digital-worker/sglang-runtime"
# The serving image pods run by default: the one `runtime image build` makes (SGLang + launcher),
# since the pod's command is `digital-worker runtime launch`.
DEFAULT_IMAGE = f"{RUNTIME_IMAGE_REPOSITORY}:{__version__}-sglang{SGLANG_VERSION}"
DEFAULT_PORT = 30000
CONFIG_PATH = "/etc/digital-worker/runtime.json"
MODEL_CACHE_DIR = "/models"
# The launcher reads the API key from this env var (populated from a Secret) or from a file.
API_KEY_ENV = "DIGITAL_WORKER_API_KEY"

# Extra SGLang flags a DigitalWorker may pass through. Value: whether the flag takes a value.
# Anything not here is rejected by the operator and the launcher alike: flags that change what
# the operator manages (ports, model path, parallelism, API key) are deliberately absent.
ALLOWED_EXTRA_ARGS: dict[str, bool] = {
    "--chunked-prefill-size": True,
    "--max-prefill-tokens": True,
    "--max-total-tokens": True,
    "--schedule-policy": True,
    "--schedule-conservativeness": True,
    # SGLang 0.5.23 split --cuda-graph-max-bs into a decode and a prefill limit.
    "--cuda-graph-max-bs-decode": True,
    "--cuda-graph-max-bs-prefill": True,
    "--disable-cuda-graph": False,
    "--disable-radix-cache": False,
    "--enable-torch-compile": False,
    "--torch-compile-max-bs": True,
    "--attention-backend": True,
    "--sampling-backend": True,
    "--grammar-backend": True,
    "--reasoning-parser": True,
    "--tool-call-parser": True,
    "--chat-template": True,
    "--trust-remote-code": False,
    "--speculative-algorithm": True,
    "--speculative-num-steps": True,
    "--speculative-eagle-topk": True,
    "--speculative-num-draft-tokens": True,
    "--speculative-draft-model-path": True,
    "--enable-mixed-chunk": False,
    "--enable-dp-attention": False,
    "--stream-interval": True,
    "--watchdog-timeout": True,
}


# Value choices of the typed fields, as SGLang 0.5.23's parser declares them (checked by a test
# against the real parser), so a typo fails in the operator instead of in a crash-looping pod.
DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")
KV_CACHE_DTYPE_CHOICES = ("auto", "fp8_e5m2", "fp8_e4m3", "mxfp8", "bf16", "bfloat16", "nvfp4", "fp4_mx_block16")
QUANTIZATION_CHOICES = (
    "awq", "fp8", "mxfp8", "gptq", "gptq_marlin", "awq_marlin", "bitsandbytes", "gguf", "modelopt",
    "modelopt_fp8", "modelopt_fp4", "w8a8_int8", "w8a8_fp8", "moe_wna16", "w4afp8", "mxfp4",
    "auto-round", "compressed-tensors", "quark",
)
LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error", "critical")

# Extra args that would set again what a typed field of LaunchConfig already sets.
_FIELD_FOR_EXTRA_ARG = {"--chunked-prefill-size": "chunked_prefill_size"}


def check_extra_args(args: list[str]) -> list[str]:
    """Return a list of problems with `args` (empty when they are all allowed and well-formed)."""
    problems: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        flag, has_inline_value = (arg.split("=", 1)[0], True) if "=" in arg else (arg, False)
        if flag not in ALLOWED_EXTRA_ARGS:
            problems.append(f"extra arg {flag!r} is not allowed")
            i += 1
            continue
        takes_value = ALLOWED_EXTRA_ARGS[flag]
        if takes_value and not has_inline_value:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                problems.append(f"extra arg {flag!r} needs a value")
                i += 1
                continue
            i += 2
            continue
        if not takes_value and has_inline_value:
            problems.append(f"extra arg {flag!r} takes no value")
        i += 1
    return problems


@dataclass(frozen=True)
class LaunchConfig:
    """What one SGLang replica is started with. Secrets are never part of it (only where to find them)."""

    model_path: str
    served_model_name: str
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    mem_fraction_static: float | None = None
    max_running_requests: int | None = None
    context_length: int | None = None
    quantization: str | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    chunked_prefill_size: int | None = None
    # GPUs the pod gets (its nvidia.com/gpu limit); tensor x data parallel size must use exactly these.
    gpus: int | None = None
    enable_metrics: bool = True
    log_level: str = "info"
    revision: str | None = None
    # Where the launcher finds the API key: an env var name and/or a file path (from a Secret).
    api_key_env: str | None = None
    api_key_file: str | None = None
    # Where the model comes from (hf://, s3://, pvc://) and where it is cached in the pod.
    model_source: str | None = None
    model_cache_dir: str = MODEL_CACHE_DIR
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["extra_args"] = list(self.extra_args)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LaunchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown launch config field(s): {', '.join(unknown)}")
        values = dict(data)
        for required in ("model_path", "served_model_name"):
            if not values.get(required):
                raise ValueError(f"launch config field {required!r} is missing")
        values["extra_args"] = tuple(values.get("extra_args") or ())
        return cls(**values)

    def problems(self) -> list[str]:
        """Everything wrong with this config, one line each naming the field (empty when valid)."""
        found: list[str] = []

        def check_type(name: str, kinds: tuple[type, ...]) -> bool:
            value = getattr(self, name)
            # bool is an int in Python; a JSON `true` for a size is still a mistake.
            if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
                return True
            found.append(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
            return False

        for name in ("model_path", "served_model_name", "host", "dtype", "kv_cache_dtype", "log_level"):
            check_type(name, (str,))
        for name in ("port", "tensor_parallel_size", "data_parallel_size", "max_running_requests",
                     "context_length", "chunked_prefill_size", "gpus"):
            if check_type(name, (int,)) and getattr(self, name) is not None:
                value = getattr(self, name)
                # SGLang reads --chunked-prefill-size -1 as "chunked prefill off".
                if value < 1 and not (name == "chunked_prefill_size" and value == -1):
                    found.append(f"{name}: must be positive, got {value}")
        if check_type("mem_fraction_static", (float, int)) and self.mem_fraction_static is not None:
            if not 0.0 < self.mem_fraction_static < 1.0:
                found.append(f"mem_fraction_static: must be between 0 and 1, got {self.mem_fraction_static}")
        if isinstance(self.port, int) and not 1 <= self.port <= 65535:
            found.append(f"port: {self.port} is not a TCP port")
        for name, choices in (("dtype", DTYPE_CHOICES), ("kv_cache_dtype", KV_CACHE_DTYPE_CHOICES),
                              ("log_level", LOG_LEVEL_CHOICES)):
            if isinstance(getattr(self, name), str) and getattr(self, name) not in choices:
                found.append(f"{name}: {getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            found.append(f"quantization: {self.quantization!r} is not one of {', '.join(QUANTIZATION_CHOICES)}")
        if (
            self.gpus is not None
            and isinstance(self.tensor_parallel_size, int)
            and isinstance(self.data_parallel_size, int)
            and self.tensor_parallel_size * self.data_parallel_size != self.gpus
        ):
            found.append(
                f"tensor_parallel_size: {self.tensor_parallel_size} x data_parallel_size "
                f"{self.data_parallel_size} does not match the {self.gpus} GPU(s) of the pod"
            )
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            found.append(f"api_key_env: {self.api_key_env!r} is not an environment variable name")
        if not isinstance(self.extra_args, (tuple, list)) or not all(isinstance(a, str) for a in self.extra_args):
            found.append("extra_args: expected a list of strings")
            return found
        found += check_extra_args(list(self.extra_args))
        for arg in self.extra_args:
            field_name = _FIELD_FOR_EXTRA_ARG.get(arg.split("=", 1)[0])
            if field_name and getattr(self, field_name) is not None:
                found.append(f"extra arg {arg.split('=', 1)[0]!r} conflicts with field {field_name!r}")
        return found

    def validate(self) -> "LaunchConfig":
        """Raise ValueError naming the first bad field; return self when the config is valid."""
        found = self.problems()
        if found:
            raise ValueError(found[0])
        return self


def build_argv(config: LaunchConfig, python: str = "python3") -> list[str]:
    """SGLang's argv for `config`. The API key is never put here: the launcher hands it over out of band."""
    config.validate()
    argv = [
        python, "-m", "sglang.launch_server",
        "--model-path", config.model_path,
        "--served-model-name", config.served_model_name,
        "--host", config.host,
        "--port", str(config.port),
        "--tp-size", str(config.tensor_parallel_size),
        "--dp-size", str(config.data_parallel_size),
        "--dtype", config.dtype,
        "--kv-cache-dtype", config.kv_cache_dtype,
        "--log-level", config.log_level,
    ]
    if config.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(config.mem_fraction_static)]
    if config.max_running_requests is not None:
        argv += ["--max-running-requests", str(config.max_running_requests)]
    if config.context_length is not None:
        argv += ["--context-length", str(config.context_length)]
    if config.quantization:
        argv += ["--quantization", config.quantization]
    if config.chunked_prefill_size is not None:
        argv += ["--chunked-prefill-size", str(config.chunked_prefill_size)]
    if config.revision:
        argv += ["--revision", config.revision]
    if config.enable_metrics:
        argv.append("--enable-metrics")
    argv += list(config.extra_args)
    return argv
