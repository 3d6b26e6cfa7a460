"""`digital-worker init`: both templates, every stack, answers on stdin, no overwrite, outputs that validate."""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from digital_worker.cli import main
from digital_worker.operator import render, spec
from digital_worker.operator.scaffold import Answers, ScaffoldError, gather, render_manifest
from digital_worker.stacks import config

CLI = shutil.which("digital-worker")
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq3yP3x7bUuJw3cI6KqQ1n3yQnDq6m8i0WmSgdfk7nE"


def init(tmp_path: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`digital-worker init`: a real CLI process when answers come on stdin, else `main()` in-process (faster)."""
    argv = ["init", "--output-dir", str(tmp_path), *args]
    if stdin is not None:
        return subprocess.run([CLI, *argv], input=stdin, capture_output=True, text=True, timeout=60, cwd="/")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def load_stack(path: Path) -> config.StackConfig:
    values, secrets = config.load_stack_file(path)
    return config.parse(values, base_dir=path.parent, has_secret=lambda key: key in secrets, require_secrets=False)


def assert_renders(manifest: Path, through_cli: bool = False) -> list[dict]:
    """What `digital-worker render -f` prints for it (in-process unless `through_cli`: CLI starts cost ~1 s)."""
    if through_cli:
        result = subprocess.run([CLI, "render", "-f", str(manifest)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        objects = list(yaml.safe_load_all(result.stdout))
    else:
        body = yaml.safe_load(manifest.read_text())
        body["metadata"]["uid"] = "uid"
        objects = render.render_all(body, spec.normalize_spec(body["spec"])[0])
    assert {o["kind"] for o in objects} >= {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    return objects


@pytest.mark.parametrize("stack,extra", [("existing", []), ("onprem", ["--host-key", HOST_KEY]), ("aws", [])])
@pytest.mark.parametrize("template", ["minimal", "full"])
def test_non_interactive_outputs_validate_render_and_load(tmp_path, template, stack, extra):
    result = init(tmp_path, "--yes", "--template", template, "--stack", stack, "--name", "helper", *extra)
    assert result.returncode == 0, result.stderr
    manifest, stack_file = tmp_path / "helper.yaml", tmp_path / f"Pulumi.{stack}.yaml"
    body = yaml.safe_load(manifest.read_text())
    assert spec.validate(body) == []
    assert body["metadata"] == {"name": "helper", "namespace": "default"}
    objects = assert_renders(manifest)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    loaded = load_stack(stack_file)
    assert loaded.target == stack and loaded.platform.namespace == "digital-worker-system"
    if stack == "onprem":
        assert loaded.onprem.hosts[0].host_key == HOST_KEY and not loaded.onprem.accept_unknown_host_keys
    if stack == "aws":  # the worker is scheduled on the GPU type the node group's instances have
        assert body["spec"]["runtime"]["gpuType"] == "nvidia-l4-24gb"
        assert loaded.aws.gpu_node_groups[0].instance_types == ("g6.2xlarge",)
    assert "wrote" in result.stdout and "render -f" in result.stdout


def test_full_template_has_every_section_commented(tmp_path):
    assert init(tmp_path, "--yes", "--template", "full").returncode == 0
    text = (tmp_path / "support-bot.yaml").read_text()
    body = yaml.safe_load(text)
    assert set(body["spec"]) == {"model", "runtime", "replicas", "rollout", "autoscaling", "fallback"}
    steps = body["spec"]["rollout"]["canary"]["steps"]
    assert [next(iter(s)) for s in steps] == ["setWeight", "pause", "analysis", "setWeight", "analysis"]
    assert body["spec"]["rollout"]["analysis"]["maxErrorRate"] == 0.02
    assert body["spec"]["autoscaling"]["mode"] == "DryRun"
    lines = text.splitlines()
    for section in ("  runtime:", "  rollout:", "    analysis:", "  autoscaling:", "    reactive:", "  fallback:"):
        line = next(line for line in lines if line.startswith(section))
        assert "#" in line, f"{section.strip()} has no comment"
    # Every set value under these sections is explained somewhere on its own line or the section's.
    assert sum(1 for line in lines if "#" in line) > 40
    # The minimal template is short and points at the full one.
    assert init(tmp_path / "m", "--yes").returncode == 0
    minimal = yaml.safe_load((tmp_path / "m" / "support-bot.yaml").read_text())
    assert set(minimal["spec"]) == {"model", "runtime", "replicas"}
    assert "--template full" in (tmp_path / "m" / "support-bot.yaml").read_text()


def test_interactive_answers_on_stdin(tmp_path):
    # name, namespace, model (Enter), source, gpus, stack, region, instance type, gpu type (Enter: derived)
    answers = "team-bot\nteam-a\n\ns3://weights-bucket/llama-70b\n4\naws\neu-west-1\np5.48xlarge\n\n"
    result = init(tmp_path, "--template", "full", stdin=answers)
    assert result.returncode == 0, result.stderr
    assert "DigitalWorker name [support-bot]: " in result.stderr and "AWS region [us-east-1]" in result.stderr
    body = yaml.safe_load((tmp_path / "team-bot.yaml").read_text())
    assert body["metadata"] == {"name": "team-bot", "namespace": "team-a"}
    assert body["spec"]["model"] == {"name": "qwen2.5-7b", "source": "s3://weights-bucket/llama-70b", "revision": "main"}
    runtime = body["spec"]["runtime"]
    assert (runtime["gpusPerReplica"], runtime["tensorParallelSize"], runtime["gpuType"]) == (4, 4, "nvidia-h100-80gb")
    assert spec.validate(body) == []
    loaded = load_stack(tmp_path / "Pulumi.aws.yaml")
    assert loaded.aws.region == "eu-west-1" and loaded.aws.availability_zones == ("eu-west-1a", "eu-west-1b")
    assert_renders(tmp_path / "team-bot.yaml", through_cli=True)


def test_interactive_bad_answer_is_asked_again_and_eof_takes_defaults(tmp_path):
    result = init(tmp_path, stdin="Not_A_Name\nfine-bot\n")  # then EOF: every other answer is its default
    assert result.returncode == 0, result.stderr
    assert "is not a DNS label" in result.stderr
    body = yaml.safe_load((tmp_path / "fine-bot.yaml").read_text())
    assert body["metadata"]["name"] == "fine-bot" and body["spec"]["runtime"]["gpusPerReplica"] == 1
    assert load_stack(tmp_path / "Pulumi.existing.yaml").kubeconfig.endswith(".kube/config")


def test_onprem_interactive_asks_to_trust_the_first_key_only_without_one(tmp_path):
    # name..gpus (Enter x5), stack, address, user (Enter), host key (Enter: none), trust it? yes, gpu type (Enter)
    result = init(tmp_path, stdin="\n\n\n\n\nonprem\n10.1.2.3\n\n\nyes\n\n")
    assert result.returncode == 0, result.stderr
    assert "trust the first key seen and pin it (y/N) [no]" in result.stderr
    loaded = load_stack(tmp_path / "Pulumi.onprem.yaml")
    assert loaded.onprem.accept_unknown_host_keys and loaded.onprem.hosts[0].address == "10.1.2.3"
    assert loaded.onprem.hosts[0].user == "ubuntu" and "sshPrivateKey" in loaded.missing_secrets[0]


def test_flags_answer_their_questions_and_only_the_rest_are_asked(tmp_path):
    result = init(tmp_path, "--name", "flagged", "--stack", "existing", "--gpus", "2", stdin="\n\n\n\n\n\n\n")
    assert result.returncode == 0, result.stderr
    assert "DigitalWorker name" not in result.stderr and "GPUs per replica" not in result.stderr
    assert "Namespace [default]" in result.stderr and "Kubeconfig of the existing cluster" in result.stderr
    assert yaml.safe_load((tmp_path / "flagged.yaml").read_text())["spec"]["runtime"]["gpusPerReplica"] == 2


def test_never_overwrites_without_force(tmp_path):
    assert init(tmp_path, "--yes").returncode == 0
    manifest = tmp_path / "support-bot.yaml"
    manifest.write_text("# my edits\n" + manifest.read_text())
    again = init(tmp_path, "--yes", "--template", "full")
    assert again.returncode == 2 and "already exist" in again.stderr and "--force" in again.stderr
    assert manifest.read_text().startswith("# my edits")
    # Only the stack file in the way still blocks both files.
    manifest.unlink()
    blocked = init(tmp_path, "--yes")
    assert blocked.returncode == 2 and "Pulumi.existing.yaml" in blocked.stderr and not manifest.exists()
    forced = init(tmp_path, "--yes", "--template", "full", "--force")
    assert forced.returncode == 0 and "rollout:" in manifest.read_text()


def test_bad_flags_and_onprem_without_a_host_key_are_one_line_errors(tmp_path):
    result = init(tmp_path, "--yes", "--stack", "onprem")
    assert result.returncode == 2 and "--host-key" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())
    result = init(tmp_path, "--yes", "--gpus", "0")
    assert result.returncode == 2 and "--gpus" in result.stderr
    result = init(tmp_path, "--yes", "--source", "ftp://nope")
    assert result.returncode == 2 and "--source" in result.stderr
    result = init(tmp_path, "--yes", "--stack", "aws", "--instance-type", "m6i.large")
    assert result.returncode == 2 and "GPU instance type" in result.stderr
    trusted = init(tmp_path, "--yes", "--stack", "onprem", "--accept-unknown-host-keys")
    assert trusted.returncode == 0, trusted.stderr
    assert load_stack(tmp_path / "Pulumi.onprem.yaml").onprem.accept_unknown_host_keys


def test_every_answer_combination_of_the_templates_validates():
    """Pure: the templates with unusual but valid answers (quoting, big TP) stay valid manifests."""
    for answers in (Answers(name="a", model="org/Model:v1.5", source="pvc://models/llama", gpus=8, gpu_type="a100"),
                    Answers(name="x" * 40, namespace="n" * 63, source="hf://Org/repo-with.dots", gpus=64)):
        for template in ("minimal", "full"):
            assert spec.validate(yaml.safe_load(render_manifest(answers, template, "f.yaml"))) == []
    with pytest.raises(ScaffoldError, match="--name"):
        gather({"name": "x" * 41}, interactive=False)


def test_aws_gpu_types_match_the_aws_stack():
    """init keeps its own copy (no pulumi import to pick gpuType); it must not drift from the stack's."""
    from digital_worker.operator.scaffold import AWS_GPU_TYPES
    from digital_worker.stacks.aws import GPU_FAMILIES

    assert AWS_GPU_TYPES == {family: identity[0] for family, identity in GPU_FAMILIES.items()}
