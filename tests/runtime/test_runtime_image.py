"""The image build, for real: the docker SDK against `podman system service` (Docker Engine API) on a
unix socket, with a base image imported from a busybox rootfs tarball made here."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from dwtest_support import free_port, stop_process, wait_http
from digital_worker.runtime.contract import DEFAULT_IMAGE, SGLANG_BASE_IMAGE, SGLANG_VERSION
from digital_worker.runtime.image import (
    ImageBuildError,
    build_image,
    default_image_tag,
    prepare_context,
    render_dockerfile,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CONTAINERS_CONF = """\
[containers]
default_ulimits = []
cgroups = "disabled"

[engine]
events_logger = "file"
cgroup_manager = "cgroupfs"
"""


class PodmanService:
    """`podman system service` on a unix socket, with its own storage (vfs) under a temp folder."""

    def __init__(self, workdir: Path, insecure_registry: str) -> None:
        self.workdir = workdir
        self.socket = workdir / "podman.sock"
        self.url = f"unix://{self.socket}"
        (workdir / "containers.conf").write_text(CONTAINERS_CONF)
        # The test registry speaks plain HTTP on loopback: podman must be told so.
        (workdir / "registries.conf").write_text(f'[[registry]]\nlocation = "{insecure_registry}"\ninsecure = true\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(workdir / "containers.conf"),
                    "CONTAINERS_REGISTRIES_CONF": str(workdir / "registries.conf")}
        self.base_args = ["podman", "--storage-driver=vfs", f"--root={workdir / 'root'}",
                          f"--runroot={workdir / 'runroot'}"]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.workdir / "service.log", "wb")
        self.process = subprocess.Popen([*self.base_args, "system", "service", "--time=0", self.url],
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd="/")
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"podman service did not start: {(self.workdir / 'service.log').read_text()}")
            time.sleep(0.1)

    def import_busybox(self, reference: str) -> None:
        rootfs = self.workdir / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy(shutil.which("busybox"), rootfs / "bin" / "busybox")
        with tarfile.open(self.workdir / "rootfs.tar", "w") as archive:
            archive.add(rootfs, arcname=".")
        subprocess.run([*self.base_args, "import", str(self.workdir / "rootfs.tar"), reference],
                       env=self.env, check=True, capture_output=True, cwd="/")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@pytest.fixture(scope="module")
def registry_address() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def podman(tmp_path_factory, registry_address):
    if shutil.which("podman") is None or shutil.which("busybox") is None:
        pytest.fail("Debian's podman and busybox-static packages are needed (.ci/run installs them)")
    service = PodmanService(tmp_path_factory.mktemp("podman"), registry_address)
    service.start()
    try:
        service.import_busybox("localhost/sglang-base:test")
        yield service
    finally:
        service.stop()


def image_files(client, reference: str) -> tuple[dict[str, bytes], dict[str, int]]:
    """Every regular file in the image's layers (the later layer wins) and its mode, from `docker save`."""
    saved = io.BytesIO(b"".join(client.images.get(reference).save()))
    files: dict[str, bytes] = {}
    modes: dict[str, int] = {}
    with tarfile.open(fileobj=saved) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))
        for layer in manifest[0]["Layers"]:
            with tarfile.open(fileobj=outer.extractfile(layer)) as inner:
                for member in inner.getmembers():
                    if member.isfile():
                        files[member.name.lstrip("./")] = inner.extractfile(member).read()
                        modes[member.name.lstrip("./")] = member.mode
    return files, modes


def test_dockerfile_is_copy_only_and_pins_the_base():
    text = render_dockerfile()
    assert f"FROM {SGLANG_BASE_IMAGE}" in text and f'sglang-version="{SGLANG_VERSION}"' in text
    instructions = {line.split()[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))}
    assert instructions <= {"FROM", "LABEL", "COPY", "ENV", "ENTRYPOINT", "CMD"}
    assert 'ENTRYPOINT ["digital-worker", "runtime", "launch"]' in text


def test_default_tag_is_the_operators_default_image():
    assert default_image_tag() == DEFAULT_IMAGE and DEFAULT_IMAGE.endswith(f"-sglang{SGLANG_VERSION}")
    assert default_image_tag("registry.local/team/sglang").startswith("registry.local/team/sglang:")


