"""The simulated SGLang server, driven by real HTTP clients (openai, aiohttp) and scraped by a real
Prometheus."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request

import aiohttp
import openai
import pytest

from dwtest_support import free_port, wait_http
from digital_worker.runtime.contract import SGLANG_VERSION
from digital_worker.runtime.sglang_metrics import METRICS
from digital_worker.runtime.sim import SimConfig, SimulatedSGLang

pytestmark = pytest.mark.timeout(120)


def client_for(server: SimulatedSGLang, api_key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=30)


async def get(server: SimulatedSGLang, path: str, **kwargs) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + path, **kwargs) as response:
            return response.status, await response.text()


async def post_json(server: SimulatedSGLang, path: str, payload: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json=payload) as response:
            return response.status, await response.json()


def sample_value(exposition: str, name: str, **labels: str) -> float:
    """The value of one sample in a text exposition (labels must all match)."""
    for line in exposition.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in exposition")


async def test_openai_chat_and_completions_non_streaming():
    async with SimulatedSGLang(SimConfig(model_name="assistant", seed=1)) as server:
        client = client_for(server)
        chat = await client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "Summarise the report. " * 20}], max_tokens=12)
        assert chat.choices[0].finish_reason == "length"
        assert len(chat.choices[0].message.content.split()) == 12
        assert chat.usage.completion_tokens == 12 and chat.usage.prompt_tokens > 100
        completion = await client.completions.create(model="assistant", prompt="Once upon a time", max_tokens=5)
        assert completion.choices[0].text.split() == ["the", "digital", "worker", "answers", "your"]
        models = await client.models.list()
        assert [model.id for model in models.data] == ["assistant"]
        await client.close()


async def test_streaming_delivers_tokens_one_by_one_with_usage():
    config = SimConfig(model_name="assistant", gpu_type="nvidia-l4")  # ~60 ms per decode step
    async with SimulatedSGLang(config) as server:
        client = client_for(server)
        stream = await client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True})
        arrivals, pieces, usage = [], [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    arrivals.append(time.monotonic())
                    pieces.append(choice.delta.content)
        assert len(pieces) == 8 and usage.completion_tokens == 8
        gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
        # Tokens arrive one decode step apart (L4 profile: ~59 ms), not in one burst.
        assert statistics.median(gaps) > 0.03
        completion = await client.completions.create(model="assistant", prompt="x", max_tokens=3, stream=True)
        texts = [chunk.choices[0].text async for chunk in completion if chunk.choices]
        assert "".join(texts).split() == ["the", "digital", "worker"]
        await client.close()


async def test_info_endpoints_show_revision_but_no_secret():
    config = SimConfig(model_name="assistant", revision="rev-7", api_key="sk-secret-42", gpu_type="a100")
    async with SimulatedSGLang(config) as server:
        headers = {"Authorization": "Bearer sk-secret-42"}
        status, body = await get(server, "/get_server_info", headers=headers)
        assert status == 200 and "sk-secret-42" not in body
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(server.url + "/get_server_info") as response:
                info = await response.json()
            async with session.get(server.url + "/model_info") as response:
                model_info = await response.json()
            async with session.get(server.url + "/get_model_info") as response:
                assert await response.json() == model_info
        assert info["revision"] == "rev-7" and info["version"] == SGLANG_VERSION
        assert info["digital_worker"]["gpu_profile"] == "nvidia-a100-80gb"
        assert model_info["served_model_name"] == "assistant" and model_info["is_generation"] is True


async def test_api_key_is_enforced_except_on_probes_and_metrics():
    async with SimulatedSGLang(SimConfig(model_name="m", api_key="sk-1")) as server:
        with pytest.raises(openai.AuthenticationError):
            await client_for(server, "wrong").models.list()
        assert (await client_for(server, "sk-1").models.list()).data[0].id == "m"
        assert (await get(server, "/health"))[0] == 200
        assert (await get(server, "/metrics"))[0] == 200
        assert (await get(server, "/get_server_info"))[0] == 401


async def test_unknown_model_and_overlong_prompt_are_openai_errors():
    async with SimulatedSGLang(SimConfig(model_name="m", context_length=64)) as server:
        client = client_for(server)
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError, match="context length"):
            await client.completions.create(model="m", prompt="word " * 200, max_tokens=1)
        await client.close()


async def test_cold_start_then_ready():
    async with SimulatedSGLang(SimConfig(model_name="m", cold_start_seconds=0.6)) as server:
        assert (await get(server, "/health"))[0] == 503
        assert (await get(server, "/health_generate"))[0] == 503
        with pytest.raises(openai.APIStatusError) as error:
            await client_for(server).completions.create(model="m", prompt="x", max_tokens=1)
        assert error.value.status_code == 503
        await asyncio.sleep(0.7)
        assert (await get(server, "/health"))[0] == 200
        # Slow start injected at run time: back to warming up.
        status, faults = await post_json(server, "/admin/faults", {"cold_start_seconds": 5})
        assert status == 200 and (await get(server, "/health"))[0] == 503


async def test_error_rate_fault_fails_requests_as_sglangs_scheduler_would():
    async with SimulatedSGLang(SimConfig(model_name="m", seed=3)) as server:
        client = client_for(server)
        await post_json(server, "/admin/faults", {"error_rate": 1.0})
        with pytest.raises(openai.InternalServerError):
            await client.completions.create(model="m", prompt="x", max_tokens=1)
        await post_json(server, "/admin/faults", {"error_rate": 0.5})
        outcomes = []
        for _ in range(40):
            try:
                await client.completions.create(model="m", prompt="x", max_tokens=1)
                outcomes.append(True)
            except openai.InternalServerError:
                outcomes.append(False)
        assert 8 <= outcomes.count(False) <= 32
        _, exposition = await get(server, "/metrics")
        # As SGLang counts a request its scheduler fails: finished, not aborted (that is for clients
        # gone); the HTTP middleware shows them as 500 responses of their route.
        assert "sglang:num_aborted_requests_total{" not in exposition
        assert sample_value(exposition, "sglang:num_requests_total") == 41
        route = {"endpoint": "/v1/completions", "method": "POST"}
        assert sample_value(exposition, "sglang:http_responses_total", status_code="500", **route) == 1 + outcomes.count(False)
        assert sample_value(exposition, "sglang:http_responses_total", status_code="200", **route) == outcomes.count(True)
        assert sample_value(exposition, "sglang:http_requests_total", **route) == 41
        await client.close()


async def stream_lines(server: SimulatedSGLang, path: str, body: dict) -> tuple[int, list[str]]:
    """A streaming POST: its HTTP status and its SSE data lines."""
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + path, json={**body, "stream": True}) as response:
            lines = [line.decode().strip() async for line in response.content]
            return response.status, [line[len("data: "):] for line in lines if line.startswith("data: ")]


async def test_a_stream_the_scheduler_fails_answers_200_with_an_sse_error_as_sglang_does():
    """SGLang's serving_chat sends the headers with the scheduler's first output: a failure there
    arrives as an error event inside a 200 stream, and its metrics count a finished request with a
    200 response. Only the client can tell. Without streaming the same failure is an HTTP 500."""
    async with SimulatedSGLang(SimConfig(model_name="m", seed=3)) as server:
        await post_json(server, "/admin/faults", {"error_rate": 1.0})
        chat = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        status, events = await stream_lines(server, "/v1/chat/completions", chat)
        assert status == 200
        assert events[-1] == "[DONE]" and len(events) == 2
        assert json.loads(events[0]) == {"error": {
            "object": "error", "message": "Injected failure (digital-worker simulator)",
            "type": "INTERNAL_SERVER_ERROR", "param": None, "code": 500}}
        status, events = await stream_lines(server, "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 2})
        assert status == 200 and json.loads(events[0])["error"]["code"] == 500 and events[-1] == "[DONE]"
        # Not streaming: SGLang raises it as an HTTPException, whose handler types the body by code.
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/chat/completions", json=chat) as response:
                assert response.status == 500
                assert (await response.json())["type"] == "500"
        _, exposition = await get(server, "/metrics")
    chat_route = {"endpoint": "/v1/chat/completions", "method": "POST"}
    assert sample_value(exposition, "sglang:http_responses_total", status_code="200", **chat_route) == 1
    assert sample_value(exposition, "sglang:http_responses_total", status_code="500", **chat_route) == 1
    assert sample_value(exposition, "sglang:num_requests_total", is_streaming="true") == 2
    assert sample_value(exposition, "sglang:num_requests_total", is_streaming="false") == 1
    assert "sglang:num_aborted_requests_total{" not in exposition


async def test_a_stream_larger_than_the_kv_cache_ends_with_a_bad_request_event():
    async with SimulatedSGLang(SimConfig(model_name="m", max_total_tokens=100, context_length=4096)) as server:
        status, events = await stream_lines(server, "/v1/completions",
                                            {"model": "m", "prompt": "abcd" * 80, "max_tokens": 50})
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[0])["error"]
    assert (error["code"], error["type"]) == (400, "BAD_REQUEST") and "KV cache" in error["message"]


async def test_http_metrics_count_routes_and_statuses_as_sglang_does():
    async with SimulatedSGLang(SimConfig(model_name="m", api_key="sk-1")) as server:
        client = client_for(server, "sk-1")
        stream = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True)
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="other", prompt="x", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            await client_for(server, "wrong").models.list()
        assert (await get(server, "/health"))[0] == 200
        assert (await get(server, "/no/such/path"))[0] == 401  # the key check comes first, as in SGLang
        _, exposition = await get(server, "/metrics")
        await client.close()
    responses = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
                 if line.startswith("sglang:http_responses_total{")}
    assert responses == {
        'sglang:http_responses_total{endpoint="/v1/chat/completions",method="POST",status_code="200"}': 1.0,
        'sglang:http_responses_total{endpoint="/v1/completions",method="POST",status_code="404"}': 1.0,
        'sglang:http_responses_total{endpoint="/health",method="GET",status_code="200"}': 1.0,
    }  # refused keys never reach the metrics middleware; the scrape itself is still being answered
    assert sample_value(exposition, "sglang:http_requests_active", endpoint="/metrics", method="GET") == 1


async def test_latency_factor_slows_every_step():
    async with SimulatedSGLang(SimConfig(model_name="m", gpu_type="l4")) as server:
        client = client_for(server)

        async def duration() -> float:
            start = time.monotonic()
            await client.completions.create(model="m", prompt="x", max_tokens=6)
            return time.monotonic() - start

        normal = await duration()
        status, faults = await post_json(server, "/admin/faults", {"latency_factor": 3.0})
        assert status == 200 and faults["latency_factor"] == 3.0
        slowed = await duration()
        assert slowed > 2.0 * normal
        await client.close()


async def test_hang_fault_times_out_health_and_requests_until_lifted():
    async with SimulatedSGLang(SimConfig(model_name="m", health_check_timeout=0.3)) as server:
        await post_json(server, "/admin/faults", {"hang": True})
        start = time.monotonic()
        assert (await get(server, "/health"))[0] == 503
        assert time.monotonic() - start >= 0.3
        request = asyncio.ensure_future(client_for(server).completions.create(model="m", prompt="x", max_tokens=1))
        await asyncio.sleep(0.3)
        assert not request.done()  # accepted, never answered
        await post_json(server, "/admin/faults", {"hang": False})
        result = await asyncio.wait_for(request, 10)
        assert result.choices[0].text == "the"
        assert (await get(server, "/health"))[0] == 200


async def test_crash_fault_stops_listening():
    server = SimulatedSGLang(SimConfig(model_name="m"))
    await server.start()
    try:
        status, body = await post_json(server, "/admin/faults", {"crash": True})
        assert status == 200 and body["crash"] is True
        await asyncio.wait_for(server.crashed.wait(), 5)
        with pytest.raises(aiohttp.ClientConnectionError):
            await get(server, "/health")
    finally:
        await server.stop()


async def test_stop_ends_the_engine_even_just_after_it_was_woken():
    # A pod deleted under load: the engine driver is woken (a new request, a fault change) in the
    # same loop turns as stop() cancels it. On Python 3.11 asyncio.wait_for swallowed that cancel
    # and stop() waited forever, freezing the emulated cluster's pod simulator (a CI failure).
    async def generating(server: SimulatedSGLang) -> None:
        async for _ in server.generate(100, 1000, streaming=False):
            pass

    for turns in range(4):
        server = SimulatedSGLang(SimConfig(model_name="m"))
        await server.start()
        server.set_faults(latency_factor=1000.0)  # steps of seconds: the driver sleeps between them
        busy = asyncio.ensure_future(generating(server))
        await asyncio.sleep(0.1)
        server.set_faults(latency_factor=1000.0)  # wakes the driver
        for _ in range(turns):
            await asyncio.sleep(0)
        stopping = asyncio.ensure_future(server.stop())
        stopped, _ = await asyncio.wait({stopping}, timeout=5)  # wait_for would cancel stop() on timeout
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        assert stopped, f"stop() still waiting on the engine 5 s after a wake {turns} loop turn(s) before it"
        await stopping


async def test_stop_with_a_grace_period_drains_like_sglang_on_sigterm():
    server = SimulatedSGLang(SimConfig(model_name="m"))
    await server.start()
    server.set_faults(latency_factor=20.0)  # a request of 50 tokens now takes about a second
    client = client_for(server)
    running = asyncio.ensure_future(client.completions.create(model="m", prompt="x", max_tokens=50))
    await asyncio.sleep(0.2)
    assert not running.done()
    started = time.monotonic()
    stopping = asyncio.ensure_future(server.stop(grace_seconds=60))
    await asyncio.sleep(0.1)
    assert (await get(server, "/health"))[0] == 503  # out of the Service's endpoints
    result = await running  # the request in the engine runs to completion
    assert result.usage.completion_tokens == 50
    await asyncio.wait_for(stopping, 10)
    assert time.monotonic() - started < 10  # exits once drained, not at the end of the grace period
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(server, "/health")


async def test_a_hung_server_does_not_drain():
    server = SimulatedSGLang(SimConfig(model_name="m"))
    await server.start()
    await post_json(server, "/admin/faults", {"hang": True})
    hung = asyncio.ensure_future(client_for(server).completions.create(model="m", prompt="x", max_tokens=1))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await asyncio.wait_for(server.stop(grace_seconds=60), 10)  # SGLang exits at once when unhealthy
    assert time.monotonic() - started < 5
    assert isinstance((await asyncio.gather(hung, return_exceptions=True))[0], openai.APIError)


async def test_bad_fault_is_rejected():
    async with SimulatedSGLang(SimConfig(model_name="m")) as server:
        status, body = await post_json(server, "/admin/faults", {"error_rate": 2})
        assert status == 400 and "error_rate" in body["error"]
        status, body = await post_json(server, "/admin/faults", {"explode": True})
        assert status == 400 and "explode" in body["error"]


async def test_ttft_grows_with_load_and_queue_builds():
    # A small replica (4 running requests) so that a burst of 24 must queue.
    config = SimConfig(model_name="m", gpu_type="l4", max_running_requests=4)
    async with SimulatedSGLang(config) as server:
        client = client_for(server)

        async def ttft() -> float:
            start = time.monotonic()
            stream = await client.completions.create(model="m", prompt="p " * 200, max_tokens=4, stream=True)
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.monotonic() - start
            return first

        alone = await ttft()
        burst = asyncio.gather(*(ttft() for _ in range(24)))
        most_queued = most_running = 0.0
        while not burst.done():  # watch the gauges while the burst drains
            _, exposition = await get(server, "/metrics")
            most_queued = max(most_queued, sample_value(exposition, "sglang:num_queue_reqs"))
            most_running = max(most_running, sample_value(exposition, "sglang:num_running_reqs"))
            await asyncio.sleep(0.05)
        loaded = await burst
        assert most_running == 4 and most_queued >= 10
        assert statistics.median(loaded) > 3 * alone
        assert max(loaded) > 5 * alone
        await client.close()


async def test_many_servers_in_one_process_have_separate_metrics():
    servers = [SimulatedSGLang(SimConfig(model_name=f"m{i}")) for i in range(20)]
    await asyncio.gather(*(server.start() for server in servers))
    try:
        assert len({server.port for server in servers}) == 20
        await client_for(servers[3]).completions.create(model="m3", prompt="x", max_tokens=2)
        _, three = await get(servers[3], "/metrics")
        _, four = await get(servers[4], "/metrics")
        assert sample_value(three, "sglang:num_requests_total", is_streaming="false") == 1
        assert 'model_name="m3"' in three and "m3" not in four
        assert "sglang:num_requests_total{" not in four  # no request, no labelled child yet
    finally:
        await asyncio.gather(*(server.stop() for server in servers))


async def test_metrics_exposition_has_sglang_names_types_and_buckets():
    async with SimulatedSGLang(SimConfig(model_name="m")) as server:
        await client_for(server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=3)
        _, exposition = await get(server, "/metrics")
    for spec in METRICS:
        assert f"# TYPE {spec.name} {spec.kind}" in exposition.replace(
            f"# TYPE {spec.name.removesuffix('_total')} counter", f"# TYPE {spec.name} counter")
    assert 'sglang:time_to_first_token_seconds_bucket{engine_type="unified",is_streaming="false",le="0.1",model_name="m"}' in exposition
    assert 'sglang:num_running_reqs{engine_type="unified",model_name="m",moe_ep_rank="0",pp_rank="0",tp_rank="0"}' in exposition
    assert sample_value(exposition, "sglang:generation_tokens_total", is_streaming="false") == 3
    assert sample_value(exposition, "sglang:inter_token_latency_seconds_count") == 2  # 3 tokens, 2 gaps


async def test_prometheus_scrapes_the_simulator(prometheus):
    async with SimulatedSGLang(SimConfig(model_name="assistant")) as server:
        prometheus.set_targets("sglang", [f"127.0.0.1:{server.port}"])
        client = client_for(server)
        for _ in range(3):
            await client.completions.create(model="assistant", prompt="hello", max_tokens=4)
        await client.close()
        # Prometheus asks for OpenMetrics, where prometheus_client writes ':' as '_': accept both.
        total = await asyncio.to_thread(
            prometheus.wait_for, 'sum({__name__=~"sglang[:_]num_requests_total", model_name="assistant"})',
            30, lambda result: float(result[0]["value"][1]) == 3)
        assert float(total[0]["value"][1]) == 3
        quantile = await asyncio.to_thread(
            prometheus.wait_for,
            'histogram_quantile(0.5, sum by (le) ({__name__=~"sglang[:_]time_to_first_token_seconds_bucket"}))', 30)
        assert 0 < float(quantile[0]["value"][1]) <= 0.1
        running = await asyncio.to_thread(
            prometheus.wait_for, '{__name__=~"sglang[:_]num_running_reqs", model_name="assistant"}', 30)
        assert running[0]["metric"]["tp_rank"] == "0"


def test_cli_sim_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {**os.environ, "SIM_KEY": "sk-cli"}
    process = subprocess.Popen(
        [shutil.which("digital-worker"), "runtime", "sim", "--port", str(port), "--model-name", "cli-model",
         "--revision", "r2", "--api-key-env", "SIM_KEY", "--gpu-type", "h100", "--latency-factor", "20"],
        env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0)
        reply = client.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "x"}],
                                               max_tokens=2)
        assert reply.choices[0].message.content == "the digital"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/get_server_info",
                                         headers={"Authorization": "Bearer sk-cli"})
        with urllib.request.urlopen(request, timeout=5) as response:
            info = json.load(response)
        assert info["revision"] == "r2" and info["served_model_name"] == "cli-model"
        assert "sk-cli" not in json.dumps(info)
        # SIGTERM drains as SGLang's does: a request already running completes, then the process exits 0.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(client.completions.create, model="cli-model", prompt="x", max_tokens=40)
            time.sleep(0.5)
            assert not running.done()
            process.send_signal(signal.SIGTERM)
            assert running.result(timeout=30).usage.completion_tokens == 40
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_sim_crash_after_exits_1_and_bad_flags_exit_2():
    port = free_port()
    process = subprocess.run(
        [shutil.which("digital-worker"), "runtime", "sim", "--port", str(port), "--crash-after", "0.5"],
        cwd="/", capture_output=True, text=True, timeout=30)
    assert process.returncode == 1
    bad = subprocess.run([shutil.which("digital-worker"), "runtime", "sim", "--error-rate", "3"],
                         cwd="/", capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "error_rate" in bad.stderr and "Traceback" not in bad.stderr


def test_sim_config_from_launch_config():
    from digital_worker.runtime.contract import LaunchConfig

    launch = LaunchConfig(model_path="/models/q", served_model_name="qwen", port=31000, revision="r5",
                          max_running_requests=32, context_length=4096, chunked_prefill_size=-1)
    config = SimConfig.from_launch_config(launch, gpu_type="l4", port=0)
    assert (config.model_name, config.model_path, config.revision) == ("qwen", "/models/q", "r5")
    assert config.max_running_requests == 32 and config.context_length == 4096
    assert config.chunked_prefill_size == SimConfig().chunked_prefill_size  # -1 (off) keeps the default budget
    assert config.port == 0 and config.gpu_type == "l4"


def test_cli_flag_defaults_are_the_sim_config_defaults():
    import dataclasses

    from digital_worker.runtime import cli

    defaults = {field.name: field.default for field in dataclasses.fields(SimConfig)}
    for name, value in cli._SIM_DEFAULTS.items():
        if name != "port":  # the CLI listens on SGLang's port by default; in-process servers pick a free one
            assert defaults[name] == value, name


def test_cli_sim_takes_the_launch_config(tmp_path):
    port = free_port()
    config = tmp_path / "runtime.json"
    config.write_text(json.dumps({"model_path": "/models/q", "served_model_name": "qwen", "port": port,
                                  "revision": "r9", "max_running_requests": 16}))
    process = subprocess.Popen([shutil.which("digital-worker"), "runtime", "sim", "--launch-config", str(config),
                                "--gpu-type", "l4"], cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/get_server_info", timeout=5) as response:
            info = json.load(response)
        assert info["served_model_name"] == "qwen" and info["revision"] == "r9"
        assert info["max_running_requests"] == 16 and info["digital_worker"]["gpu_profile"] == "nvidia-l4"
        assert info["host"] == "127.0.0.1"  # never the launch config's 0.0.0.0
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


async def test_client_disconnect_frees_the_slot_and_counts_an_abort():
    async with SimulatedSGLang(SimConfig(model_name="m", gpu_type="l4")) as server:
        async with aiohttp.ClientSession() as session:
            response = await session.post(server.url + "/v1/completions",
                                          json={"model": "m", "prompt": "x", "max_tokens": 500, "stream": True})
            await response.content.readline()  # the first token arrived: the request is running
            assert server.engine.num_running == 1
            response.close()  # the user closed the tab
        for _ in range(100):
            if server.engine.num_running == 0:
                break
            await asyncio.sleep(0.02)
        assert server.engine.num_running == 0
        _, exposition = await get(server, "/metrics")
        assert sample_value(exposition, "sglang:num_aborted_requests_total") == 1
        assert "sglang:num_requests_total{" not in exposition  # it never finished
        # The stream had started with 200: SGLang's HTTP metrics count it so.
        assert sample_value(exposition, "sglang:http_responses_total", endpoint="/v1/completions",
                            status_code="200") == 1


async def test_request_larger_than_the_kv_cache_is_refused():
    async with SimulatedSGLang(SimConfig(model_name="m", max_total_tokens=100, context_length=4096)) as server:
        with pytest.raises(openai.BadRequestError, match="KV cache"):
            await client_for(server).completions.create(model="m", prompt="abcd" * 80, max_tokens=50)
