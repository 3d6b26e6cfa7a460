"""`digital-worker init`: a commented DigitalWorker manifest and a Pulumi stack config to start from.

A few questions (defaults in brackets, Enter accepts; or flags with --yes for scripts) fill two
templates:

- ``<name>.yaml``: the DigitalWorker. ``minimal`` holds the model and the runtime basics; ``full``
  adds every section (runtime tuning, canary rollout with analysis, forecast autoscaling,
  fallback model), each commented with what it does.
- ``Pulumi.<stack>.yaml``: the stack config with the keys the stacks program reads
  (stacks/config.py) for ``existing``, ``onprem`` or ``aws``.

Both are checked before anything is written: the manifest by the operator's own validation (the
CRD schema and its CEL rules, `spec.validate`), the stack config by `stacks.config.parse` when the
stacks extra is installed. Existing files are never overwritten without ``--force``.
The comments are part of the text templates (pyyaml cannot write comments).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

from digital_worker.operator import schema as api

TEMPLATES = ("minimal", "full")
STACKS = ("existing", "onprem", "aws")
# GPU type labels of the AWS instance families the aws stack knows (stacks/aws.py GPU_FAMILIES; kept
# here too so `init` needs no pulumi import to pick the worker's gpuType from an instance type).
AWS_GPU_TYPES = {"g4dn": "nvidia-t4-16gb", "g5": "nvidia-a10g-24gb", "g6": "nvidia-l4-24gb",
                 "g6e": "nvidia-l40s-48gb", "p4d": "nvidia-a100-40gb", "p4de": "nvidia-a100-80gb",
                 "p5": "nvidia-h100-80gb", "p5e": "nvidia-h200-141gb", "p5en": "nvidia-h200-141gb"}
HOST_KEY_PATTERN = r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( .*)?$"


class ScaffoldError(ValueError):
    """An answer or flag that cannot make a valid manifest or stack config; the message names it."""


@dataclass(frozen=True)
class Answers:
    name: str = "support-bot"
    namespace: str = "default"
    model: str = "qwen2.5-7b"
    source: str = "hf://Qwen/Qwen2.5-7B-Instruct"
    gpus: int = 1
    gpu_type: str = ""  # empty: any node with free GPUs
    stack: str = "existing"
    # stack "existing"
    kubeconfig: str = "~/.kube/config"
    context: str = ""
    # stack "onprem"
    host_address: str = "10.0.0.11"
    host_user: str = "ubuntu"
    host_key: str = ""
    accept_unknown_host_keys: bool = False
    # stack "aws"
    region: str = "us-east-1"
    instance_type: str = "g6.2xlarge"


# ---- questions -----------------------------------------------------------------------------------

def _matches(pattern: str, what: str, max_length: int | None = None) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value) or (max_length is not None and len(value) > max_length):
            raise ScaffoldError(f"{value!r} is not {what}")
        return value
    return check


def _gpus(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ScaffoldError(f"{value!r} is not a whole number of GPUs") from None
    if not 1 <= number <= 64:
        raise ScaffoldError("GPUs per replica must be between 1 and 64")
    return number


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ScaffoldError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def _optional(check: Callable[[str], str]) -> Callable[[str], str]:
    return lambda value: check(value) if value else ""


def _aws_instance(value: str) -> str:
    family = value.split(".", 1)[0]
    if "." not in value or family not in AWS_GPU_TYPES:
        raise ScaffoldError(f"{value!r} is not a GPU instance type the aws stack knows "
                            f"({', '.join(sorted(AWS_GPU_TYPES))} families)")
    return value


def _yes_no(value: str) -> bool:
    if value.lower() in ("y", "yes", "true"):
        return True
    if value.lower() in ("n", "no", "false"):
        return False
    raise ScaffoldError(f"{value!r} is not yes or no")


@dataclass(frozen=True)
class Question:
    field: str
    prompt: str
    parse: Callable[[str], Any]
    when: Callable[[Answers], bool] = lambda answers: True
    default: Callable[[Answers], Any] | None = None  # computed from earlier answers (else the Answers default)


QUESTIONS = (
    Question("name", "DigitalWorker name", _matches(api.DNS_LABEL_PATTERN, "a DNS label of at most 40 characters", 40)),
    Question("namespace", "Namespace", _matches(api.DNS_LABEL_PATTERN, "a DNS label of at most 63 characters", 63)),
    Question("model", "Model name clients ask for", _matches(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", "a model name", 128)),
    Question("source", "Model weights (hf://org/repo, s3://bucket/prefix, pvc://claim/path)",
             _matches(api.MODEL_SOURCE_PATTERN, "an hf://, s3:// or pvc:// source", 1024)),
    Question("gpus", "GPUs per replica", _gpus),
    Question("stack", "Pulumi stack (existing, onprem, aws)", _one_of(STACKS)),
    Question("kubeconfig", "Kubeconfig of the existing cluster", _matches(r"^\S+$", "a path"),
             when=lambda a: a.stack == "existing"),
    Question("context", "Kubeconfig context (empty: the current one)", _optional(_matches(r"^\S+$", "a context name")),
             when=lambda a: a.stack == "existing"),
    Question("host_address", "First GPU host's address (it runs the k3s server)",
             _matches(r"^[A-Za-z0-9.:-]+$", "a host name or IP address"), when=lambda a: a.stack == "onprem"),
    Question("host_user", "SSH user on the host (passwordless sudo)", _matches(r"^[a-z_][a-z0-9_-]*$", "a user name"),
             when=lambda a: a.stack == "onprem"),
    Question("host_key", "The host's verified SSH host key (ssh-keyscan -t ed25519 ADDRESS, checked out of band)",
             _optional(_matches(HOST_KEY_PATTERN, "an SSH public key line such as 'ssh-ed25519 AAAA...'")),
             when=lambda a: a.stack == "onprem" and not a.accept_unknown_host_keys),
    Question("accept_unknown_host_keys", "No verified key: trust the first key seen and pin it (y/N)", _yes_no,
             when=lambda a: a.stack == "onprem" and not a.host_key and not a.accept_unknown_host_keys),
    Question("region", "AWS region", _matches(r"^[a-z]{2}(-[a-z]+)+-[0-9]$", "an AWS region such as us-east-1"),
             when=lambda a: a.stack == "aws"),
    Question("instance_type", "GPU instance type", _aws_instance, when=lambda a: a.stack == "aws"),
    Question("gpu_type", "GPU type label to schedule on (empty: any GPU node)",
             _optional(_matches(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", "a node label value", 63)),
             default=lambda a: AWS_GPU_TYPES.get(a.instance_type.split(".")[0], "") if a.stack == "aws" else ""),
)
FLAG_FIELDS = {f.name for f in fields(Answers)}


def gather(given: dict[str, Any], *, interactive: bool, stdin: TextIO | None = None,
           prompts: TextIO | None = None, attempts: int = 3) -> Answers:
    """Answers from flags (`given`, None = not given), then questions (interactive) or defaults.

    Prompts go to `prompts` (stderr by default) so stdout stays for the summary; a closed stdin
    accepts the remaining defaults.
    """
    stdin = stdin or sys.stdin
    prompts = prompts or sys.stderr
    answers = Answers()
    unknown = set(given) - FLAG_FIELDS
    if unknown:
        raise ScaffoldError(f"unknown answer(s): {', '.join(sorted(unknown))}")
    # Flags first, so that questions that depend on them (which stack? which instance?) see them.
    for question in QUESTIONS:
        value = given.get(question.field)
        if value is not None:
            try:
                parsed = question.parse(str(value))
            except ScaffoldError as exc:
                raise ScaffoldError(f"--{question.field.replace('_', '-')}: {exc}") from None
            answers = replace(answers, **{question.field: parsed})
    if given.get("accept_unknown_host_keys"):
        answers = replace(answers, accept_unknown_host_keys=True)
    given = {key: value for key, value in given.items() if key != "accept_unknown_host_keys" or value}
    closed = False
    for question in QUESTIONS:
        if given.get(question.field) is not None or not question.when(answers):
            continue
        default = question.default(answers) if question.default else getattr(answers, question.field)
        if not interactive or closed:
            answers = replace(answers, **{question.field: default})
            continue
        for attempt in range(attempts):
            shown = ("yes" if default else "no") if isinstance(default, bool) else default
            prompts.write(f"{question.prompt} [{shown}]: ")
            prompts.flush()
            line = stdin.readline()
            if not line:  # EOF: the rest are defaults
                prompts.write("\n")
                closed = True
                text = ""
            else:
                text = line.strip()
            if not text:
                answers = replace(answers, **{question.field: default})
                break
            try:
                answers = replace(answers, **{question.field: question.parse(text)})
                break
            except ScaffoldError as exc:
                prompts.write(f"  {exc}\n")
                if attempt == attempts - 1:
                    raise ScaffoldError(f"{question.prompt}: {exc}") from None
    if answers.stack == "onprem" and not answers.host_key and not answers.accept_unknown_host_keys:
        raise ScaffoldError("the onprem stack needs the first host's verified SSH host key (--host-key "
                            "'ssh-ed25519 AAAA...'), or --accept-unknown-host-keys to trust and pin the first key seen")
    return answers


# ---- the manifest --------------------------------------------------------------------------------

def _scalar(value: Any) -> str:
    """One YAML scalar, quoted only when YAML needs it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _gpu_type_line(answers: Answers, indent: str) -> str:
    if answers.gpu_type:
        return f"{indent}gpuType: {_scalar(answers.gpu_type)}    # only nodes labelled digitalworker.io/gpu-type={answers.gpu_type}\n"
    return f"{indent}# gpuType: nvidia-h100-80gb    # schedule only on nodes with this digitalworker.io/gpu-type label\n"