def test_bad_references_are_rejected_before_any_connection():
    with pytest.raises(ImageBuildError, match="tag"):
        build_image("localhost/base:1", "Bad Tag!", docker_host="unix:///nonexistent.sock")
    with pytest.raises(ImageBuildError, match="base"):
        build_image("not a ref", "localhost/x:1", docker_host="unix:///nonexistent.sock")


def test_unreachable_engine_is_one_line(tmp_path):
    with pytest.raises(ImageBuildError, match="docker_host|build failed"):
        build_image("localhost/base:1", "localhost/x:1", docker_host=f"unix://{tmp_path}/absent.sock")


def test_build_through_podman_and_the_payload_runs(podman, tmp_path):
    import docker

    lines: list[str] = []
    result = build_image("localhost/sglang-base:test", "localhost/dw-sglang:test", docker_host=podman.url,
                         progress=lines.append)
    assert result.image_id.startswith("sha256:") and not result.pushed
    assert any("COPY digital_worker" in line for line in lines)  # the engine's progress was streamed

    client = docker.DockerClient(base_url=podman.url)
    try:
        image = client.images.get("localhost/dw-sglang:test")
        assert image.attrs["Config"]["Entrypoint"] == ["digital-worker", "runtime", "launch"]
        assert image.labels["io.digitalworker.sglang-version"] == SGLANG_VERSION
        assert "PYTHONPATH=/opt/digital-worker" in image.attrs["Config"]["Env"]
        files, modes = image_files(client, "localhost/dw-sglang:test")
    finally:
        client.close()
    assert "bin/busybox" in files  # the base layer is there
    payload = {name: data for name, data in files.items() if name.startswith("opt/digital-worker/")}
    assert "opt/digital-worker/digital_worker/runtime/launcher.py" in payload
    assert not any("/operator/" in name or "__pycache__" in name for name in payload)
    assert modes["usr/local/bin/digital-worker"] & 0o111  # the command the operator's pods run is executable
    payload["usr/local/bin/digital-worker"] = files["usr/local/bin/digital-worker"]

    # The image cannot run here, so run its Python payload the way its entrypoint would: no site
    # packages (so not this checkout's install), PYTHONPATH=/opt/digital-worker.
    root = tmp_path / "image-root"
    for name, data in payload.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    config = tmp_path / "runtime.json"
    config.write_text(json.dumps({"model_path": "/models/m", "served_model_name": "m"}))
    env = {"PYTHONPATH": str(root / "opt/digital-worker"), "PATH": os.environ["PATH"]}
    script = str(root / "usr/local/bin/digital-worker")
    for argv in ([sys.executable, "-S", script, "runtime", "launch"],  # the operator's pod command
                 [sys.executable, "-S", "-m", "digital_worker.runtime", "launch"]):
        run = subprocess.run([*argv, "--config", str(config), "--dry-run"], env=env, capture_output=True, text=True,
                             timeout=60, cwd="/")
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout)[1:5] == ["-m", "sglang.launch_server", "--model-path", "/models/m"]
    # Only the runtime commands exist in the image: the operator and friends are not there.
    listing = subprocess.run([sys.executable, "-S", script, "--help"], env=env, capture_output=True, text=True,
                             timeout=60, cwd="/")
    assert "runtime" in listing.stdout and "operator" not in listing.stdout.split("positional arguments")[-1]


def test_missing_base_image_fails_in_one_line(podman):
    with pytest.raises(ImageBuildError, match="base: build failed"):
        build_image("localhost/no-such-base:1", "localhost/dw-sglang:never", docker_host=podman.url)


def test_push_to_an_unreachable_registry_is_reported(podman):
    tag = f"127.0.0.1:{free_port()}/dw-sglang:test"
    with pytest.raises(ImageBuildError, match="push of"):
        build_image("localhost/sglang-base:test", tag, docker_host=podman.url, push=True)


