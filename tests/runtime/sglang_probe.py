"""Runs inside the SGLang test virtualenv (stdlib + sglang only), driven by test_runtime_sglang_*.py.

  parse    stdin: JSON list of argvs -> stdout: one JSON result per argv, from SGLang's real
           prepare_server_args (error text when the parser refuses it)
  metrics  stdout: JSON {name: {type, labels, buckets}} read from SGLang's metrics_collector.py
           source with ast (importing it needs transformers and a GPU stack)
  flags    stdout: JSON list of every option string SGLang's parser accepts
  all      stdin: {"parse": [argv, ...]} -> stdout: {"parse": [...], "flags": [...], "metrics": {...}}
           (one interpreter start for everything: importing SGLang takes seconds)
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import sys
from pathlib import Path


def parse(argvs: list[list[str]]) -> list[dict]:
    from sglang.srt.server_args import prepare_server_args

    results = []
    for argv in argvs:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = prepare_server_args(argv)
        except SystemExit:
            lines = [line for line in stderr.getvalue().splitlines() if "error:" in line]
            results.append({"ok": False, "error": lines[-1] if lines else stderr.getvalue()[-300:]})
            continue
        except Exception as exc:  # a validation error raised by ServerArgs itself
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        results.append({
            "ok": True,
            "model_path": args.model_path,
            "served_model_name": args.served_model_name,
            "host": args.host,
            "port": args.port,
            "tp_size": args.tp_size,
            "dp_size": args.dp_size,
            "dtype": args.dtype,
            "kv_cache_dtype": args.kv_cache_dtype,
            "mem_fraction_static": args.mem_fraction_static,
            "max_running_requests": args.max_running_requests,
            "context_length": args.context_length,
            "quantization": args.quantization,
            "chunked_prefill_size": args.chunked_prefill_size,
            "enable_metrics": args.enable_metrics,
            "log_level": args.log_level,
            "revision": args.revision,
            "api_key": args.api_key,
        })
    return results


def flags() -> list[str]:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return sorted(opt for action in parser._actions for opt in action.option_strings)


def metrics() -> dict:
    import sglang

    observability = Path(sglang.__file__).parent / "srt" / "observability"
    found: dict[str, dict] = {}
    for source_path in (observability / "metrics_collector.py", observability / "http_request_metrics.py"):
        _collect_metrics(ast.parse(source_path.read_text()), found)
    return found


def _collect_metrics(tree: ast.AST, found: dict[str, dict]) -> None:
    """Every `Gauge/Counter/Histogram(name="sglang:...")` call in the module, by name."""
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        # Default bucket lists assigned inside the same function (`if bucket_x is None: bucket_x = [...]`).
        lists = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Tuple)):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        try:
                            lists[target.id] = ast.literal_eval(node.value)
                        except ValueError:
                            pass
        for node in ast.walk(function):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id not in ("Gauge", "Counter", "Histogram"):
                continue
            keywords = {kw.arg: kw.value for kw in node.keywords}
            name_node = keywords.get("name")
            if not (isinstance(name_node, ast.Constant) and str(name_node.value).startswith("sglang:")):
                continue
            buckets = None
            if "buckets" in keywords:
                value = keywords["buckets"]
                if isinstance(value, ast.Name):
                    buckets = lists.get(value.id)
                else:
                    try:
                        buckets = ast.literal_eval(value)
                    except ValueError:
                        buckets = "dynamic"
            labels = ast.unparse(keywords["labelnames"]) if "labelnames" in keywords else ""
            extra = [elt.value for sub in ast.walk(keywords.get("labelnames", ast.List(elts=[])))
                     if isinstance(sub, ast.List) for elt in sub.elts if isinstance(elt, ast.Constant)]
            found.setdefault(name_node.value, {
                "type": node.func.id.lower(),
                "labels_expr": labels,
                "extra_labels": extra,
                "buckets": buckets,
            })


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "parse":
        print(json.dumps(parse(json.load(sys.stdin))))
    elif mode == "metrics":
        print(json.dumps(metrics()))
    elif mode == "flags":
        print(json.dumps(flags()))
    elif mode == "all":
        request = json.load(sys.stdin)
        print(json.dumps({"parse": parse(request.get("parse", [])), "flags": flags(), "metrics": metrics()}))
    else:
        sys.exit(f"unknown mode {mode}")
