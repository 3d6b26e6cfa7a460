"""The tour's report: one PNG per chart and a short Markdown summary, from what the tour recorded.

Input is `Tour.dump()` (also written as `tour.json`): samples taken every second from the API
(spec.replicas, status.autoscaling desired/forecast, status.rollout weight) and from the load
generator (offered and answered request rate, TTFT p95), the tour's steps, and the cluster's Events.
Every chart marks the steps (grey) and the Events (coloured) on its time axis.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVENT_COLOURS = {"Scaled": "tab:green", "RolloutStarted": "tab:blue", "AnalysisPassed": "tab:cyan",
                 "RolloutCompleted": "tab:blue", "RolloutAborted": "tab:red"}


def _series(samples: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(s["t"], s[key]) for s in samples if s.get(key) is not None]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _mark(axis, data: dict[str, Any]) -> None:
    for marker in data.get("markers", []):
        if marker["kind"] == "step":
            axis.axvline(marker["at"], color="grey", linestyle=":", linewidth=1)
            axis.annotate(marker["label"], (marker["at"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                          va="top", ha="right", fontsize=7, color="grey")
    labelled: set[str] = set()
    for event in data.get("events", []):
        reason = event.get("reason") or ""
        colour = EVENT_COLOURS.get(reason, "tab:orange" if event.get("type") == "Warning" else None)
        if colour is not None:
            # One legend entry per kind of Event; the other lines of that kind stay unlabelled.
            axis.axvline(event["t"], color=colour, alpha=0.5, linewidth=1,
                         label=None if reason in labelled else f"Event {reason}")
            labelled.add(reason)


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4), dpi=100)
    axis.set_title(title)
    axis.set_xlabel("seconds since the tour started")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    return figure, axis


def _save(figure, axis, data: dict[str, Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    _mark(axis, data)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_charts(data: dict[str, Any], directory: Path) -> list[Path]:
    samples = data.get("samples", [])
    written = []

    figure, axis = _figure("Load: offered (trace) and answered requests", "requests/s")
    axis.plot(*_series(samples, "offered_rate"), label="offered (trace replay)", color="tab:grey")
    axis.plot(*_series(samples, "rate"), label="answered (5 s window)", color="tab:blue")
    axis.plot(*_series(samples, "forecast"), label="forecast (status.autoscaling)", color="tab:purple")
    written.append(_save(figure, axis, data, directory / "load.png"))

    figure, axis = _figure("Demand forecast band vs actual load", "requests/s")
    times, lower = _series(samples, "forecast_lower")
    _, upper = _series(samples, "forecast_upper")
    if times and len(lower) == len(upper):
        axis.fill_between(times, lower, upper, alpha=0.3, color="tab:purple", label="forecast band")
        axis.plot(*_series(samples, "forecast"), color="tab:purple", label="forecast")
    else:
        axis.text(0.5, 0.5, "no forecast yet: the forecaster needs a few 5-minute demand buckets",
                  transform=axis.transAxes, ha="center", color="tab:purple")
    axis.plot(*_series(samples, "rate"), label="actual (answered)", color="tab:blue")
    written.append(_save(figure, axis, data, directory / "forecast.png"))

    figure, axis = _figure("Replicas", "replicas")
    axis.step(*_series(samples, "replicas"), where="post", label="spec.replicas", color="tab:blue")
    axis.step(*_series(samples, "desired"), where="post", label="autoscaler desired", color="tab:purple",
              linestyle="--")
    axis.step(*_series(samples, "ready"), where="post", label="ready", color="tab:green")
    written.append(_save(figure, axis, data, directory / "replicas.png"))

    figure, axis = _figure("TTFT p95 (10 s window, measured by the load generator)", "seconds")
    axis.plot(*_series(samples, "ttft_p95"), label="TTFT p95", color="tab:red")
    written.append(_save(figure, axis, data, directory / "ttft_p95.png"))

    figure, axis = _figure("Rollout: canary weight", "% of traffic to the new revision")
    axis.step(*_series(samples, "canary_weight"), where="post", label="canary weight", color="tab:blue")
    axis.set_ylim(-5, 105)
    written.append(_save(figure, axis, data, directory / "rollout_weights.png"))
    return written


def summary_markdown(data: dict[str, Any], charts: list[Path]) -> str:
    steps = data.get("steps", [])
    outcome = "interrupted" if data.get("interrupted") else \
        "all steps passed" if steps and all(s["ok"] for s in steps) else "some steps failed"
    lines = [
        "# digital-worker dev: tour report", "",
        f"- worker: `{data.get('worker')}`; speed x{data.get('speed')}; load: {data.get('trace')}",
        f"- metrics: {'Prometheus at ' + data['prometheus'] if data.get('prometheus') else 'in-process (no Prometheus)'}",
        f"- outcome: **{outcome}**", "",
        "| step | start (s) | duration (s) | outcome | detail |", "|---|---|---|---|---|",
    ]
    for step in steps:
        verdict = "interrupted" if step.get("interrupted") else "skipped" if step["skipped"] else \
            "ok" if step["ok"] else "FAILED"
        detail = str(step["detail"]).replace("|", "\\|")
        lines.append(f"| {step['title']} | {step['started']:.1f} | {step['finished'] - step['started']:.1f} | "
                     f"{verdict} | {detail} |")
    requests = data.get("requests") or {}
    samples = data.get("samples", [])
    if requests:
        ttft = requests.get("ttft_p95")
        lines += ["", f"Requests sent: {requests['sent']} ({requests['errors']} errors, {requests['dropped']} not "
                      f"sent: no ready replica or the in-flight bound); TTFT p95 over the tour: "
                      f"{'%.3f s' % ttft if ttft is not None else 'n/a'}.", "",
                  "| revision | ok | errors | of which HTTP 5xx | broken connections (replica gone) |",
                  "|---|---|---|---|---|"]
        for revision, counts in sorted(requests.get("by_revision", {}).items()):
            lines.append(f"| {revision} | {counts['ok']} | {counts['error']} | {counts.get('http_5xx', '-')} | "
                         f"{counts.get('broken', '-')} |")
    if samples:
        peak_replicas = max((s.get("replicas") or 0) for s in samples)
        lines += ["", f"Peak replicas: {peak_replicas}."]
    lines += ["", "## Events", ""]
    for event in data.get("events", []):
        lines.append(f"- t={event['t']:.1f}s {event['type']}/{event['reason']}: {event['message']}")
    lines += ["", "## Charts", ""] + [f"![{chart.stem}]({chart.name})" for chart in charts]
    return "\n".join(lines) + "\n"


def write_report(data: dict[str, Any], directory: str | Path) -> list[Path]:
    """tour.json, the charts and summary.md in `directory`; the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tour.json").write_text(json.dumps(data, indent=1, default=str))
    charts = write_charts(data, directory)
    (directory / "summary.md").write_text(summary_markdown(data, charts))
    return [directory / "tour.json", *charts, directory / "summary.md"]