def test_cli_build_prints_the_image_id(podman, tmp_path):
    context = tmp_path / "context"
    result = subprocess.run(
        [shutil.which("digital-worker"), "runtime", "image", "build", "--base", "localhost/sglang-base:test",
         "--tag", "localhost/dw-sglang:cli", "--docker-host", podman.url, "--context-dir", str(context)],
        capture_output=True, text=True, timeout=180, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("sha256:")
    assert "Successfully tagged" in result.stderr  # progress goes to stderr, the id to stdout
    assert (context / "Dockerfile").is_file()  # --context-dir keeps the context for inspection


def test_prepare_context_lays_out_the_package(tmp_path):
    context = prepare_context(tmp_path / "ctx")
    assert (context / "digital_worker" / "__init__.py").is_file()
    assert (context / "digital_worker" / "runtime" / "templates" / "Dockerfile.j2").is_file()
    assert (context / "digital_worker" / "runtime" / "sglang_entry.py").is_file()
    assert os.access(context / "bin" / "digital-worker", os.X_OK)


@pytest.fixture
def ssh_engine(podman, tmp_path, monkeypatch):
    """The same podman API behind a real sshd on loopback: DOCKER_HOST=ssh://..., as for a remote build host.

    The docker SDK (paramiko) runs `docker system dial-stdio` on the remote side, which the docker CLI
    forwards to DOCKER_HOST, set for the session by sshd's SetEnv. Host keys are verified (RejectPolicy):
    the test writes known_hosts and the client key into a throwaway HOME.
    """
    for tool in ("docker", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("Debian's openssh-server is not installed")
    home = tmp_path / "home"
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(parents=True)
    server_dir = tmp_path / "sshd"
    server_dir.mkdir()
    for key in (server_dir / "host_key", ssh_dir / "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (server_dir / "authorized_keys").write_text((ssh_dir / "id_ed25519.pub").read_text())
    port = free_port()
    docker_dir = Path(shutil.which("docker")).parent
    (server_dir / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {server_dir / 'host_key'}\n"
        f"AuthorizedKeysFile {server_dir / 'authorized_keys'}\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        f"PidFile {server_dir / 'sshd.pid'}\n"
        f"SetEnv DOCKER_HOST={podman.url} PATH={docker_dir}:/usr/bin:/bin\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    host_key = (server_dir / "host_key.pub").read_text().split()
    (ssh_dir / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (ssh_dir / "config").write_text(f"Host 127.0.0.1\n  IdentityFile {ssh_dir / 'id_ed25519'}\n")
    process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(server_dir / "sshd_config"),
                                "-E", str(server_dir / "sshd.log")], cwd="/")
    try:
        deadline = time.monotonic() + 15
        import socket

        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail(f"sshd did not start: {(server_dir / 'sshd.log').read_text()}")
                time.sleep(0.1)
        monkeypatch.setenv("HOME", str(home))
        yield f"ssh://root@127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_build_over_ssh(ssh_engine):
    result = build_image("localhost/sglang-base:test", "localhost/dw-sglang:ssh", docker_host=ssh_engine)
    assert result.image_id.startswith("sha256:")
    assert any("Successfully tagged" in line or "COMMIT" in line for line in result.log)


def test_ssh_host_with_unknown_host_key_is_refused(ssh_engine, tmp_path):
    (Path(os.environ["HOME"]) / ".ssh" / "known_hosts").write_text("")  # nothing trusted
    with pytest.raises(ImageBuildError, match="docker_host"):
        build_image("localhost/sglang-base:test", "localhost/dw-sglang:ssh2", docker_host=ssh_engine)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, registry_address):
    """A real image registry (Debian's docker-registry, the Distribution v2 server) on loopback."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("Debian's docker-registry package is needed (.ci/run installs it)")
    workdir = tmp_path_factory.mktemp("registry")
    (workdir / "config.yml").write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n"
        f"http:\n  addr: {registry_address}\n")
    with open(workdir / "registry.log", "wb") as log:
        process = subprocess.Popen([binary, "serve", str(workdir / "config.yml")], stdout=log,
                                   stderr=subprocess.STDOUT, cwd="/")
    try:
        wait_http(f"http://{registry_address}/v2/", timeout=30)
        yield registry_address
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_push_to_a_real_registry(podman, registry):
    lines: list[str] = []
    tag = f"{registry}/digital-worker/sglang-runtime:test"
    result = build_image("localhost/sglang-base:test", tag, docker_host=podman.url, push=True, progress=lines.append)
    assert result.pushed and f"pushed {tag}" in lines
    with urllib.request.urlopen(f"http://{registry}/v2/digital-worker/sglang-runtime/tags/list", timeout=5) as response:
        assert json.load(response)["tags"] == ["test"]
    request = urllib.request.Request(f"http://{registry}/v2/digital-worker/sglang-runtime/manifests/test",
                                     headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json, "
                                                        "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        manifest = json.load(response)
    assert len(manifest["layers"]) == 3  # the busybox base and our two COPY layers (package, command)
