"""Check a DigitalWorker against the CRD's own schema: structure, bounds, defaults and CEL rules.

The operator cannot trust admission (objects may predate a CRD upgrade, or come through an API
that enforces no schema), so it applies the same schema the API server would: defaults first,
then OpenAPI checks, then the `x-kubernetes-validations` CEL rules, evaluated by a real CEL engine
from the very strings the CRD carries. Semantic checks the schema cannot express come last.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

from digital_worker.operator import schema as api
from digital_worker.runtime.contract import check_extra_args

_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


@functools.lru_cache(maxsize=None)
def _compiled(rule: str):
    import cel  # common-expression-language: the operator extra

    return cel.compile(rule)


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _type_ok(value: Any, expected: str) -> bool:
    if isinstance(value, bool) and expected in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[expected])


def apply_defaults_and_check(value: Any, schema: dict[str, Any], path: str, problems: list[str]) -> Any:
    """Return `value` with schema defaults filled in; append what is wrong to `problems`."""
    if schema.get("x-kubernetes-int-or-string"):
        # No `type`: the number and string checks below each apply to their own form.
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            problems.append(f"{path}: must be an integer or a string")
            return value
    expected = schema.get("type")
    if expected is not None and not _type_ok(value, expected):
        problems.append(f"{path}: must be of type {expected}, got {type(value).__name__}")
        return value
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value} is above the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{path}: must not be shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{path}: must not be longer than {schema['maxLength']}")
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            problems.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{path}: must have at most {schema['maxItems']} items")
        items = schema.get("items", {})
        value = [apply_defaults_and_check(item, items, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if isinstance(value, dict) and not schema.get("x-kubernetes-preserve-unknown-fields"):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        result: dict[str, Any] = {}
        for key, item in value.items():
            if properties is not None and key in properties:
                result[key] = apply_defaults_and_check(item, properties[key], f"{path}.{key}", problems)
            elif additional is not None:
                result[key] = apply_defaults_and_check(item, additional, f"{path}.{key}", problems)
            elif properties is not None:
                problems.append(f"{path}.{key}: unknown field")
            else:
                result[key] = item
        for key, sub in (properties or {}).items():
            if key not in result and "default" in sub:
                result[key] = copy.deepcopy(sub["default"])
        for key in schema.get("required", []):
            if key not in result:
                problems.append(f"{path}.{key}: required field is missing")
        value = result
    # CEL rules run only on values that passed the structural checks below them (as the API server does).
    for rule in schema.get("x-kubernetes-validations", []):
        if any(p.startswith(path) for p in problems):
            break
        try:
            ok = _compiled(rule["rule"]).execute({"self": value})
        except Exception as exc:  # a rule that cannot evaluate is a failed rule, never a crash
            problems.append(f"{path}: {rule['message']} ({exc})")
            continue
        if ok is not True:
            problems.append(f"{path}: {rule['message']}")
    return value


def normalize_spec(spec: Any) -> tuple[dict[str, Any], list[str]]:
    """The spec with defaults applied, and every problem found (empty list: valid)."""
    if not isinstance(spec, dict):
        return {}, ["spec: must be an object"]
    try:
        key = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return _normalize_uncached(spec)
    defaulted_json, problems = _normalize_cached(key)
    return json.loads(defaulted_json), list(problems)


@functools.lru_cache(maxsize=4096)
def _normalize_cached(key: str) -> tuple[str, tuple[str, ...]]:
    # Every reconcile pass checks the spec again; identical specs (most passes) are checked once.
    defaulted, problems = _normalize_uncached(json.loads(key))
    return json.dumps(defaulted), tuple(problems)


def _normalize_uncached(spec: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    defaulted = apply_defaults_and_check(spec, api.SPEC_SCHEMA, "spec", problems)
    if not problems:
        problems += semantic_problems(defaulted)
    return defaulted, problems


def semantic_problems(spec: dict[str, Any]) -> list[str]:
    """Rules the schema cannot say: extra args need their values; canary steps must make sense."""
    problems = [f"spec.runtime.extraArgs: {p}" for p in check_extra_args(spec.get("runtime", {}).get("extraArgs", []))]
    steps = spec.get("rollout", {}).get("canary", {}).get("steps", [])
    weights = [step["setWeight"] for step in steps if "setWeight" in step]
    if weights != sorted(weights):
        problems.append("spec.rollout.canary.steps: setWeight values must not decrease")
    return problems


def validate(body: dict[str, Any]) -> list[str]:
    """Problems with a whole DigitalWorker object (empty list: valid)."""
    problems: list[str] = []
    if body.get("apiVersion", api.API_VERSION) != api.API_VERSION:
        problems.append(f"apiVersion: must be {api.API_VERSION}")
    if body.get("kind", api.KIND) != api.KIND:
        problems.append(f"kind: must be {api.KIND}")
    name = body.get("metadata", {}).get("name", "")
    # Children are named <name>-<10-char revision>; pod names must stay within 63 characters.
    if not re.fullmatch(api.DNS_LABEL_PATTERN, name or "") or len(name) > 40:
        problems.append("metadata.name: must be a DNS label of at most 40 characters")
    _, spec_problems = normalize_spec(body.get("spec"))
    return problems + spec_problems
