"""`digital-worker runtime ...`: launch, fetch, sim, image build. Module level imports argparse only."""
from __future__ import annotations

import argparse
import sys


# The sim flags' defaults, to tell which flags a user set explicitly (those override --launch-config).
_SIM_DEFAULTS = {
    "model_name": "default", "model_path": None, "host": "127.0.0.1", "port": 30000, "gpu_type": None,
    "revision": None, "cold_start_seconds": 0.0, "max_running_requests": 256, "chunked_prefill_size": 8192,
    "context_length": 8192, "max_total_tokens": None, "prefix_cache_hit_rate": 0.0, "default_max_tokens": 128,
    "api_key": None, "error_rate": 0.0, "latency_factor": 1.0, "hang": False, "crash_after_seconds": None,
    "seed": None,
}


def _user_error(message: str) -> Exception:
    from digital_worker.cli import UserError

    return UserError(message)


def register(subparsers: argparse._SubParsersAction) -> None:
    runtime = subparsers.add_parser(
        "runtime", help="SGLang launcher, model fetch, simulated SGLang server, image build",
        description="The SGLang side of a digital worker: what runs inside the serving pod.",
    )
    commands = runtime.add_subparsers(dest="runtime_command", metavar="COMMAND")
    commands.required = True

    launch = commands.add_parser(
        "launch", help="start SGLang from the launch config (the container entrypoint)",
        description="Read the launch config, fetch the model if it names a source, start SGLang with "
                    "the contract's argv, forward SIGTERM and propagate its exit code.",
    )
    launch.add_argument("--config", required=True, help="launch config JSON (the operator's ConfigMap)")
    launch.add_argument("--dry-run", action="store_true",
                        help="print SGLang's argv as one JSON array and exit 0 (no fetch, no start)")
    launch.add_argument("--no-fetch", action="store_true", help="skip the model fetch phase")
    launch.add_argument("--python", default=None, help="interpreter that runs SGLang (default: this one)")
    launch.set_defaults(handler=_launch)

    fetch = commands.add_parser(
        "fetch", help="fetch a model into the cache (hf://, s3://, pvc://)",
        description="Download a model into the cache folder (resumable, verified, atomic); print its path.",
    )
    source = fetch.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", help="hf://org/name[@revision], s3://bucket/prefix or pvc://path")
    source.add_argument("--config", help="take model_source, revision and model_cache_dir from a launch config")
    fetch.add_argument("--cache-dir", default=None, help="cache folder (default: the config's, or /models)")
    fetch.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    fetch.set_defaults(handler=_fetch)

    sim = commands.add_parser(
        "sim", help="serve a simulated SGLang replica (same HTTP API and metrics, no GPU)",
        description="An SGLang-compatible server driven by the shared performance model of one replica.",
    )
    sim.add_argument("--launch-config", default=None, metavar="FILE",
                     help="take model name, path, port, revision and limits from a launch config "
                          "(flags given explicitly still win)")
    sim.add_argument("--host", default=_SIM_DEFAULTS["host"])
    sim.add_argument("--port", type=int, default=_SIM_DEFAULTS["port"])
    sim.add_argument("--model-name", default=_SIM_DEFAULTS["model_name"], help="served model name")
    sim.add_argument("--model-path", default=None, help="model path to report (default /models/NAME)")
    sim.add_argument("--gpu-type", default=None, help="GPU profile, e.g. nvidia-h100-80gb, a100, l4")
    sim.add_argument("--revision", default=None, help="revision label shown by /get_server_info")
    sim.add_argument("--cold-start", type=float, default=_SIM_DEFAULTS["cold_start_seconds"], metavar="SECONDS",
                     help="seconds before /health turns 200")
    sim.add_argument("--max-running-requests", type=int, default=_SIM_DEFAULTS["max_running_requests"])
    sim.add_argument("--chunked-prefill-size", type=int, default=_SIM_DEFAULTS["chunked_prefill_size"])
    sim.add_argument("--context-length", type=int, default=_SIM_DEFAULTS["context_length"])
    sim.add_argument("--max-total-tokens", type=int, default=None, help="KV cache capacity in tokens")
    sim.add_argument("--prefix-cache-hit-rate", type=float, default=_SIM_DEFAULTS["prefix_cache_hit_rate"])
    sim.add_argument("--default-max-tokens", type=int, default=_SIM_DEFAULTS["default_max_tokens"])
    sim.add_argument("--api-key-env", default=None, help="require the key held by this env var")
    sim.add_argument("--error-rate", type=float, default=_SIM_DEFAULTS["error_rate"], help="share of requests answered with 500")
    sim.add_argument("--latency-factor", type=float, default=_SIM_DEFAULTS["latency_factor"], help="multiply every step time")
    sim.add_argument("--hang", action="store_true", help="accept connections but never answer")
    sim.add_argument("--crash-after", type=float, default=None, metavar="SECONDS",
                     help="exit 1 after this many seconds")
    sim.add_argument("--seed", type=int, default=None)
    sim.set_defaults(handler=_sim)

    image = commands.add_parser("image", help="the serving image", description="Build the serving image.")
    image_commands = image.add_subparsers(dest="image_command", metavar="COMMAND")
    image_commands.required = True
    build = image_commands.add_parser(
        "build", help="build SGLang's image plus the launcher through a Docker Engine API",
        description="Render the Dockerfile and build it through the docker SDK (DOCKER_HOST: unix://, "
                    "tcp://, ssh://); optionally push.",
    )
    build.add_argument("--base", default=None, help="SGLang base image (default lmsysorg/sglang:v<pin>)")
    build.add_argument("--tag", default=None, help="REGISTRY/IMAGE:TAG to build (default: the operator's image)")
    build.add_argument("--push", action="store_true", help="push the tag after building")
    build.add_argument("--docker-host", default=None, help="Docker Engine API URL (default: DOCKER_HOST)")
    build.add_argument("--context-dir", default=None, help="keep the build context in this folder")
    build.add_argument("--print-dockerfile", action="store_true", help="print the Dockerfile and exit")
    build.set_defaults(handler=_image_build)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _launch(args: argparse.Namespace) -> int:
    import json

    from digital_worker.runtime.launcher import LaunchError, load_config, prepare_launch, supervise

    try:
        config = load_config(args.config)
        plan = prepare_launch(config, python=args.python, fetch=not (args.dry_run or args.no_fetch),
                              progress=_progress, check_model=not args.dry_run)
    except LaunchError as exc:
        raise _user_error(str(exc)) from None
    if args.dry_run:
        print(json.dumps(plan.sglang_argv))
        return 0
    _progress(f"starting SGLang: {' '.join(plan.sglang_argv)}")
    try:
        return supervise(plan)
    except LaunchError as exc:
        raise _user_error(str(exc)) from None


