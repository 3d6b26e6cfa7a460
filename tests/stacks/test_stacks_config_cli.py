"""Stack config parsing, the example stack files, the `digital-worker stacks` commands and the cluster probe."""
from __future__ import annotations

import contextlib
import http.server
import io
import json
import threading
from pathlib import Path

import pytest
import yaml

from digital_worker.cli import main
from digital_worker.stacks import config as stack_config
from digital_worker.stacks.probe import has_prometheus_operator

REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's --help and usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("stack", ["existing", "onprem", "aws"])
def test_example_stack_files_are_valid(stack):
    values, secrets = stack_config.load_stack_file(REPO / f"Pulumi.{stack}.yaml")
    parsed = stack_config.parse(values, base_dir=REPO, has_secret=lambda k: k in secrets, require_secrets=False)
    assert parsed.target == stack
    code, out, err = run_cli("stacks", "check", str(REPO / f"Pulumi.{stack}.yaml"))
    assert code == 0 and out.strip().endswith(": ok"), err


def test_pulumi_yaml_points_at_the_program_folder():
    project = yaml.safe_load((REPO / "Pulumi.yaml").read_text())
    assert project["name"] == stack_config.PROJECT
    assert project["runtime"]["name"] == "python"
    program = REPO / project["main"] / "__main__.py"
    assert program.exists()
    assert "digital_worker.stacks.stack import run" in program.read_text()


def test_onprem_secrets_are_required_for_up_but_only_noted_by_check():
    values, secrets = stack_config.load_stack_file(REPO / "Pulumi.onprem.yaml")
    with pytest.raises(stack_config.ConfigError, match="sshPrivateKey is missing"):
        stack_config.parse(values, base_dir=REPO, has_secret=lambda k: False)
    code, out, _ = run_cli("stacks", "check", str(REPO / "Pulumi.onprem.yaml"))
    assert code == 0 and "note: sshPrivateKey is missing" in out


def test_every_problem_is_reported_with_its_key(tmp_path):
    values = {
        "target": "onprem",
        "platform": {"operatorReplicas": 2},
        "workers": [{"metadata": {"name": "w"}, "spec": {"model": {"name": "m", "source": "ftp://nope"}}}],
        "onprem": {"hosts": [{"name": "GPU_1", "address": "10.0.0.1", "hostKey": "ssh-ed25519 !!!"},
                             {"name": "gpu-2"}],
                   "k3s": {"installerScript": "missing/install.sh"}},
    }
    with pytest.raises(stack_config.ConfigError) as failure:
        stack_config.parse(values, base_dir=tmp_path, has_secret=lambda k: True)
    text = str(failure.value)
    for fragment in ("platform.operatorReplicas must be 1..1", "workers[0] (w)", "onprem.hosts[1] needs name and address",
                     "onprem.hosts[GPU_1]: name 'GPU_1' is not a valid node name", "onprem.hosts[GPU_1].hostKey",
                     "onprem.k3s.installerScript: cannot read missing/install.sh"):
        assert fragment in text, fragment


def test_kubeconfig_path_is_expanded_but_text_is_kept():
    parsed = stack_config.parse({"target": "existing", "kubeconfig": "~/.kube/config"})
    assert parsed.kubeconfig == str(Path.home() / ".kube" / "config")
    text = "apiVersion: v1\nkind: Config\n"
    assert stack_config.parse({"target": "existing", "kubeconfig": text}).kubeconfig == text


def test_installer_script_is_read_relative_to_the_project(tmp_path):
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "k3s.sh").write_text("#!/bin/sh\necho pinned installer\n")
    values = {"target": "onprem", "onprem": {
        "k3s": {"installerScript": "vendor/k3s.sh"},
        "hosts": [{"name": "gpu-1", "address": "10.0.0.1",
                   "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq3yP3x7bUuJw3cI6KqQ1n3yQnDq6m8i0WmSgdfk7nE"}]}}
    parsed = stack_config.parse(values, base_dir=tmp_path, has_secret=lambda k: True)
    assert parsed.onprem.k3s.installer_script == "#!/bin/sh\necho pinned installer\n"
    assert parsed.platform.gpu_runtime_class == "nvidia" and parsed.platform.device_plugin is True


def test_cli_help_at_every_level():
    for argv in (["stacks", "--help"], ["stacks", "check", "--help"], ["stacks", "manifests", "--help"],
                 ["stacks", "check-host", "--help"]):
        code, out, _ = run_cli(*argv)
        assert code == 0 and "usage:" in out


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "Pulumi.bad.yaml"
    bad.write_text("config:\n  digital-worker:target: mars\n")
    code, out, err = run_cli("stacks", "check", str(bad))
    assert code == 2 and err.count("\n") == 1 and "target must be one of" in err and "Traceback" not in err
    code, _, err = run_cli("stacks", "check", str(tmp_path / "absent.yaml"))
    assert code == 2 and "cannot read" in err
    code, _, err = run_cli("stacks", "check-host", "10.0.0.1", "--key", str(tmp_path / "k"), "--host-key", "junk")
    assert code == 2 and "--host-key" in err


def test_cli_manifests_print_the_platform_objects():
    code, out, _ = run_cli("stacks", "manifests", "-n", "ops", "--prometheus", "podmonitor",
                           "--operator-image", "registry.local/op:9")
    assert code == 0
    objects = list(yaml.safe_load_all(out))
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Namespace" and objects[0]["metadata"]["name"] == "ops"
    assert {"CustomResourceDefinition", "ClusterRole", "Deployment", "DaemonSet", "PodMonitor"} <= set(kinds)
    operator = next(o for o in objects if o["kind"] == "Deployment")
    assert operator["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.local/op:9"


class FakeApiServer:
    """A real HTTP server answering the API discovery request (`GET /apis`) like kube-apiserver."""

    def __init__(self, groups: list[str]) -> None:
        body = json.dumps({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
             "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                status = 200 if self.path.split("?")[0].rstrip("/") == "/apis" else 404
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if status == 200 else b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def kubeconfig(self) -> str:
        url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "t",
                               "clusters": [{"name": "t", "cluster": {"server": url}}],
                               "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
                               "users": [{"name": "t", "user": {"token": "probe-token"}}]})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_probe_finds_the_prometheus_operator_group(tmp_path):
    with_operator = FakeApiServer(["apps", "monitoring.coreos.com"])
    without = FakeApiServer(["apps", "digitalworker.io"])
    try:
        path = tmp_path / "kubeconfig"
        path.write_text(with_operator.kubeconfig())
        assert has_prometheus_operator(str(path)) is True
        assert has_prometheus_operator(without.kubeconfig()) is False  # kubeconfig given as text
    finally:
        with_operator.close()
        without.close()
    assert has_prometheus_operator(without.kubeconfig()) is None  # server gone: cannot tell
