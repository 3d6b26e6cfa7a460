"""Canary rollouts through the real operator on the emulated API: steps, pauses, promote/abort/retry
through the CLI (annotations), and analysis that cannot measure pausing instead of promoting."""
from __future__ import annotations

import subprocess
import sys

from digital_worker.operator import schema as api
from dwtest_support import example_worker
from operator_support import wait_until


def make(kube, namespace, steps, analysis=None):
    body = example_worker("bot", namespace, replicas=2,
                          rollout={"strategy": "Canary", "canary": {"steps": steps, "maxSurge": 1}})
    if analysis:
        body["spec"]["rollout"]["analysis"] = analysis
    kube.create(body)
    return wait_until(lambda: (s := status(kube, namespace)).get("phase") == "Ready" and s, message="Ready")


def status(kube, namespace):
    return (kube.get(api.API_VERSION, api.PLURAL, namespace, "bot") or {}).get("status") or {}


def rollout(kube, namespace):
    return status(kube, namespace).get("rollout") or {}


def deployments(kube, namespace):
    return {d["metadata"]["labels"][api.LABEL_REVISION]: d for d in
            kube.list("apps/v1", "deployments", namespace, f"{api.LABEL_INSTANCE}=bot")}


def new_revision(kube, namespace):
    kube.patch(api.API_VERSION, api.PLURAL, namespace, "bot", {"spec": {"model": {"revision": "v2"}}})


def cli(cluster, *args):
    return subprocess.run([sys.executable, "-m", "digital_worker", *args, "--kubeconfig", str(cluster.kubeconfig_path)],
                          capture_output=True, text=True, timeout=60)


def reasons(kube, namespace):
    return [e["reason"] for e in kube.list("v1", "events", namespace)]


def test_canary_walks_its_steps_and_becomes_stable(operator, kube, namespace):
    first = make(kube, namespace, [{"setWeight": 50}, {"pause": {"duration": "1s"}}, {"setWeight": 100}])
    new_revision(kube, namespace)
    seen_split = wait_until(lambda: len(deployments(kube, namespace)) == 2 and
                            all(d["spec"]["replicas"] >= 1 for d in deployments(kube, namespace).values()),
                            message="both revisions serve during the canary")
    assert seen_split
    done = wait_until(lambda: (r := rollout(kube, namespace)).get("phase") == "Completed" and status(kube, namespace),
                      timeout=60, message=lambda: rollout(kube, namespace))
    assert done["stableRevision"] == done["currentRevision"] != first["currentRevision"]
    wait_until(lambda: list(deployments(kube, namespace)) == [done["currentRevision"]], message="old revision gone")
    assert deployments(kube, namespace)[done["currentRevision"]]["spec"]["replicas"] == 2
    assert {"RolloutStarted", "RolloutCompleted"} <= set(reasons(kube, namespace))


def test_pause_abort_retry_and_promote_from_the_cli(operator, kube, namespace, cluster):
    first = make(kube, namespace, [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}])
    new_revision(kube, namespace)
    paused = wait_until(lambda: (r := rollout(kube, namespace)).get("phase") == "Paused" and r, timeout=40,
                        message=lambda: rollout(kube, namespace))
    assert paused["step"] == 1 and paused["weight"] == 50
    assert cli(cluster, "abort", "bot", "-n", namespace).returncode == 0
    aborted = wait_until(lambda: (s := status(kube, namespace)).get("phase") == "Degraded" and s, timeout=30,
                         message=lambda: status(kube, namespace))
    assert aborted["rollout"]["phase"] == "Aborted" and aborted["stableRevision"] == first["currentRevision"]
    wait_until(lambda: deployments(kube, namespace)[first["currentRevision"]]["spec"]["replicas"] == 2 and
               deployments(kube, namespace)[aborted["currentRevision"]]["spec"]["replicas"] == 0,
               message="stable takes everything back")
    assert "RolloutAborted" in reasons(kube, namespace)
    # The annotation was consumed: plain kubectl users see a clean object.
    annotations = kube.get(api.API_VERSION, api.PLURAL, namespace, "bot")["metadata"].get("annotations") or {}
    assert "digitalworker.io/abort" not in annotations

    assert cli(cluster, "retry", "bot", "-n", namespace).returncode == 0
    wait_until(lambda: rollout(kube, namespace).get("phase") == "Paused", timeout=40, message="paused again")
    assert cli(cluster, "promote", "bot", "-n", namespace).returncode == 0
    done = wait_until(lambda: (s := status(kube, namespace)).get("rollout", {}).get("phase") == "Completed" and s,
                      timeout=60, message=lambda: rollout(kube, namespace))
    assert done["stableRevision"] == done["currentRevision"] != first["currentRevision"]
    out = cli(cluster, "status", "bot", "-n", namespace)
    assert out.returncode == 0 and "Completed" in out.stdout


