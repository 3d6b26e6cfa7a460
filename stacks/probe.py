"""Looking at an existing cluster before deploying to it (only what changes what we deploy)."""
from __future__ import annotations

import logging
import os
import tempfile

log = logging.getLogger("digital_worker.stacks.probe")

PROMETHEUS_OPERATOR_GROUP = "monitoring.coreos.com"


def api_groups(kubeconfig: str | None = None, context: str | None = None, timeout: float = 5.0) -> set[str]:
    """Names of the API groups the cluster serves (kubeconfig: a path or the file's text; None: the default)."""
    from kubernetes import client, config

    path = kubeconfig
    cleanup = None
    if kubeconfig and not os.path.exists(kubeconfig) and "\n" in kubeconfig:
        handle = tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False)
        handle.write(kubeconfig)
        handle.close()
        path = cleanup = handle.name
    try:
        api_client = config.new_client_from_config(config_file=path, context=context)
        with api_client:
            groups = client.ApisApi(api_client).get_api_versions(_request_timeout=timeout)
        return {group.name for group in groups.groups or []}
    finally:
        if cleanup:
            os.unlink(cleanup)


def has_prometheus_operator(kubeconfig: str | None = None, context: str | None = None) -> bool | None:
    """Whether the Prometheus Operator's CRDs are served; None when the cluster cannot be asked."""
    try:
        return PROMETHEUS_OPERATOR_GROUP in api_groups(kubeconfig, context)
    except Exception as exc:  # no kubeconfig, unreachable, unauthorised: the caller picks a default
        log.warning("cannot list the cluster's API groups (%s: %s)", type(exc).__name__, exc)
        return None
