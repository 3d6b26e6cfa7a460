"""The container entrypoint: launch config in, a supervised SGLang server out.

`prepare_launch` reads the config the operator rendered, fetches the model when the config names a
source, resolves the API key and builds SGLang's argv with `contract.build_argv` (the same function
the operator uses). `supervise` starts SGLang as a child, forwards SIGTERM/SIGINT/SIGHUP so it
drains, relays its output line by line with the API key scrubbed, and returns its exit code
(128+N when it died of signal N, as a shell reports it).

Why a child and not exec: SGLang 0.5.23 logs its resolved arguments (API key included) at
start-up and has no option to read the key from a file or the environment. The key therefore
travels through an inherited pipe to `sglang_entry` (never argv or environment), and the
launcher stays in between to scrub what SGLang prints.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from .contract import API_KEY_ENV, LaunchConfig, build_argv
from .sglang_entry import API_KEY_FD_ENV

ENTRY_SCRIPT = Path(__file__).with_name("sglang_entry.py")
REDACTED = b"<redacted>"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class LaunchError(Exception):
    """A problem with the launch config, the key or the model: one line naming the field."""


@dataclass(frozen=True)
class LaunchPlan:
    config: LaunchConfig
    sglang_argv: list[str]  # the contract's argv: `python -m sglang.launch_server ...`
    api_key: str | None = dataclasses.field(default=None, repr=False)

    @property
    def process_argv(self) -> list[str]:
        """What is actually started: the contract argv, through `sglang_entry` when a key is handed over."""
        if self.api_key is None:
            return list(self.sglang_argv)
        return [self.sglang_argv[0], str(ENTRY_SCRIPT), *self.sglang_argv[3:]]


def load_config(path: str | os.PathLike) -> LaunchConfig:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise LaunchError(f"config: file {path} not found") from None
    except OSError as exc:
        raise LaunchError(f"config: cannot read {path} ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LaunchError(f"config: {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"config: {path} must hold a JSON object")
    try:
        config = LaunchConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise LaunchError(f"config: {exc}") from None
    problems = config.problems()
    if problems:
        raise LaunchError(f"config: {problems[0]}")
    return config


def resolve_api_key(config: LaunchConfig, environ: dict[str, str] | None = None) -> str | None:
    """The key from the file or env var the config names (a Secret mounted either way), else None."""
    environ = os.environ if environ is None else environ
    if config.api_key_file:
        try:
            key = Path(config.api_key_file).read_text().strip()
        except OSError as exc:
            raise LaunchError(f"api_key_file: cannot read {config.api_key_file} ({exc.strerror})") from None
        if not key:
            raise LaunchError(f"api_key_file: {config.api_key_file} is empty")
        return key
    if config.api_key_env:
        key = environ.get(config.api_key_env, "").strip()
        if not key:
            raise LaunchError(f"api_key_env: environment variable {config.api_key_env} is not set")
        return key
    # Not named in the config: the conventional variable still counts when the Secret sets it.
    return environ.get(API_KEY_ENV, "").strip() or None


def prepare_launch(
    config: LaunchConfig,
    *,
    python: str | None = None,
    fetch: bool = True,
    progress: Callable[[str], None] | None = None,
    environ: dict[str, str] | None = None,
    check_model: bool = True,
) -> LaunchPlan:
    if fetch and config.model_source:
        from .modelfetch import ModelFetchError, fetch_model

        try:
            model_dir = fetch_model(config.model_source, config.model_cache_dir, revision=config.revision,
                                    progress=progress)
        except ModelFetchError as exc:
            raise LaunchError(str(exc)) from None
        config = dataclasses.replace(config, model_path=str(model_dir))
    elif check_model and not config.model_source and config.model_path.startswith("/") \
            and not Path(config.model_path).exists():
        # A local path that is not there would only fail minutes later inside SGLang.
        raise LaunchError(f"model_path: {config.model_path} does not exist")
    api_key = resolve_api_key(config, environ)
    try:
        argv = build_argv(config, python=python or sys.executable)
    except ValueError as exc:
        raise LaunchError(f"config: {exc}") from None
    return LaunchPlan(config, argv, api_key)


def supervise(
    plan: LaunchPlan,
    *,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    env: dict[str, str] | None = None,
    on_start: Callable[[subprocess.Popen], None] | None = None,
) -> int:
    """Run SGLang as a child until it exits; return its exit code (128+N for signal N)."""
    out = stdout or sys.stdout.buffer
    err = stderr or sys.stderr.buffer
    child_env = dict(os.environ if env is None else env)
    pass_fds: tuple[int, ...] = ()
    read_fd = write_fd = None
    if plan.api_key is not None:
        # The key must not ride in the child's environment either: it goes through a pipe.
        for name in {API_KEY_ENV, plan.config.api_key_env or API_KEY_ENV}:
            child_env.pop(name, None)
        read_fd, write_fd = os.pipe()
        child_env[API_KEY_FD_ENV] = str(read_fd)
        pass_fds = (read_fd,)
    secrets = [plan.api_key.encode()] if plan.api_key else []

    previous_handlers = {}
    child: subprocess.Popen | None = None
    early_signals: list[int] = []  # arrived before the child existed: delivered once it does

    def forward(signum, _frame) -> None:
        if child is None:
            early_signals.append(signum)
        elif child.poll() is None:
            child.send_signal(signum)

    # Handlers go in before the child exists, so a SIGTERM arriving during start-up is not lost.
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        for signum in FORWARDED_SIGNALS:
            previous_handlers[signum] = signal.signal(signum, forward)
    try:
        try:
            child = subprocess.Popen(
                plan.process_argv,
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=pass_fds,
                # A neutral cwd: a checkout's top-level folders (e.g. operator/) must not shadow stdlib.
                cwd="/",
            )
        except OSError as exc:
            for fd in (read_fd, write_fd):
                if fd is not None:
                    os.close(fd)
            raise LaunchError(f"python: cannot start {plan.process_argv[0]} ({exc.strerror})") from None
        if write_fd is not None:
            os.close(read_fd)
            try:
                with os.fdopen(write_fd, "w", encoding="utf-8") as pipe:
                    pipe.write(plan.api_key)
            except BrokenPipeError:
                pass  # the child died at once; its exit code says why
        for signum in early_signals:
            child.send_signal(signum)
        relays = [
            threading.Thread(target=_relay, args=(child.stdout, out, secrets), daemon=True),
            threading.Thread(target=_relay, args=(child.stderr, err, secrets), daemon=True),
        ]
        for relay in relays:
            relay.start()
        if on_start is not None:
            on_start(child)
        returncode = child.wait()
        for relay in relays:
            relay.join(timeout=10)
    finally:
        if in_main_thread:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
    return 128 - returncode if returncode < 0 else returncode


def _relay(source: BinaryIO, sink: BinaryIO, secrets: list[bytes]) -> None:
    for line in iter(source.readline, b""):
        for secret in secrets:
            line = line.replace(secret, REDACTED)
        try:
            sink.write(line)
            sink.flush()
        except (BrokenPipeError, ValueError):
            pass
    source.close()