def test_analysis_without_metrics_pauses_never_promotes(operator, kube, namespace):
    make(kube, namespace, [{"setWeight": 50}, {"analysis": {}}, {"setWeight": 100}],
         analysis={"intervalSeconds": 5, "windowSeconds": 10, "inconclusiveLimit": 2})
    new_revision(kube, namespace)
    paused = wait_until(lambda: (r := rollout(kube, namespace)).get("phase") == "Paused" and r, timeout=60,
                        message=lambda: rollout(kube, namespace))
    assert paused["step"] == 1 and paused["analysis"]["phase"] == "Paused"
    assert len(deployments(kube, namespace)) == 2  # not promoted: both revisions still there
    conditions = {c["type"]: c for c in status(kube, namespace)["conditions"]}
    assert conditions["Progressing"]["status"] == "False" and conditions["Progressing"]["reason"] == "RolloutPaused"


def test_gateway_api_canary_sets_exact_httproute_weights(operator, kube, namespace):
    """With trafficRouting.gatewayAPI the split is exact: HTTPRoute backend weights over the per-revision
    Services; the stable keeps its full size until the canary takes everything."""
    routing = {"gatewayAPI": {"httpRoute": "bot-route", "parentRef": {"name": "edge", "namespace": "gateways"}}}

    body = example_worker("bot", namespace, replicas=4, fallback=None, rollout={
        "strategy": "Canary", "canary": {"steps": [{"setWeight": 25}, {"pause": {}}, {"setWeight": 100}],
                                         "maxSurge": 1, "trafficRouting": routing}})
    kube.create(body)
    first = wait_until(lambda: (s := status(kube, namespace)).get("phase") == "Ready" and s, message="Ready")

    def route():
        return kube.get("gateway.networking.k8s.io/v1", "httproutes", namespace, "bot-route") or {}

    def weights():
        refs = ((route().get("spec") or {}).get("rules") or [{}])[0].get("backendRefs") or []
        return {ref["name"]: ref["weight"] for ref in refs}

    wait_until(lambda: weights() == {"bot-stable": 100, "bot-canary": 0}, message=lambda: route())
    new_revision(kube, namespace)
    paused = wait_until(lambda: (r := rollout(kube, namespace)).get("phase") == "Paused" and r, timeout=40,
                        message=lambda: rollout(kube, namespace))
    assert weights() == {"bot-stable": 75, "bot-canary": 25} and paused["weight"] == 25 and paused["exact"]
    selectors = {name: kube.get("v1", "services", namespace, name)["spec"]["selector"][api.LABEL_REVISION]
                 for name in ("bot-stable", "bot-canary")}
    assert selectors == {"bot-stable": first["currentRevision"], "bot-canary": paused["revision"]}
    sizes = {rev: d["spec"]["replicas"] for rev, d in deployments(kube, namespace).items()}
    assert sizes == {first["currentRevision"]: 4, paused["revision"]: 1}, "exact weights: the stable stays whole"
    assert route()["spec"]["parentRefs"][0]["name"] == "edge"
    assert cli_promote(kube, namespace)
    done = wait_until(lambda: (s := status(kube, namespace)).get("phase") == "Ready" and
                      s.get("currentRevision") != first["currentRevision"] and s, timeout=40,
                      message=lambda: status(kube, namespace))
    wait_until(lambda: kube.get("v1", "services", namespace, "bot-stable")["spec"]["selector"][api.LABEL_REVISION]
               == done["currentRevision"], message="stable Service follows the promoted revision")
    assert weights() == {"bot-stable": 100, "bot-canary": 0}


def cli_promote(kube, namespace) -> bool:
    kube.patch(api.API_VERSION, api.PLURAL, namespace, "bot",
               {"metadata": {"annotations": {f"{api.GROUP}/promote": "step"}}})
    return True


def test_undo_mid_canary_goes_back_to_the_warm_stable(operator, kube, namespace):
    first = make(kube, namespace, [{"setWeight": 50}, {"pause": {}}, {"setWeight": 100}])
    new_revision(kube, namespace)
    wait_until(lambda: rollout(kube, namespace).get("phase") == "Paused", timeout=40,
               message=lambda: rollout(kube, namespace))
    stable_pods = {p["metadata"]["name"] for p in kube.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}=bot")
                   if p["metadata"]["labels"][api.LABEL_REVISION] == first["currentRevision"]}
    kube.patch(api.API_VERSION, api.PLURAL, namespace, "bot", {"spec": {"model": {"revision": "main"}}})
    back = wait_until(lambda: list(deployments(kube, namespace)) == [first["currentRevision"]] and
                      (s := status(kube, namespace)).get("phase") == "Ready" and s, timeout=20,
                      message=lambda: status(kube, namespace))
    assert back["currentRevision"] == first["currentRevision"]
    still = {p["metadata"]["name"] for p in kube.list("v1", "pods", namespace, f"{api.LABEL_INSTANCE}=bot")}
    assert stable_pods <= still, "the stable's pods kept serving: no cold start"