def _header(answers: Answers, template: str, filename: str) -> str:
    return (
        f"# DigitalWorker {answers.name}: the model {answers.model} served by SGLang "
        f"(written by `digital-worker init --template {template}`).\n"
        f"#   check: digital-worker render -f {filename}    (the objects the operator will create)\n"
        f"#   apply: kubectl apply -f {filename}\n"
        "# Every field with its default: README.md (\"The DigitalWorker resource\") or `digital-worker crd`.\n"
        f"apiVersion: {api.API_VERSION}\n"
        f"kind: {api.KIND}\n"
        "metadata:\n"
        f"  name: {_scalar(answers.name)}\n"
        f"  namespace: {_scalar(answers.namespace)}\n"
        "spec:\n"
        "  model:\n"
        f"    name: {_scalar(answers.model)}    # the `model` clients ask for (OpenAI API)\n"
        f"    source: {_scalar(answers.source)}    # hf://org/repo, s3://bucket/prefix or pvc://claim/path\n"
        "    revision: main    # branch, tag or commit of an hf:// source; a change starts a new revision\n"
    )


def render_minimal(answers: Answers, filename: str) -> str:
    return (
        _header(answers, "minimal", filename)
        + "  runtime:    # how each replica runs; changing it rolls out a new revision\n"
        f"    gpusPerReplica: {answers.gpus}    # nvidia.com/gpu per replica\n"
        f"    tensorParallelSize: {answers.gpus}    # SGLang --tp-size: one model copy across the replica's GPUs\n"
        + _gpu_type_line(answers, "    ")
        + "  replicas: 1    # serving replicas; `kubectl scale dw " + answers.name + " --replicas N` changes it\n"
        "  # More: runtime tuning, canary rollouts, forecast autoscaling, a fallback model:\n"
        "  #   digital-worker init --template full\n"
    )


