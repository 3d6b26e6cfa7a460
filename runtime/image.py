"""Build (and push) the serving image: SGLang's image plus the digital-worker launcher.

`render_dockerfile` fills `templates/Dockerfile.j2`; `prepare_context` lays out a build context with
the launcher's Python files (the `digital_worker` package root and its `runtime` subpackage only);
`build_image` sends it to any Docker Engine API endpoint through the docker SDK (``DOCKER_HOST``:
``unix://``, ``tcp://``, ``ssh://`` via paramiko) and streams the engine's progress;
`push_image` pushes the tag. The operator's default image, `contract.DEFAULT_IMAGE`, is what
`default_image_tag` names: SGLang's image (`contract.SGLANG_BASE_IMAGE`) plus the launcher.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .contract import CONFIG_PATH, DEFAULT_IMAGE, RUNTIME_IMAGE_REPOSITORY, SGLANG_BASE_IMAGE, SGLANG_VERSION

TEMPLATE_DIR = Path(__file__).with_name("templates")
# The image's `digital-worker` command: the project's CLI, which finds only `runtime` in the image.
CLI_SCRIPT = """#!/usr/bin/env python3
import sys

from digital_worker.cli import main

sys.exit(main())
"""

Progress = Callable[[str], None]


class ImageBuildError(Exception):
    """The build or push failed; the message is one line."""


@dataclass(frozen=True)
class ImageBuildResult:
    tag: str
    image_id: str
    pushed: bool
    log: tuple[str, ...]


def default_image_tag(repository: str = RUNTIME_IMAGE_REPOSITORY) -> str:
    """The operator's default image (contract.DEFAULT_IMAGE) when built into its default repository."""
    if repository == RUNTIME_IMAGE_REPOSITORY:
        return DEFAULT_IMAGE
    return f"{repository}:{DEFAULT_IMAGE.rsplit(':', 1)[1]}"


def check_reference(reference: str, field: str) -> None:
    # name[:tag][@digest] with an optional registry host[:port]; enough to catch typos early.
    pattern = r"(?:[a-zA-Z0-9.-]+(?::\d+)?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
    if not re.fullmatch(pattern, reference):
        raise ImageBuildError(f"{field}: {reference!r} is not an image reference (name:tag)")


def render_dockerfile(base_image: str = SGLANG_BASE_IMAGE, package_dir: str = "digital_worker") -> str:
    import jinja2

    from digital_worker import __version__

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )
    return environment.get_template("Dockerfile.j2").render(
        base_image=base_image, sglang_version=SGLANG_VERSION, version=__version__,
        package_dir=package_dir, config_path=CONFIG_PATH, cli_script="bin/digital-worker",
    )


def _package_files() -> Iterator[tuple[Path, str]]:
    """(source file, path in the context) for everything the launcher needs in the image."""
    import digital_worker
    import digital_worker.runtime as runtime

    root = Path(digital_worker.__file__).parent
    for name in ("__init__.py", "cli.py"):
        yield root / name, f"digital_worker/{name}"
    runtime_dir = Path(runtime.__file__).parent
    for path in sorted(runtime_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".j2", ".json", ".txt"):
            yield path, f"digital_worker/runtime/{path.relative_to(runtime_dir).as_posix()}"


def prepare_context(directory: str | os.PathLike, base_image: str = SGLANG_BASE_IMAGE) -> Path:
    """Write Dockerfile and package files into `directory` (a plain folder: inspectable, reusable)."""
    context = Path(directory)
    context.mkdir(parents=True, exist_ok=True)
    for source, relative in _package_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    script = context / "bin" / "digital-worker"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(CLI_SCRIPT)
    script.chmod(0o755)  # COPY keeps the mode: no RUN chmod needed
    (context / "Dockerfile").write_text(render_dockerfile(base_image))
    return context


def _client(docker_host: str | None):
    import docker

    try:
        if docker_host:
            return docker.DockerClient(base_url=docker_host, timeout=600)
        return docker.from_env(timeout=600)
    except Exception as exc:  # DockerException, or paramiko's SSHException for ssh:// hosts
        where = docker_host or os.environ.get("DOCKER_HOST") or "the default socket"
        raise ImageBuildError(f"docker_host: cannot reach a Docker Engine API at {where} ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def build_image(
    base_image: str,
    tag: str,
    *,
    push: bool = False,
    docker_host: str | None = None,
    progress: Progress | None = None,
    context_dir: str | os.PathLike | None = None,
) -> ImageBuildResult:
    """Render, build and optionally push the image; return its id. Progress lines go to `progress`."""
    check_reference(base_image, "base")
    check_reference(tag, "tag")
    say = progress or (lambda line: None)
    client = _client(docker_host)
    log: list[str] = []
    temporary = None
    try:
        if context_dir is None:
            temporary = tempfile.mkdtemp(prefix="dw-image-")
            context_dir = temporary
        context = prepare_context(context_dir, base_image)
        say(f"building {tag} from {base_image} (context {context})")
        image_id = None
        try:
            stream = client.api.build(path=str(context), tag=tag, rm=True, forcerm=True, decode=True, pull=False)
            for chunk in stream:
                if "error" in chunk:
                    detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                    raise ImageBuildError(f"base: build failed: {detail.strip().splitlines()[0]}")
                line = (chunk.get("stream") or chunk.get("status") or "").rstrip()
                if line:
                    log.append(line)
                    say(line)
                aux = chunk.get("aux") or {}
                if "ID" in aux:
                    image_id = aux["ID"]
        except ImageBuildError:
            raise
        except Exception as exc:  # docker.errors.APIError, connection errors
            raise ImageBuildError(f"base: build failed: {_short(exc)}") from None
        try:
            image = client.images.get(tag)
        except Exception as exc:
            raise ImageBuildError(f"tag: build finished but {tag} is not in the engine ({_short(exc)})") from None
        image_id = image.id or image_id
        say(f"built {tag} ({image_id})")
        if push:
            push_image(client, tag, say, log)
        return ImageBuildResult(tag, image_id, push, tuple(log))
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        client.close()


def push_image(client, tag: str, say: Progress, log: list[str]) -> None:
    repository, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
    say(f"pushing {repository}:{version}")
    try:
        for chunk in client.api.push(repository, tag=version, stream=True, decode=True):
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise ImageBuildError(f"tag: push of {tag} failed: {detail.strip().splitlines()[0]}")
            line = " ".join(str(chunk.get(key)) for key in ("status", "progress") if chunk.get(key))
            if line:
                log.append(line)
                say(line)
    except ImageBuildError:
        raise
    except Exception as exc:
        raise ImageBuildError(f"tag: push of {tag} failed: {_short(exc)}") from None
    say(f"pushed {tag}")
