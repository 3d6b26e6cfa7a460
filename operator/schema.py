"""The DigitalWorker API: one Python source of truth for the CRD, its OpenAPI v3 schema and CEL rules.

`crd_manifest()` is what `digital-worker crd` prints and what the stacks deploy; `spec.py`
(`validate`, `normalize_spec`) checks objects against the very same schema (including evaluating
the same CEL rules), because objects can reach the operator without admission (the emulated API
enforces nothing, and objects stored before a CRD upgrade were never checked against the new rules).
"""
from __future__ import annotations

from typing import Any

from digital_worker.runtime.contract import ALLOWED_EXTRA_ARGS, DEFAULT_IMAGE, DEFAULT_PORT

from .autoscaling.spec import DEFAULTS as AUTOSCALING_DEFAULTS, MODES as AUTOSCALING_MODES, SEASONALITIES

GROUP = "digitalworker.io"
VERSION = "v1alpha1"
KIND = "DigitalWorker"
PLURAL = "digitalworkers"
SINGULAR = "digitalworker"
SHORT_NAMES = ["dw"]
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

# Labels and annotations the operator puts on what it owns.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_REVISION = f"{GROUP}/revision"
LABEL_WORKER = f"{GROUP}/instance"
LABEL_ROLE = f"{GROUP}/role"
LABEL_GPU_TYPE = f"{GROUP}/gpu-type"
APP_NAME = "digital-worker"

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


# --- small builders, so the schema below reads like the API it describes -----------------------