def render_full(answers: Answers, filename: str) -> str:
    key_secret = f"{answers.name}-api-key"
    return (
        _header(answers, "full", filename)
        + "    # quantization: fp8    # SGLang --quantization (fp8, awq, gptq, ...)\n"
        "    # contextLength: 32768    # SGLang --context-length, in tokens\n"
        "    # hfTokenSecretRef: {name: hf-token, key: token}    # Secret with a Hub token for gated models\n"
        "  runtime:    # how each replica runs; changing it rolls out a new revision\n"
        f"    image: {_scalar(api.RUNTIME_SCHEMA['properties']['image']['default'])}"
        "    # built by `digital-worker runtime image build`\n"
        f"    gpusPerReplica: {answers.gpus}    # nvidia.com/gpu per replica\n"
        f"    tensorParallelSize: {answers.gpus}    # SGLang --tp-size; gpusPerReplica must be a multiple of TP x DP\n"
        + _gpu_type_line(answers, "    ")
        + "    memFractionStatic: 0.85    # SGLang --mem-fraction-static: GPU memory for weights and KV cache\n"
        "    maxRunningRequests: 128    # SGLang --max-running-requests: the batch limit per replica\n"
        "    extraArgs: [\"--chunked-prefill-size\", \"8192\"]    # more SGLang flags, allow-listed ones only\n"
        f"    apiKeySecretRef: {{name: {key_secret}, key: api-key}}    # clients send it as a Bearer token\n"
        f"    #   kubectl -n {answers.namespace} create secret generic {key_secret} "
        "--from-literal=api-key=\"$(openssl rand -hex 24)\"\n"
        "    resources: {cpu: \"8\", memory: 64Gi}    # CPU and memory requests per replica\n"
        "    startupTimeoutSeconds: 1800    # model download and load may take this long before a restart\n"
        "    terminationGracePeriodSeconds: 180    # time SGLang gets to drain on SIGTERM\n"
        "  replicas: 2    # serving replicas; within [minReplicas, maxReplicas] while autoscaling is on\n"
        "  rollout:    # how a new revision (a change of model or runtime) replaces the running one\n"
        "    strategy: Canary    # shift traffic step by step, checked against the stable revision\n"
        "    analysis:    # defaults of every analysis step: measured in Prometheus, canary vs stable\n"
        "      windowSeconds: 60    # metric window of each measurement\n"
        "      intervalSeconds: 30    # time between measurements\n"
        "      minRequests: 20    # fewer requests in the window: Inconclusive (the rollout pauses, never passes)\n"
        "      successfulRuns: 2    # passing measurements needed to continue\n"
        "      failureLimit: 2    # consecutive failing measurements that abort: stable takes all traffic back\n"
        "      maxErrorRate: 0.02    # canary requests failed (non-2xx or aborted) over ended ones\n"
        "      maxTTFTP95Ratio: 1.5    # canary TTFT p95 at most 1.5x the stable's in the same window\n"
        "    canary:\n"
        "      maxSurge: 25%    # extra replicas allowed while both revisions run\n"
        "      steps:    # run in order; `digital-worker promote|abort|pause|resume " + answers.name + "` steer it\n"
        "        - setWeight: 10    # 10% of traffic to the new revision (by replica ratio on the Service)\n"
        "        - pause: {duration: 2m}    # wait; `pause: {}` waits for `digital-worker promote`\n"
        "        - analysis: {}    # measure with the settings above (fields here override them)\n"
        "        - setWeight: 50\n"
        "        - analysis: {maxErrorRate: 0.01}\n"
        "        # after the last step the new revision takes all traffic and the old one goes\n"
        "  autoscaling:    # forecast-driven, with a reactive safety net\n"
        "    mode: DryRun    # Off: spec.replicas rules; DryRun: decide and report (WouldScale Events); Auto: act\n"
        "    minReplicas: 1\n"
        "    maxReplicas: 4\n"
        "    intervalSeconds: 20    # how often the autoscaler decides\n"
        "    slo: {ttftP95Seconds: 1.5}    # the latency target capacity is planned for\n"
        "    forecast:\n"
        "      quantile: 0.9    # provision for this upper quantile of the forecast load\n"
        "      seasonality: auto    # auto, none, daily or weekly\n"
        "    reactive:    # scale up at once past these, whatever the forecast says\n"
        "      queueLengthPerReplica: 8    # waiting requests per replica\n"
        "      kvCacheUsage: 0.9    # share of KV cache in use\n"
        "    scaleDown:\n"
        "      stabilizationSeconds: 300    # the load must stay low this long before a replica goes\n"
        "      maxStepReplicas: 1    # replicas removed per decision\n"
        "  fallback:    # circuit breaker: a backup model takes the traffic while the primary is unhealthy\n"
        "    model: {name: qwen2.5-1.5b, source: \"hf://Qwen/Qwen2.5-1.5B-Instruct\"}\n"
        "    replicas: 1\n"
        "    errorRateThreshold: 0.5    # primary error rate that trips the breaker\n"
        "    unhealthySeconds: 60    # how long the primary must stay bad before traffic moves\n"
    )


