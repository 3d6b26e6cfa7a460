"""Metric names a PromQL expression references, without a PromQL parser (Prometheus 2.42 has no
parse endpoint): label matchers, ranges and grouping clauses are cut out first, then what is left
that looks like a name and is not a function, an aggregation or a keyword is a metric name."""
from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "atan2"}
_NAME_MATCHER = re.compile(r'__name__\s*(=~|=)\s*"((?:[^"\\]|\\.)*)"')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?")


def referenced(expr: str) -> tuple[set[str], set[str]]:
    """(plain metric names, `__name__` regexes) used in `expr`."""
    names: set[str] = set()
    regexes: set[str] = set()
    for operator, value in _NAME_MATCHER.findall(expr):
        value = value.encode().decode("unicode_escape")
        (regexes if operator == "=~" else names).add(value)
    stripped = _STRING.sub('""', expr)
    stripped = _BRACES.sub(" ", stripped)
    stripped = _RANGE.sub(" ", stripped)
    stripped = _GROUPING.sub(" ", stripped)
    for name, call in _IDENTIFIER.findall(stripped):
        if call or name in KEYWORDS:
            continue
        names.add(name)
    return names, regexes


def sample_names(exposition: str) -> set[str]:
    """Every sample name an exposition (text format) carries, plus the names a family without
    samples yet would have (a labelled metric before its first use), from its declared type."""
    found: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "summary": ("_count", "_sum", ""), "gauge": ("",), "untyped": ("",)}
    for family in text_string_to_metric_families(exposition):
        found.update(sample.name for sample in family.samples)
        found.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return found


def unknown_names(expr: str, exported: set[str]) -> list[str]:
    """Names in `expr` that nothing exports, and `__name__` regexes that match no exported name."""
    names, regexes = referenced(expr)
    missing = sorted(n for n in names if n not in exported)
    missing += sorted(f"~{r}" for r in regexes if not any(re.fullmatch(r, n) for n in exported))
    return missing
