"""The CRD is generated from one Python source; the operator validates with the same schema and CEL."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from digital_worker.operator import schema, spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "examples" / "digitalworker.yaml").read_text())


def test_checked_in_crd_equals_generated():
    checked_in = (REPO / "operator" / "crd" / "digitalworkers.digitalworker.io.yaml").read_text()
    assert checked_in == schema.crd_yaml(), "run: digital-worker crd > operator/crd/digitalworkers.digitalworker.io.yaml"


def test_cli_prints_the_crd():
    out = subprocess.run([sys.executable, "-m", "digital_worker", "crd"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(out.stdout) == schema.crd_manifest()


def test_crd_shape():
    crd = schema.crd_manifest()
    assert crd["metadata"]["name"] == "digitalworkers.digitalworker.io"
    assert crd["spec"]["names"]["shortNames"] == ["dw"]
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == \
        ["Model", "Phase", "Ready", "Desired", "Revision", "Age"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert {"model", "runtime", "replicas", "rollout", "autoscaling", "fallback"} <= set(spec_schema["properties"])
    rules = [r["rule"] for r in spec_schema["properties"]["autoscaling"]["x-kubernetes-validations"]]
    assert "self.minReplicas <= self.maxReplicas" in rules


def test_the_documented_example_is_valid():
    assert spec.validate(EXAMPLE) == []


def test_every_analysis_field_the_operator_reads_is_in_the_crd():
    """A field AnalysisSpec accepts but the CRD lacks is rejected by the operator ("unknown field")
    and silently pruned by a real API server: the user's setting would never reach the analysis."""
    from digital_worker.operator.analysis import _SPEC_KEYS, AnalysisSpec

    assert set(schema.ANALYSIS_FIELDS) == set(_SPEC_KEYS)
    every_field = {
        "windowSeconds": 30, "intervalSeconds": 10, "initialDelaySeconds": 5, "minRequests": 40,
        "successfulRuns": 2, "failureLimit": 2, "inconclusiveLimit": 3,
        "maxErrorRate": 0.05, "errorRateConfidence": 0.9, "maxHTTPErrorRate": 0.01,
        "maxTTFTP95Seconds": 2.0, "maxITLP95Seconds": 0.05, "maxE2EP95Seconds": 30.0,
        "maxQueueLength": 16, "maxKVUsage": 0.95,
        "maxTTFTP95Ratio": 1.5, "maxITLP95Ratio": 1.5, "maxE2EP95Ratio": 2.0, "maxErrorRateRatio": 2.0,
        "latencyRatioConfidence": 0.9,
    }
    assert set(every_field) == set(_SPEC_KEYS)
    body = copy.deepcopy(EXAMPLE)
    body["spec"].setdefault("rollout", {})["analysis"] = dict(every_field)
    body["spec"]["rollout"]["canary"] = {"steps": [{"setWeight": 20}, {"analysis": dict(every_field)}]}
    assert spec.validate(body) == []
    defaulted, _ = spec.normalize_spec(body["spec"])
    for analysis in (defaulted["rollout"]["analysis"], defaulted["rollout"]["canary"]["steps"][1]["analysis"]):
        parsed = AnalysisSpec.from_dict(analysis).to_dict()
        assert {key: parsed[key] for key in every_field} == every_field


def test_every_gateway_api_field_the_router_reads_is_in_the_crd():
    from digital_worker.operator.traffic import router_from_settings

    gateway = {"httpRoute": "chat", "hostnames": ["chat.example.com"],
               "parentRef": {"name": "edge", "namespace": "infra", "sectionName": "https"}}
    body = _with("spec.rollout.canary.trafficRouting", {"gatewayAPI": gateway})
    assert spec.validate(body) == []
    defaulted, _ = spec.normalize_spec(body["spec"])
    router = router_from_settings(defaulted["rollout"]["canary"]["trafficRouting"], namespace="team-a",
                                  stable_service="w", canary_service="w-canary")
    assert router.hostnames == ("chat.example.com",)
    assert (router.parent_ref.name, router.parent_ref.namespace, router.parent_ref.section_name) == \
        ("edge", "infra", "https")