def render_manifest(answers: Answers, template: str, filename: str) -> str:
    if template not in TEMPLATES:
        raise ScaffoldError(f"template must be one of {', '.join(TEMPLATES)} (got {template!r})")
    return render_minimal(answers, filename) if template == "minimal" else render_full(answers, filename)


# ---- the stack config ----------------------------------------------------------------------------

def render_stack_config(answers: Answers, manifest_file: str) -> str:
    project = "digital-worker"
    head = (
        f"# Pulumi stack {answers.stack!r} (written by `digital-worker init`); keys: README.md (\"Deploying with Pulumi\").\n"
        f"#   check: digital-worker stacks check Pulumi.{answers.stack}.yaml\n"
        f"#   up:    pulumi stack init {answers.stack} && pulumi up\n"
    )
    if answers.stack == "onprem":
        head += "#          pulumi config set --secret sshPrivateKey < ~/.ssh/id_ed25519   (before `pulumi up`)\n"
    head += f"config:\n  {project}:target: {answers.stack}\n"
    if answers.stack == "existing":
        body = (
            "  # A kubeconfig path (or its text); omit it to use KUBECONFIG / ~/.kube/config.\n"
            f"  {project}:kubeconfig: {_scalar(answers.kubeconfig)}\n"
            + (f"  {project}:context: {_scalar(answers.context)}\n" if answers.context
               else f"  # {project}:context: gpu-prod    # a kubeconfig context other than the current one\n")
        )
        prometheus = ("    mode: auto    # PodMonitors if the Prometheus Operator is there, else Prometheus via Helm\n"
                      "    # url: http://prometheus-operated.monitoring.svc:9090    # the Prometheus the operator queries\n")
        device_plugin = "    devicePlugin: false    # true if the cluster lacks the NVIDIA device plugin\n"
    elif answers.stack == "onprem":
        trust = (f"        hostKey: {_scalar(answers.host_key)}\n" if answers.host_key else
                 "        # hostKey: ssh-ed25519 AAAA...    # paste the verified key and drop acceptUnknownHostKeys\n")
        body = (
            f"  # {project}:sshPrivateKey: (secret: set with the command above)\n"
            f"  {project}:onprem:\n"
            "    installToolkit: true    # install nvidia-container-toolkit where it is missing\n"
            + ("    acceptUnknownHostKeys: true    # trust the first key seen and pin it (verify it soon)\n"
               if answers.accept_unknown_host_keys else
               "    acceptUnknownHostKeys: false    # never trust a host key nobody checked\n")
            + "    k3s:\n"
            "      defaultRuntime: nvidia    # containerd runs every pod with the NVIDIA runtime\n"
            "      # version: v1.31.4+k3s1    # pin k3s (default: the installer's stable channel)\n"
            "    hosts:    # the first host runs the k3s server; add more GPU hosts below it\n"
            "      - name: gpu-01\n"
            f"        address: {_scalar(answers.host_address)}\n"
            f"        user: {_scalar(answers.host_user)}    # needs passwordless sudo\n"
            + trust
        )
        prometheus = "    mode: helm    # Prometheus via Helm in the cluster\n"
        device_plugin = ""
    else:  # aws
        region = answers.region
        body = (
            f"  {project}:aws:\n"
            f"    region: {_scalar(region)}\n"
            "    clusterName: digital-worker\n"
            "    kubernetesVersion: \"1.31\"\n"
            f"    availabilityZones: [{region}a, {region}b]    # EKS needs at least two\n"
            "    systemInstanceTypes: [m6i.large]    # nodes for the operator, Prometheus and system pods\n"
            "    systemNodes: 2\n"
            "    gpuNodeGroups:    # one GPU model per group: node labels follow it\n"
            "      - name: gpu\n"
            f"        instanceTypes: [{_scalar(answers.instance_type)}]\n"
            "        capacityType: ON_DEMAND    # or SPOT\n"
            "        minSize: 0\n"
            "        desiredSize: 1\n"
            "        maxSize: 4\n"
        )
        prometheus = "    mode: helm    # Prometheus via Helm in the cluster\n"
        device_plugin = ""
    return (
        head + body
        + f"  {project}:platform:    # the CRD, the operator, the GPU node agents\n"
        "    namespace: digital-worker-system\n"
        "    operatorReplicas: 1    # one active operator (kopf peering guards against a second)\n"
        + device_plugin
        + f"  {project}:prometheus:\n" + prometheus
        + f"  # DigitalWorkers: `kubectl apply -f {manifest_file}` once `pulumi up` is done, or list them under\n"
        f"  # {project}:workers (then Pulumi owns them).\n"
    )


