"""The launch contract: argv building, config validation, extra-arg allow-list (pure logic)."""
from __future__ import annotations

import json

import pytest

from digital_worker.runtime.contract import (
    ALLOWED_EXTRA_ARGS,
    SGLANG_VERSION,
    LaunchConfig,
    build_argv,
    check_extra_args,
)


def flag_values(argv: list[str]) -> dict[str, str | bool]:
    """{--flag: value or True} from an argv tail (our argv never repeats a flag)."""
    values: dict[str, str | bool] = {}
    index = 0
    while index < len(argv):
        flag = argv[index]
        if index + 1 < len(argv) and not argv[index + 1].startswith("--"):
            values[flag] = argv[index + 1]
            index += 2
        else:
            values[flag] = True
            index += 1
    return values


def test_pin_is_one_release():
    assert SGLANG_VERSION.count(".") == 2 and all(part.isdigit() for part in SGLANG_VERSION.split("."))


def test_minimal_config_builds_the_expected_argv():
    argv = build_argv(LaunchConfig(model_path="/models/llama", served_model_name="llama"), python="py")
    assert argv[:3] == ["py", "-m", "sglang.launch_server"]
    flags = flag_values(argv[3:])
    assert flags["--model-path"] == "/models/llama"
    assert flags["--served-model-name"] == "llama"
    assert flags["--port"] == "30000" and flags["--host"] == "0.0.0.0"
    assert flags["--tp-size"] == "1" and flags["--dp-size"] == "1"
    assert flags["--enable-metrics"] is True
    assert "--mem-fraction-static" not in flags and "--quantization" not in flags


def test_every_field_reaches_the_argv():
    config = LaunchConfig(
        model_path="/models/m", served_model_name="m", host="127.0.0.1", port=8000,
        tensor_parallel_size=2, data_parallel_size=2, gpus=4, mem_fraction_static=0.85,
        max_running_requests=64, context_length=4096, quantization="fp8", dtype="bfloat16",
        kv_cache_dtype="fp8_e5m2", chunked_prefill_size=2048, log_level="warning", revision="abc123",
        extra_args=("--schedule-policy", "lpm", "--disable-radix-cache"),
    )
    flags = flag_values(build_argv(config)[3:])
    assert flags == {
        "--model-path": "/models/m", "--served-model-name": "m", "--host": "127.0.0.1", "--port": "8000",
        "--tp-size": "2", "--dp-size": "2", "--dtype": "bfloat16", "--kv-cache-dtype": "fp8_e5m2",
        "--log-level": "warning", "--mem-fraction-static": "0.85", "--max-running-requests": "64",
        "--context-length": "4096", "--quantization": "fp8", "--chunked-prefill-size": "2048",
        "--revision": "abc123", "--enable-metrics": True, "--schedule-policy": "lpm",
        "--disable-radix-cache": True,
    }


def test_api_key_never_in_argv_or_config_json():
    config = LaunchConfig(model_path="/m", served_model_name="m", api_key_env="MY_KEY", api_key_file="/s/key")
    argv = build_argv(config)
    assert not any("api-key" in arg for arg in argv)
    data = json.loads(config.to_json())
    assert data["api_key_env"] == "MY_KEY" and "api_key" not in data


def test_json_round_trip():
    config = LaunchConfig(model_path="/m", served_model_name="m", gpus=2, tensor_parallel_size=2,
                          extra_args=("--stream-interval", "4"), model_source="hf://org/m")
    assert LaunchConfig.from_dict(json.loads(config.to_json())) == config


def test_from_dict_rejects_unknown_and_missing_fields():
    with pytest.raises(ValueError, match="modle_path"):
        LaunchConfig.from_dict({"modle_path": "/m", "served_model_name": "m"})
    with pytest.raises(ValueError, match="model_path"):
        LaunchConfig.from_dict({"served_model_name": "m"})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"gpus": 2}, "tensor_parallel_size"),  # TP 1 x DP 1 on a 2-GPU pod
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
        ({"port": 70000}, "port"),
        ({"dtype": "fp16"}, "dtype"),
        ({"kv_cache_dtype": "int8"}, "kv_cache_dtype"),
        ({"quantization": "magic"}, "quantization"),
        ({"log_level": "verbose"}, "log_level"),
        ({"max_running_requests": True}, "max_running_requests"),
        ({"context_length": "4096"}, "context_length"),
        ({"chunked_prefill_size": 0}, "chunked_prefill_size"),
        ({"api_key_env": "NOT A NAME"}, "api_key_env"),
        ({"extra_args": ("--port", "1")}, "--port"),
        ({"extra_args": ("--api-key", "k")}, "--api-key"),
        ({"extra_args": ("--chunked-prefill-size", "1"), "chunked_prefill_size": 2}, "--chunked-prefill-size"),
    ],
)
def test_bad_configs_name_the_field(changes, field):
    config = LaunchConfig(**{"model_path": "/m", "served_model_name": "m", **changes})
    problems = config.problems()
    assert problems and field in problems[0]
    with pytest.raises(ValueError, match=field.replace("-", r"\-")):
        build_argv(config)


def test_chunked_prefill_minus_one_disables_and_is_valid():
    assert LaunchConfig(model_path="/m", served_model_name="m", chunked_prefill_size=-1).problems() == []


def test_check_extra_args():
    assert check_extra_args(["--schedule-policy", "lpm", "--trust-remote-code", "--stream-interval=2"]) == []
    assert check_extra_args(["--schedule-policy"]) == ["extra arg '--schedule-policy' needs a value"]
    assert check_extra_args(["--schedule-policy", "--trust-remote-code"])[0].endswith("needs a value")
    assert check_extra_args(["--trust-remote-code=yes"]) == ["extra arg '--trust-remote-code' takes no value"]
    assert check_extra_args(["--tp-size", "2"])[0] == "extra arg '--tp-size' is not allowed"


def test_allow_list_excludes_what_the_operator_manages():
    managed = {"--model-path", "--port", "--host", "--tp-size", "--dp-size", "--api-key", "--served-model-name"}
    assert not managed & set(ALLOWED_EXTRA_ARGS)