@pytest.mark.parametrize("autoscaling", [
    {},
    {"mode": "Auto", "minReplicas": 2},
    {"mode": "DryRun", "maxReplicas": 3, "forecast": {}, "scaleDown": {}, "slo": {"ttftP95Seconds": 1.5}},
])
def test_autoscaling_reads_the_same_spec_with_or_without_the_api_servers_defaults(autoscaling):
    """The emulator stores specs as given; a real API server fills in the CRD's defaults first.
    The autoscaler must decide the same either way."""
    from digital_worker.operator.autoscaling.spec import parse_spec

    raw = {"model": {"name": "m", "source": "hf://org/repo"}, "replicas": 2, "autoscaling": autoscaling}
    defaulted, problems = spec.normalize_spec(raw)
    assert problems == []
    assert parse_spec(defaulted["autoscaling"]) == parse_spec(autoscaling)


def test_defaults_are_applied_like_the_api_server():
    minimal = {"model": {"name": "m", "source": "hf://org/repo"}}
    defaulted, problems = spec.normalize_spec(minimal)
    assert problems == []
    assert defaulted["replicas"] == 1
    assert defaulted["model"]["revision"] == "main"
    assert "runtime" not in defaulted  # like the API server: only present objects get defaults
    defaulted, _ = spec.normalize_spec({**minimal, "runtime": {}})
    assert defaulted["runtime"]["tensorParallelSize"] == 1
    from digital_worker.runtime.contract import DEFAULT_IMAGE

    assert defaulted["runtime"]["image"] == DEFAULT_IMAGE


def _with(path: str, value):
    body = copy.deepcopy(EXAMPLE)
    node = body
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return body


@pytest.mark.parametrize("path,value,expected", [
    ("spec.runtime.gpusPerReplica", 3, "gpusPerReplica must be a multiple of tensorParallelSize"),
    ("spec.autoscaling.minReplicas", 9, "minReplicas must not exceed maxReplicas"),
    ("spec.runtime.extraArgs", ["--port", "1"], "allow-listed SGLang flags"),
    ("spec.runtime.extraArgs", ["--chunked-prefill-size"], "needs a value"),
    ("spec.model.source", "ftp://x/y", "does not match"),
    ("spec.replicas", -1, "below the minimum"),
    ("spec.replicas", "two", "must be of type integer"),
    ("spec.rollout.strategy", "Rolling", "is not one of"),
    ("spec.rollout.canary.steps", [{"setWeight": 10, "pause": {}}], "exactly one of setWeight, pause, analysis"),
    ("spec.rollout.canary.steps", [{"setWeight": 50}, {"setWeight": 10}], "must not decrease"),
    ("spec.replica", 3, "unknown field"),
    ("spec.runtime.memFractionStatic", 1.5, "above the maximum"),
    ("spec.replicas", 20, "within [minReplicas, maxReplicas]"),
    ("metadata.name", "Not_A_DNS_Label", "metadata.name"),
    # Each of these passed validation and then failed in reconcile, where no user sees it.
    ("spec.rollout.canary.maxSurge", -1, "below the minimum"),
    ("spec.rollout.canary.trafficRouting", {"gatewayAPI": {"httpRoute": "chat"}}, "parentRef: required field"),
    ("spec.fallback", {"model": {"name": "m", "source": "hf://org/m"}, "gpuType": "Bad Value!"}, "does not match"),
])
def test_invalid_specs_are_named_precisely(path, value, expected):
    problems = spec.validate(_with(path, value))
    assert any(expected in p for p in problems), problems


def test_cel_rules_run_on_a_real_cel_engine():
    # The rule strings in the CRD are the ones evaluated: break one and the validator sees it.
    import cel

    rule = schema.RUNTIME_SCHEMA["x-kubernetes-validations"][0]["rule"]
    assert cel.evaluate(rule, {"self": {"gpusPerReplica": 4, "tensorParallelSize": 2, "dataParallelSize": 2}}) is True
    assert cel.evaluate(rule, {"self": {"gpusPerReplica": 4, "tensorParallelSize": 3, "dataParallelSize": 1}}) is False
    extra_rule = schema.RUNTIME_SCHEMA["properties"]["extraArgs"]["x-kubernetes-validations"][0]["rule"]
    assert cel.evaluate(extra_rule, {"self": ["--chunked-prefill-size=8192", "--disable-radix-cache"]}) is True
    assert cel.evaluate(extra_rule, {"self": ["--model-path", "/x"]}) is False


def test_non_object_spec_is_reported_not_raised():
    assert spec.validate({"metadata": {"name": "x"}, "spec": "nope"}) == ["spec: must be an object"]
    assert any("required" in p for p in spec.validate({"metadata": {"name": "x"}, "spec": {}}))
