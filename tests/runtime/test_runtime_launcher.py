"""The launcher: config errors, API key handover and scrubbing, SIGTERM forwarding, exit codes.

SGLang cannot serve on this machine (no GPU), so the process-level tests run the real launcher
CLI against a stand-in `sglang` package put first on PYTHONPATH: it behaves like SGLang where the
launcher can see it (parses its argv, logs its arguments including the API key as SGLang 0.5.23
does, drains on SIGTERM). The handover into SGLang's real parser is covered by
test_runtime_sglang_parser.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from digital_worker.runtime.contract import API_KEY_ENV, LaunchConfig
from digital_worker.runtime.launcher import LaunchError, load_config, prepare_launch, resolve_api_key

CLI = shutil.which("digital-worker") or "digital-worker"
SECRET = "sk-test-0123456789abcdef"

STANDIN_SERVER_ARGS = '''
import argparse, types
def prepare_server_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path"); parser.add_argument("--served-model-name")
    parser.add_argument("--port", type=int)
    args, _ = parser.parse_known_args(argv)
    return types.SimpleNamespace(model_path=args.model_path, port=args.port, api_key=None,
                                 launch_command=" ".join(argv))
'''
STANDIN_LAUNCH_SERVER = '''
import json, os, signal, sys, time
from sglang.srt.server_args import prepare_server_args

def run_server(server_args):
    # As SGLang 0.5.23's engine does: log the resolved arguments, API key included.
    print(f"server_args={vars(server_args)}", flush=True)
    report = os.environ["STANDIN_REPORT"]
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
    with open("/proc/self/environ", "rb") as f:
        environ = f.read().decode(errors="replace")
    with open(report, "w") as f:
        json.dump({"argv": sys.argv, "cmdline": cmdline, "environ": environ, "model_path": server_args.model_path,
                   "api_key": server_args.api_key, "pid": os.getpid()}, f)
    def drain(signum, frame):
        print(f"draining after signal {signum}", flush=True)
        sys.exit(int(os.environ.get("STANDIN_EXIT_CODE", "0")))
    signal.signal(signal.SIGTERM, drain)
    if os.environ.get("STANDIN_EXIT_NOW"):
        print("failing at start", file=sys.stderr, flush=True)
        sys.exit(int(os.environ["STANDIN_EXIT_NOW"]))
    if os.environ.get("STANDIN_DIE_BY_SIGNAL"):
        os.kill(os.getpid(), signal.SIGKILL)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)

if __name__ == "__main__":
    run_server(prepare_server_args(sys.argv[1:]))
'''


@pytest.fixture
def standin(tmp_path: Path) -> Path:
    root = tmp_path / "standin"
    files = {
        "sglang/__init__.py": "",
        "sglang/srt/__init__.py": "",
        "sglang/srt/plugins.py": "def load_plugins():\n    pass\n",
        "sglang/srt/utils.py": "def kill_process_tree(pid, include_parent=True):\n    pass\n",
        "sglang/srt/server_args.py": STANDIN_SERVER_ARGS,
        "sglang/launch_server.py": STANDIN_LAUNCH_SERVER,
    }
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(textwrap.dedent(text))
    return root


def write_config(tmp_path: Path, **fields) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    config = LaunchConfig(**{"model_path": str(model), "served_model_name": "assistant", **fields})
    path = tmp_path / "runtime.json"
    path.write_text(config.to_json())
    return path


def launcher_env(standin: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != API_KEY_ENV}
    env.update(PYTHONPATH=str(standin), STANDIN_REPORT=str(tmp_path / "report.json"), **extra)
    return env


def start_launcher(config: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([CLI, "runtime", "launch", "--config", str(config)], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_report(tmp_path: Path, process: subprocess.Popen, timeout: float = 30.0) -> dict:
    report = tmp_path / "report.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if report.exists() and report.stat().st_size:
            try:
                return json.loads(report.read_text())
            except json.JSONDecodeError:
                pass
        if process.poll() is not None:
            raise AssertionError(f"launcher exited early: {process.communicate()}")
        time.sleep(0.05)
    raise TimeoutError("the stand-in server never started")


# ---- pure parts -----------------------------------------------------------------------------------

def test_load_config_errors_name_the_problem(tmp_path):
    with pytest.raises(LaunchError, match="not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LaunchError, match="not valid JSON"):
        load_config(bad)
    bad.write_text(json.dumps({"model_path": "/m", "served_model_name": "m", "extra_args": ["--bogus"]}))
    with pytest.raises(LaunchError, match="'--bogus' is not allowed"):
        load_config(bad)
    bad.write_text(json.dumps({"model_path": "/m", "served_model_name": "m", "colour": "red"}))
    with pytest.raises(LaunchError, match="colour"):
        load_config(bad)


def test_api_key_sources(tmp_path):
    config = LaunchConfig(model_path="/m", served_model_name="m")
    assert resolve_api_key(config, {}) is None
    assert resolve_api_key(config, {API_KEY_ENV: "k1"}) == "k1"
    named = LaunchConfig(model_path="/m", served_model_name="m", api_key_env="OTHER")
    assert resolve_api_key(named, {"OTHER": " k2\n"}) == "k2"
    with pytest.raises(LaunchError, match="api_key_env"):
        resolve_api_key(named, {})
    key_file = tmp_path / "key"
    key_file.write_text("k3\n")
    from_file = LaunchConfig(model_path="/m", served_model_name="m", api_key_file=str(key_file))
    assert resolve_api_key(from_file, {}) == "k3"
    with pytest.raises(LaunchError, match="api_key_file"):
        resolve_api_key(LaunchConfig(model_path="/m", served_model_name="m", api_key_file=str(tmp_path / "no")), {})


def test_plan_uses_the_entry_only_with_a_key(tmp_path):
    config = LaunchConfig(model_path=str(tmp_path), served_model_name="m")
    plain = prepare_launch(config, python="py", environ={})
    assert plain.process_argv == plain.sglang_argv and plain.sglang_argv[1:3] == ["-m", "sglang.launch_server"]
    keyed = prepare_launch(config, python="py", environ={API_KEY_ENV: SECRET})
    assert keyed.process_argv[1].endswith("sglang_entry.py")
    assert keyed.process_argv[2:] == keyed.sglang_argv[3:]
    assert SECRET not in repr(keyed) and SECRET not in " ".join(keyed.process_argv)


def test_missing_local_model_fails_before_starting(tmp_path):
    config = LaunchConfig(model_path=str(tmp_path / "absent"), served_model_name="m")
    with pytest.raises(LaunchError, match="model_path"):
        prepare_launch(config, environ={})


# ---- the CLI, end to end ----------------------------------------------------------------------------

def test_dry_run_prints_one_json_array(tmp_path):
    config = write_config(tmp_path, tensor_parallel_size=2, gpus=2, extra_args=("--schedule-policy", "lpm"))
    result = subprocess.run([CLI, "runtime", "launch", "--config", str(config), "--dry-run"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    assert argv[argv.index("--tp-size") + 1] == "2" and argv[-2:] == ["--schedule-policy", "lpm"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"gpus": 4, "tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"extra_args": ("--host", "x")}, "'--host' is not allowed"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, fields, expected):
    config = write_config(tmp_path, **fields)
    result = subprocess.run([CLI, "runtime", "launch", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_one_line(tmp_path):
    result = subprocess.run([CLI, "runtime", "launch", "--config", str(tmp_path / "nope.json")],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "config" in result.stderr


def test_sigterm_is_forwarded_and_exit_code_propagates(tmp_path, standin):
    config = write_config(tmp_path)
    process = start_launcher(config, launcher_env(standin, tmp_path, STANDIN_EXIT_CODE="3"))
    try:
        report = wait_for_report(tmp_path, process)
        assert report["argv"][0].endswith("launch_server.py")  # python -m sglang.launch_server
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert b"draining after signal 15" in stdout
    assert process.returncode == 3


def test_start_failure_exit_code_and_stderr_propagate(tmp_path, standin):
    config = write_config(tmp_path)
    process = start_launcher(config, launcher_env(standin, tmp_path, STANDIN_EXIT_NOW="7"))
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 7
    assert b"failing at start" in stderr


def test_death_by_signal_is_reported_as_128_plus_n(tmp_path, standin):
    config = write_config(tmp_path)
    process = start_launcher(config, launcher_env(standin, tmp_path, STANDIN_DIE_BY_SIGNAL="1"))
    process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGKILL


@pytest.mark.parametrize("source", ["env", "file"])
def test_api_key_reaches_sglang_but_not_argv_environ_or_logs(tmp_path, standin, source):
    extra = {}
    if source == "env":
        config = write_config(tmp_path, api_key_env="WORKER_KEY")
        extra["WORKER_KEY"] = SECRET
    else:
        key_file = tmp_path / "secret" / "api-key"
        key_file.parent.mkdir()
        key_file.write_text(SECRET + "\n")
        config = write_config(tmp_path, api_key_file=str(key_file))
    process = start_launcher(config, launcher_env(standin, tmp_path, **extra))
    try:
        report = wait_for_report(tmp_path, process)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert report["api_key"] == SECRET  # SGLang got it...
    assert SECRET not in report["cmdline"] and SECRET not in report["environ"]  # ...not via argv or env
    assert report["argv"][0].endswith("sglang_entry.py")
    assert b"server_args=" in stdout and b"<redacted>" in stdout  # SGLang logged it; the launcher scrubbed it
    assert SECRET.encode() not in stdout + stderr
    assert process.returncode == 0


def test_launch_fetches_the_model_then_points_sglang_at_the_cache(tmp_path, standin):
    """model_source set: the launcher downloads it (Hub API on loopback), then starts SGLang on the cached copy."""
    from runtime_fakehub import FakeHub, FakeRepo

    hub = FakeHub().start()
    hub.repos["acme/tiny"] = FakeRepo({"config.json": b"{}", "model.safetensors": b"w" * 4096},
                                      lfs={"model.safetensors"})
    try:
        cache = tmp_path / "models"
        config = write_config(tmp_path, model_source="hf://acme/tiny", model_cache_dir=str(cache))
        env = launcher_env(standin, tmp_path, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
        process = start_launcher(config, env)
        try:
            report = wait_for_report(tmp_path, process, timeout=60)
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert report["model_path"] == str(cache / "hf--acme--tiny")
        assert (cache / "hf--acme--tiny" / "model.safetensors").read_bytes() == b"w" * 4096
        assert b"ready at" in stderr  # fetch progress is logged
        # A restart skips the finished download: no more file requests reach the Hub.
        before = len(hub.requests)
        (tmp_path / "report.json").unlink()
        process = start_launcher(config, env)
        try:
            wait_for_report(tmp_path, process, timeout=60)
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert len(hub.requests) == before
    finally:
        hub.stop()


def test_launch_with_a_missing_hub_model_is_one_line(tmp_path, standin):
    from runtime_fakehub import FakeHub

    hub = FakeHub().start()
    try:
        config = write_config(tmp_path, model_source="hf://acme/absent", model_cache_dir=str(tmp_path / "models"))
        env = launcher_env(standin, tmp_path, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
        result = subprocess.run([CLI, "runtime", "launch", "--config", str(config)], env=env, cwd="/",
                                capture_output=True, text=True, timeout=60)
    finally:
        hub.stop()
    assert result.returncode == 2
    assert "repository not found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "report.json").exists()  # SGLang never started


def test_missing_interpreter_is_one_line(tmp_path):
    config = write_config(tmp_path)
    result = subprocess.run([CLI, "runtime", "launch", "--config", str(config), "--python", "/nonexistent/python3"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 2 and "python: cannot start /nonexistent/python3" in result.stderr
    assert "Traceback" not in result.stderr