def _fetch(args: argparse.Namespace) -> int:
    from digital_worker.runtime.modelfetch import ModelFetchError, fetch_model

    source, revision, cache_dir = args.source, args.revision, args.cache_dir
    if args.config:
        from digital_worker.runtime.launcher import LaunchError, load_config

        try:
            config = load_config(args.config)
        except LaunchError as exc:
            raise _user_error(str(exc)) from None
        if not config.model_source:
            raise _user_error("model_source: the launch config names no model source")
        source, revision = config.model_source, revision or config.revision
        cache_dir = cache_dir or config.model_cache_dir
    try:
        path = fetch_model(source, cache_dir or "/models", revision=revision, progress=_progress)
    except ModelFetchError as exc:
        raise _user_error(str(exc)) from None
    print(path)
    return 0


def _sim(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from digital_worker.runtime.sim import SimConfig, serve_forever

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise _user_error(f"api_key_env: environment variable {args.api_key_env} is not set")
    values = dict(
        model_name=args.model_name, model_path=args.model_path, host=args.host, port=args.port,
        gpu_type=args.gpu_type, revision=args.revision, cold_start_seconds=args.cold_start,
        max_running_requests=args.max_running_requests, chunked_prefill_size=args.chunked_prefill_size,
        context_length=args.context_length, max_total_tokens=args.max_total_tokens,
        prefix_cache_hit_rate=args.prefix_cache_hit_rate, default_max_tokens=args.default_max_tokens,
        api_key=api_key, error_rate=args.error_rate, latency_factor=args.latency_factor, hang=args.hang,
        crash_after_seconds=args.crash_after, seed=args.seed,
    )
    if args.launch_config:
        from digital_worker.runtime.launcher import LaunchError, load_config

        try:
            launch = load_config(args.launch_config)
        except LaunchError as exc:
            raise _user_error(str(exc)) from None
        # Flags left at their defaults yield to the launch config; explicit ones win.
        explicit = {key: value for key, value in values.items() if value != _SIM_DEFAULTS.get(key)}
        config = SimConfig.from_launch_config(launch, host=args.host, **explicit)
    else:
        config = SimConfig(**values)
    problems = config.problems()
    if problems:
        raise _user_error(problems[0])
    try:
        return asyncio.run(_run_sim_until_signal(config, serve_forever))
    except OSError as exc:
        raise _user_error(f"port: cannot listen on {args.host}:{args.port} ({exc.strerror})") from None


async def _run_sim_until_signal(config, serve_forever) -> int:
    import asyncio
    import signal

    terminate = asyncio.Event()
    task = asyncio.ensure_future(serve_forever(config, terminate))

    def on_signal() -> None:  # the first signal drains, as SGLang does; a second one stops at once
        if terminate.is_set():
            task.cancel()
        terminate.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        return await task
    except asyncio.CancelledError:
        return 0


def _image_build(args: argparse.Namespace) -> int:
    from digital_worker.runtime.contract import SGLANG_BASE_IMAGE
    from digital_worker.runtime.image import ImageBuildError, build_image, default_image_tag, render_dockerfile

    base = args.base or SGLANG_BASE_IMAGE
    if args.print_dockerfile:
        print(render_dockerfile(base), end="")
        return 0
    try:
        result = build_image(base, args.tag or default_image_tag(), push=args.push,
                             docker_host=args.docker_host, progress=_progress, context_dir=args.context_dir)
    except ImageBuildError as exc:
        raise _user_error(str(exc)) from None
    print(result.image_id)
    return 0