def _obj(properties: dict[str, Any], *, required: list[str] | None = None, description: str = "",
         rules: list[tuple[str, str]] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if description:
        schema["description"] = description
    if rules:
        schema["x-kubernetes-validations"] = [{"rule": rule, "message": message} for rule, message in rules]
    schema.update(extra)
    return schema


def _str(description: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": description} if description else {}), **kw}


def _int(description: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "integer", **({"description": description} if description else {}), **kw}


def _num(description: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "number", **({"description": description} if description else {}), **kw}


def _bool(description: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "boolean", **({"description": description} if description else {}), **kw}


def _arr(items: dict[str, Any], description: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **({"description": description} if description else {}), **kw}


def _int_or_percent(description: str, default: str) -> dict[str, Any]:
    # `pattern` holds for the string form and `minimum` for the integer form (JSON Schema keywords
    # apply to their own type only, on the API server as in spec.py).
    return {"x-kubernetes-int-or-string": True, "description": description, "default": default,
            "pattern": r"^[0-9]+%?$", "minimum": 0}


def _secret_ref(description: str) -> dict[str, Any]:
    return _obj({"name": _str(pattern=DNS_LABEL_PATTERN.replace("([-a-z0-9]*", "([-.a-z0-9]*"), maxLength=253),
                 "key": _str(minLength=1, maxLength=253)},
                required=["name", "key"], description=description)


MODEL_SOURCE_PATTERN = r"^(hf://[^/\s]+/[^\s]+|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?)$"

QUANTIZATIONS = ["fp8", "awq", "awq_marlin", "gptq", "gptq_marlin", "marlin", "bitsandbytes", "gguf",
                 "modelopt", "modelopt_fp4", "w8a8_int8", "w8a8_fp8", "compressed-tensors", "mxfp4"]


def model_schema(description: str) -> dict[str, Any]:
    return _obj(
        {
            "name": _str("Model name served to clients (OpenAI `model` field).",
                         pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", maxLength=128),
            "source": _str("Where the weights come from: hf://org/repo, s3://bucket/prefix or pvc://claim/path.",
                           pattern=MODEL_SOURCE_PATTERN, maxLength=1024),
            "revision": _str("Source revision (branch, tag or commit for hf://).", default="main", maxLength=128),
            "quantization": _str("SGLang --quantization.", enum=QUANTIZATIONS),
            "contextLength": _int("SGLang --context-length (tokens).", minimum=256, maximum=10_485_760),
            "hfTokenSecretRef": _secret_ref("Secret key holding a Hugging Face token for gated hf:// models."),
        },
        required=["name", "source"],
        description=description,
    )


EXTRA_ARGS_RULE = (
    "self.all(a, !a.startsWith('--') || ["
    + ", ".join(f"'{flag}'" for flag in sorted(ALLOWED_EXTRA_ARGS))
    + "].exists(f, a == f || a.startsWith(f + '=')))"
)

RUNTIME_SCHEMA = _obj(
    {
        "image": _str("SGLang runtime image (the one `digital-worker runtime image build` makes).",
                      default=DEFAULT_IMAGE, minLength=1, maxLength=512),
        "imagePullPolicy": _str(enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"),
        "tensorParallelSize": _int("SGLang --tp-size.", minimum=1, maximum=64, default=1),
        "dataParallelSize": _int("SGLang --dp-size.", minimum=1, maximum=64, default=1),
        "gpusPerReplica": _int("nvidia.com/gpu per replica.", minimum=1, maximum=64, default=1),
        "gpuType": _str("Value of the node label digitalworker.io/gpu-type to schedule on.",
                        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", maxLength=63),
        "memFractionStatic": _num("SGLang --mem-fraction-static.", minimum=0.1, maximum=0.99),
        "maxRunningRequests": _int("SGLang --max-running-requests.", minimum=1, maximum=65536),
        "chunkedPrefillSize": _int("SGLang --chunked-prefill-size.", minimum=-1, maximum=1_048_576),
        "dtype": _str(enum=["auto", "half", "float16", "bfloat16", "float", "float32"], default="auto"),
        "kvCacheDtype": _str(enum=["auto", "fp8_e5m2", "fp8_e4m3", "bf16", "bfloat16"], default="auto"),
        "logLevel": _str(enum=["debug", "info", "warning", "error"], default="info"),
        "port": _int(minimum=1024, maximum=65535, default=DEFAULT_PORT),
        "extraArgs": _arr(_str(maxLength=1024), "Extra SGLang flags, from an allow-list.", maxItems=64,
                          **{"x-kubernetes-validations": [{
                              "rule": EXTRA_ARGS_RULE,
                              "message": "extraArgs may only use allow-listed SGLang flags"}]}),
        "apiKeySecretRef": _secret_ref("Secret key holding the API key clients must present."),
        "env": _arr(_obj({"name": _str(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", maxLength=256),
                          "value": _str(maxLength=32768)}, required=["name"]), maxItems=64),
        "resources": _obj({"cpu": _str(pattern=QUANTITY_PATTERN), "memory": _str(pattern=QUANTITY_PATTERN)},
                          description="CPU and memory requests (and memory limit) per replica."),
        "shmSize": _str("Size of /dev/shm (NCCL needs it for tensor parallelism).", pattern=QUANTITY_PATTERN,
                        default="16Gi"),
        "modelCacheSize": _str("Size limit of the model cache volume.", pattern=QUANTITY_PATTERN, default="200Gi"),
        "terminationGracePeriodSeconds": _int("Time SGLang gets to drain on SIGTERM.", minimum=10,
                                              maximum=3600, default=180),
        "startupTimeoutSeconds": _int("How long model download and load may take before the pod is restarted.",
                                      minimum=60, maximum=14400, default=1800),
        "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
        "tolerations": _arr({"type": "object", "x-kubernetes-preserve-unknown-fields": True}, maxItems=32),
    },
    description="How each replica runs.",
    rules=[("self.gpusPerReplica % (self.tensorParallelSize * self.dataParallelSize) == 0",
            "gpusPerReplica must be a multiple of tensorParallelSize x dataParallelSize")],
)

# Every key `AnalysisSpec.from_dict` reads (analysis.py `_SPEC_KEYS`): a key missing here is
# rejected by the operator's validation and pruned by a real API server (tests check both lists agree).
ANALYSIS_FIELDS: dict[str, Any] = {
    "windowSeconds": _int("Metric window of each measurement.", minimum=10, maximum=3600),
    "intervalSeconds": _int("Time between measurements.", minimum=5, maximum=3600),
    "minRequests": _int("Fewer requests in the window make a measurement Inconclusive.", minimum=0),
    "successfulRuns": _int("Successful measurements needed to pass.", minimum=1, maximum=100),
    "failureLimit": _int("Consecutive failed measurements that abort the rollout.", minimum=1, maximum=100),
    "inconclusiveLimit": _int("Consecutive inconclusive measurements that pause for a human.",
                              minimum=1, maximum=100),
    "initialDelaySeconds": _num("Delay before the first measurement (default: one interval).",
                                minimum=0, maximum=3600),
    "maxErrorRate": _num("Failed over ended requests: aborted ones plus non-2xx answers to POSTs.",
                         minimum=0, maximum=1),
    "errorRateConfidence": _num("Judge maxErrorRate by a one-sided Wilson bound at this confidence "
                                "(Inconclusive until the requests tell either way).", minimum=0.5, maximum=0.999),
    "maxHTTPErrorRate": _num("Non-2xx share of the POST responses in SGLang's sglang:http_responses_total.",
                             minimum=0, maximum=1),
    "maxTTFTP95Seconds": _num(minimum=0),
    "maxITLP95Seconds": _num(minimum=0),
    "maxE2EP95Seconds": _num(minimum=0),
    "maxQueueLength": _num(minimum=0),
    "maxKVUsage": _num("Highest KV-cache usage of any canary replica in the window.", minimum=0, maximum=1),
    "maxTTFTP95Ratio": _num("Canary TTFT p95 over stable's, same window.", minimum=1),
    "maxITLP95Ratio": _num(minimum=1),
    "maxE2EP95Ratio": _num(minimum=1),
    "maxErrorRateRatio": _num(minimum=1),
    "latencyRatioConfidence": _num("Judge the latency ratios by confidence bounds of both p95s at this "
                                   "confidence (Inconclusive until the requests tell either way).",
                                   minimum=0.5, maximum=0.999),
}


def analysis_schema(description: str) -> dict[str, Any]:
    return _obj(dict(ANALYSIS_FIELDS), description=description)


CANARY_STEP = _obj(
    {
        "setWeight": _int("Share of traffic (percent) for the new revision.", minimum=0, maximum=100),
        "pause": _obj({"duration": _str("Empty: wait for `digital-worker promote`.", pattern=DURATION_PATTERN)}),
        "analysis": analysis_schema("Run analysis here; fields override spec.rollout.analysis."),
    },
    rules=[("[has(self.setWeight), has(self.pause), has(self.analysis)].filter(x, x).size() == 1",
            "each canary step has exactly one of setWeight, pause, analysis")],
)

ROLLOUT_SCHEMA = _obj(
    {
        "strategy": _str("How a new revision replaces the running one.", enum=["Canary", "BlueGreen"],
                         default="Canary"),
        "analysis": analysis_schema("Default analysis settings and checks for every analysis run."),
        "canary": _obj(
            {
                "steps": _arr(CANARY_STEP, maxItems=32),
                "maxSurge": _int_or_percent("Extra replicas allowed during the rollout.", "25%"),
                "maxUnavailable": _int_or_percent("Replicas allowed below the desired count.", "0"),
                "trafficRouting": _obj({
                    "gatewayAPI": _obj({
                        "httpRoute": _str(pattern=DNS_LABEL_PATTERN, maxLength=63),
                        "parentRef": _obj({"name": _str(maxLength=253), "namespace": _str(maxLength=63),
                                           "sectionName": _str("Listener of the Gateway to attach to.",
                                                               maxLength=253)},
                                          required=["name"]),
                        "hostnames": _arr(_str(maxLength=253), "Hostnames the HTTPRoute matches.", maxItems=16),
                    }, required=["httpRoute", "parentRef"]),
                }, description="Empty: split by replica ratio on the shared Service."),
            },
        ),
        "blueGreen": _obj(
            {
                "previewReplicas": _int("Replicas of the new revision before promotion (default: full size).",
                                        minimum=1),
                "autoPromotionEnabled": _bool(default=True),
                "scaleDownDelaySeconds": _int("Keep the old revision warm this long after promotion.",
                                              minimum=0, maximum=86400, default=300),
                "warmupRequests": _int("Synthetic requests sent to the preview before analysis.",
                                       minimum=0, maximum=1000, default=0),
                "prePromotionAnalysis": analysis_schema("Analysis of the preview before switching traffic."),
                "postPromotionAnalysis": analysis_schema("Analysis after switching traffic."),
            },
        ),
    },
    description="Progressive delivery of new revisions.",
)

AUTOSCALING_SCHEMA = _obj(
    {
        "mode": _str("Off: spec.replicas rules. DryRun: decide and report only. Auto: act.",
                     enum=list(AUTOSCALING_MODES), default=AUTOSCALING_DEFAULTS.mode),
        "minReplicas": _int(minimum=0, maximum=1000, default=AUTOSCALING_DEFAULTS.min_replicas),
        "maxReplicas": _int(minimum=1, maximum=1000, default=AUTOSCALING_DEFAULTS.max_replicas),
        "scaleToZero": _bool("Allow 0 replicas when idle (next request waits a cold start).",
                             default=AUTOSCALING_DEFAULTS.scale_to_zero),
        "intervalSeconds": _int("How often the autoscaler decides.", minimum=5, maximum=600,
                                default=int(AUTOSCALING_DEFAULTS.interval_seconds)),
        "targetRequestsPerReplica": _num("Starting estimate of req/s one replica sustains within the SLO.",
                                         minimum=0.01),
        "targetPromptTokensPerReplica": _num(
            "Starting estimate of prompt tokens/s one replica prefills within the SLO "
            "(default: targetRequestsPerReplica at the first request mix seen).", minimum=0.01),
        "targetGenerationTokensPerReplica": _num(
            "Starting estimate of generated tokens/s one replica sustains within the SLO "
            "(default: targetRequestsPerReplica at the first request mix seen).", minimum=0.01),
        "coldStartSeconds": _int("Replica cold start (learned from readiness when absent).", minimum=0,
                                 maximum=7200),
        "slo": _obj({"ttftP95Seconds": _num(minimum=0.01, maximum=600),
                     "itlP95Seconds": _num(minimum=0.001, maximum=60)}),
        "forecast": _obj({
            "quantile": _num("Upper prediction quantile provisioned for.", minimum=0.5, maximum=0.999,
                             default=AUTOSCALING_DEFAULTS.forecast.quantile),
            "horizonSeconds": _int("Override the provisioning lead time.", minimum=0, maximum=86400),
            "seasonality": _str(enum=list(SEASONALITIES), default=AUTOSCALING_DEFAULTS.forecast.seasonality),
            "refitIntervalSeconds": _int(minimum=60, maximum=604800,
                                         default=int(AUTOSCALING_DEFAULTS.forecast.refit_interval_seconds)),
        }),
        "reactive": _obj({
            "queueLengthPerReplica": _num(minimum=0),
            "kvCacheUsage": _num(minimum=0, maximum=1),
            "ttftP95Seconds": _num(minimum=0),
        }, description="Thresholds that scale up at once whatever the forecast says."),
        "scaleDown": _obj({
            "stabilizationSeconds": _int(minimum=0, maximum=86400,
                                         default=int(AUTOSCALING_DEFAULTS.scale_down.stabilization_seconds)),
            "maxStepReplicas": _int(minimum=1, maximum=1000, default=AUTOSCALING_DEFAULTS.scale_down.max_step_replicas),
        }),
    },
    description="Forecast-driven autoscaling with a reactive safety net.",
    rules=[("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
           ("self.minReplicas > 0 || self.scaleToZero", "minReplicas 0 needs scaleToZero: true")],
)

FALLBACK_SCHEMA = _obj(
    {
        "model": model_schema("The backup model served while the primary is unhealthy."),
        "replicas": _int(minimum=1, maximum=100, default=1),
        "gpusPerReplica": _int(minimum=1, maximum=64),
        "gpuType": _str("Node label digitalworker.io/gpu-type to schedule the backup on.",
                        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", maxLength=63),
        "errorRateThreshold": _num("Primary error rate that trips the breaker.", minimum=0, maximum=1,
                                   default=0.5),
        "unhealthySeconds": _int("How long the primary must stay bad before traffic moves.", minimum=0,
                                 maximum=3600, default=60),
    },
    required=["model"],
    description="Circuit breaker to a backup model.",
)

SPEC_SCHEMA = _obj(
    {
        "model": model_schema("The model this worker serves."),
        "runtime": RUNTIME_SCHEMA,
        "replicas": _int("Replica count when autoscaling is Off (the scale subresource).", minimum=0,
                         maximum=1000, default=1),
        "rollout": ROLLOUT_SCHEMA,
        "autoscaling": AUTOSCALING_SCHEMA,
        "fallback": FALLBACK_SCHEMA,
        "paused": _bool("Stop reconciling children (status still updates).", default=False),
    },
    required=["model"],
    rules=[("!has(self.autoscaling) || self.autoscaling.mode == 'Off' || "
            "(self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)"
            " || self.replicas == 0 && self.autoscaling.scaleToZero",
            "with autoscaling on, replicas must lie within [minReplicas, maxReplicas]")],
)

CONDITION_SCHEMA = _obj({
    "type": _str(), "status": _str(enum=["True", "False", "Unknown"]), "reason": _str(), "message": _str(),
    "lastTransitionTime": _str(format="date-time"), "observedGeneration": _int(),
}, required=["type", "status"])

# Who sets each status field is said in its description.
STATUS_SCHEMA = _obj(
    {
        "phase": _str("Operator (reconcile): Pending, Progressing, Ready, Degraded.",
                      enum=["Pending", "Progressing", "Ready", "Degraded"]),
        "conditions": _arr(CONDITION_SCHEMA, "Operator (reconcile): Available, Progressing, Degraded."),
        "observedGeneration": _int("Operator (reconcile): the generation this status describes."),
        "currentRevision": _str("Operator (reconcile): hash of the revision the spec asks for."),
        "stableRevision": _str("Operator (reconcile/rollout): the revision that serves by default."),
        "replicas": _int("Operator (reconcile): pods of all revisions (scale subresource)."),
        "readyReplicas": _int("Operator (reconcile): ready pods of all revisions."),
        "desiredReplicas": _int("Operator (reconcile/autoscaler): replicas the worker should have."),
        "selector": _str("Operator (reconcile): label selector of the pods (scale subresource)."),
        "endpoint": _str("Operator (reconcile): in-cluster URL of the stable Service."),
        "message": _str("Operator (reconcile): a one-line human summary."),
        "revisions": _arr({"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                          "Operator (reconcile): each live revision with replicas and ready count."),
        "rollout": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                    "description": "Operator (rollout): phase, step, weight, analysis values and verdicts."},
        "autoscaling": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                        "description": "Operator (autoscaler): mode, desired, forecast, capacity, reason."},
        "fallback": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "description": "Operator (fallback breaker): active, since, reason."},
        "gpuHealth": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                      "description": "Operator (GPU health): replaced pods and tainted nodes."},
    },
)

PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.desiredReplicas"},
    {"name": "Revision", "type": "string", "jsonPath": ".status.currentRevision"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def openapi_schema() -> dict[str, Any]:
    return _obj({
        "apiVersion": _str(), "kind": _str(), "metadata": {"type": "object"},
        "spec": SPEC_SCHEMA, "status": STATUS_SCHEMA,
    }, required=["spec"])


def crd_manifest() -> dict[str, Any]:
    """The CustomResourceDefinition, exactly as `digital-worker crd` prints and the stacks deploy it."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {LABEL_NAME: APP_NAME}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": SINGULAR, "kind": KIND, "shortNames": SHORT_NAMES,
                      "categories": ["all", "ai"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": openapi_schema()},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def crd_yaml() -> str:
    import yaml

    header = "# Generated by `digital-worker crd` from operator/schema.py: do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)