# ---- checks and writing --------------------------------------------------------------------------

def validate_manifest_text(text: str) -> list[str]:
    """The operator's own validation (schema defaults, bounds, CEL rules) of a manifest's text."""
    from digital_worker.operator import spec

    body = yaml.safe_load(text)
    return spec.validate(body)


def validate_stack_text(text: str, base_dir: Path) -> tuple[list[str], str | None]:
    """(problems, note): parsed as the stacks program does; a note instead when the stacks extra is missing."""
    document = yaml.safe_load(text) or {}
    try:
        from digital_worker.stacks import config
    except ImportError as exc:
        return [], f"stack config not checked (the stacks extra is not installed: {exc.name})"
    values: dict[str, Any] = {}
    for key, value in (document.get("config") or {}).items():
        if key.startswith(f"{config.PROJECT}:"):
            values[key.split(":", 1)[1]] = value
    try:
        config.parse(values, base_dir=base_dir, require_secrets=False)
    except ImportError as exc:  # onprem/aws parts import pulumi
        return [], f"stack config not fully checked (missing {exc.name}: pip install 'digital-worker[stacks]')"
    except config.ConfigError as exc:
        return [str(exc)], None
    return [], None


@dataclass(frozen=True)
class Written:
    manifest: Path
    stack_config: Path
    notes: tuple[str, ...]


def scaffold(answers: Answers, *, template: str, output_dir: Path, force: bool = False) -> Written:
    """Render, check, then write both files (neither is written if either exists without `force`)."""
    manifest_path = output_dir / f"{answers.name}.yaml"
    stack_path = output_dir / f"Pulumi.{answers.stack}.yaml"
    existing = [str(path) for path in (manifest_path, stack_path) if path.exists()]
    if existing and not force:
        raise ScaffoldError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                            "nothing written (--force overwrites)")
    manifest = render_manifest(answers, template, manifest_path.name)
    problems = validate_manifest_text(manifest)
    if problems:  # the answers were checked one by one; this guards the templates themselves
        raise ScaffoldError("the manifest would not validate: " + "; ".join(problems))
    stack = render_stack_config(answers, manifest_path.name)
    stack_problems, note = validate_stack_text(stack, output_dir.resolve())
    if stack_problems:
        raise ScaffoldError(f"the stack config would not load: {'; '.join(stack_problems)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(manifest)
    stack_path.write_text(stack)
    return Written(manifest_path, stack_path, (note,) if note else ())
