"""Trace-replay simulator and the `simulate` subcommand, on small slices of the real traces."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from dwtest_support import SHARED_DATA
from digital_worker.operator.autoscaling import simulator
from digital_worker.operator.autoscaling.cli import register

AZURE = SHARED_DATA / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"
TAXI = SHARED_DATA / "nab" / "nyc_taxi.csv"
ELB = SHARED_DATA / "nab" / "elb_request_count_8c0756.csv"


def cli(argv: list[str]) -> int:
    """Our register() on a fresh parser, run the way digital_worker.cli.main runs handlers."""
    from digital_worker.cli import UserError

    parser = argparse.ArgumentParser(prog="digital-worker")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"digital-worker: error: {exc}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def taxi_day():
    config = simulator.SimulationConfig(max_replicas=16)
    workload = simulator.load_workload(TAXI, peak_replicas=10, config=config, sizes_trace=AZURE, replay_days=1.0)
    return workload, config


def test_workloads_are_scaled_to_the_peak(taxi_day):
    workload, config = taxi_day
    fleet = simulator.FleetModel(config.params, workload.sizes, config.slo_ttft_seconds)
    base_peak = np.convolve(workload.rates, np.ones(30) / 30, mode="valid").max()
    assert base_peak == pytest.approx(10 * fleet.slo_capacity, rel=0.1)
    assert workload.duration_seconds == pytest.approx(86400, rel=0.01)
    assert len(workload.history_rates) > 2 * 7 * 96  # three weeks of 15-minute buckets as history
    # Sizes from the Azure conversation trace.
    assert 1100 < workload.sizes.mean_prompt_tokens < 1200 and 200 < workload.sizes.mean_output_tokens < 220
    azure = simulator.load_workload(AZURE, peak_replicas=5, config=config)
    assert azure.duration_seconds == pytest.approx(3500, rel=0.02)


def test_oracle_is_the_floor_and_ours_is_close(taxi_day):
    workload, config = taxi_day
    results = {r.policy: r for r in simulator.compare(
        workload, ["forecast", "oracle", "reactive-hpa-50", "reactive-hpa-90"], config)}
    oracle = results["oracle"]
    assert oracle.slo_attainment >= 0.999
    for result in results.values():
        assert result.gpu_hours >= 0.95 * oracle.gpu_hours
        assert result.requests == oracle.requests
    ours = results["forecast"]
    assert ours.slo_attainment >= 0.99
    assert ours.gpu_hours <= 1.2 * oracle.gpu_hours
    # More headroom costs more GPU-hours: the reactive settings are ordered.
    assert results["reactive-hpa-50"].gpu_hours > results["reactive-hpa-90"].gpu_hours


def test_underprovisioning_shows_as_missed_slo():
    config = simulator.SimulationConfig(max_replicas=3, min_replicas=1)
    workload = simulator.load_workload(TAXI, peak_replicas=6, config=config, sizes_trace=AZURE, replay_days=0.5)
    capped = simulator.compare(workload, ["reactive-hpa-70"], config)[0]
    assert capped.slo_attainment < 0.9
    assert capped.max_replicas <= 3


def test_simulate_cli_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "result.json", tmp_path / "replay.png"
    assert cli(["simulate", "--demand", str(ELB), "--days", "0.5", "--peak-replicas", "8", "--cold-start", "120",
                "--tick", "30", "--seed", "3", "--json", str(out), "--plot", str(png)]) == 0
    table = capsys.readouterr().out
    assert "forecast" in table and "oracle" in table and "SLO attain" in table
    payload = json.loads(out.read_text())
    for key in ("policy", "gpu_hours", "slo_attainment", "requests", "scale_events"):
        assert key in payload and key in payload["oracle"]
    assert payload["policy"] == "forecast" and payload["oracle"]["policy"] == "oracle"
    assert 0 < payload["slo_attainment"] <= 1 and payload["requests"] > 1000
    # The PNG is a real, non-blank image.
    from matplotlib import image

    pixels = image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05


def test_simulate_all_policies_on_the_azure_trace(tmp_path):
    out = tmp_path / "all.json"
    assert cli(["simulate", "--demand", str(AZURE), "--policy", "all", "--peak-replicas", "6",
                "--cold-start", "180", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    names = [row["policy"] for row in rows]
    assert "forecast" in names and "oracle" in names
    for prefix in ("reactive", "keda", "aibrix", "dynamo"):
        assert any(name.startswith(prefix) for name in names), prefix
    assert len({row["requests"] for row in rows}) == 1


def test_simulate_user_errors_are_one_line(tmp_path, capsys):
    assert cli(["simulate", "--demand", str(tmp_path / "missing.csv")]) == 2
    assert capsys.readouterr().err.strip() == f"digital-worker: error: --demand: no such file: {tmp_path / 'missing.csv'}"
    bad = tmp_path / "bad.csv"
    bad.write_text("when,how_many\n1,2\n")
    assert cli(["simulate", "--demand", str(bad)]) == 2
    assert "timestamp,value" in capsys.readouterr().err
    assert cli(["simulate", "--demand", str(ELB), "--tick", "0"]) == 2
    assert "--tick" in capsys.readouterr().err


def test_simulate_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "digital_worker.operator.autoscaling.cli", "simulate", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--peak-replicas" in result.stdout and "--cold-start" in result.stdout


def test_the_project_cli_runs_simulate(monkeypatch, tmp_path, capsys):
    """Through digital_worker.cli.main, as soon as the lead lists our module there."""
    from digital_worker import cli as project_cli

    if "digital_worker.operator.autoscaling.cli" not in project_cli.COMMAND_MODULES:
        monkeypatch.setattr(project_cli, "COMMAND_MODULES",
                            project_cli.COMMAND_MODULES + ("digital_worker.operator.autoscaling.cli",))
    assert project_cli.main(["simulate", "--demand", str(tmp_path / "nope.csv")]) == 2
    assert "--demand: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        project_cli.main(["simulate", "--help"])
    assert exit_info.value.code == 0 and "--policy" in capsys.readouterr().out


def test_our_policy_at_other_quantiles_for_the_frontier(taxi_day):
    workload, config = taxi_day
    fleet = simulator.FleetModel(config.params, workload.sizes, config.slo_ttft_seconds)
    runners = simulator.build_policies(["forecast-q80", "forecast-q99"], fleet, 180.0, 30.0)
    assert [(r.name, r.quantile) for r in runners] == [("forecast-q80", 0.8), ("forecast-q99", 0.99)]
    with pytest.raises(ValueError, match="unknown policy 'forecast-qx'"):
        simulator.build_policies(["forecast-qx"], fleet, 180.0, 30.0)
    with pytest.raises(ValueError, match="between 50 and 99"):
        simulator.build_policies(["forecast-q100"], fleet, 180.0, 30.0)


def test_a_brief_mild_overload_costs_what_the_backlog_costs():
    """Ten seconds at 110% of what two replicas can serve: the backlog grows to about a second's wait by
    the end of that step, so most of its requests still meet a 2 s SLO (requests arriving early wait
    least), and the backlog drains in the next steps. Counting the whole step as missed would make
    every policy but the oracle look worse than it is."""
    from digital_worker.operator.autoscaling.policy import HOLD, Decision

    config = simulator.SimulationConfig(cold_start_seconds=30.0, max_replicas=4)
    sizes = simulator.DEFAULT_SIZES
    fleet_model = simulator.FleetModel(config.params, sizes, config.slo_ttft_seconds)
    rates = np.full(100, 2 * 0.5 * fleet_model.slo_capacity)
    rates[60] = 2 * 1.1 * fleet_model.capacity
    workload = simulator.Workload("burst", 10.0, rates, 0.0, np.zeros(0), 300.0, sizes)

    class TwoReplicas:
        name = "two"

        def initial_state(self):
            return None

        def decide(self, context):
            return Decision(2, HOLD, "fixed"), None

    result = simulator.simulate(workload, simulator.PolicyRunner(TwoReplicas()), config, keep_timeline=True)
    missed = result.timeline["missed"]
    arrivals = rates[60] * 10.0
    assert 0.0 < missed[60] < 0.5 * arrivals
    assert max(missed[:60]) < 0.01 * arrivals
    assert sum(missed[61:]) < 0.5 * arrivals  # the backlog drains within a few steps
    assert result.slo_attainment > 0.99


def test_clairvoyant_splits_ours_from_the_oracle_into_control_and_forecast(taxi_day):
    """Ours fed the true demand per forecast bucket: never cheaper than the oracle, at least as good as
    ours with a forecast, and not part of --policy all (nobody can run it)."""
    workload, config = taxi_day
    results = {r.policy: r for r in simulator.compare(workload, ["forecast", "forecast-clairvoyant", "oracle"], config)}
    known, ours, oracle = results["forecast-clairvoyant"], results["forecast"], results["oracle"]
    assert known.gpu_hours >= 0.95 * oracle.gpu_hours
    assert known.slo_attainment >= 0.99 and known.slo_attainment >= ours.slo_attainment - 0.002
    fleet = simulator.FleetModel(config.params, workload.sizes, config.slo_ttft_seconds)
    assert "forecast-clairvoyant" not in [r.name for r in simulator.build_policies("all", fleet, 180.0, 30.0)]
