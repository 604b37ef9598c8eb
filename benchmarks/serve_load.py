"""The load test of `ffclip serve`: concurrent clients on 127.0.0.1 against the real service on Ray Serve.

For each server (batching across requests or one request at a time, on 1 and 2 replicas) it sends a bounded number of
edits from N clients, each client waiting for its answer before sending the next, and reports throughput, p50/p99
latency, the batch sizes the server achieved and the errors. Then it sends a burst of simultaneous edits to the
batching server and checks that every answer is 200, 429 or 503 and that the service is still healthy afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ffclip.atomic import atomic_file
from ffclip.errors import FfclipError, InputError, summarize
from ffclip.stages import StageSources

from ffclip.benchmarks.machine import machine_info
from ffclip.benchmarks.timing import percentile

PROMPTS = ("a red circle", "a blue square", "a small green triangle", "a large yellow star")


@dataclass(frozen=True)
class Plan:
    """What the load test sends."""

    requests: int = 48
    clients: int = 8
    burst: int = 200
    replicas: tuple[int, ...] = (1, 2)
    max_batch: int = 8
    queue: int = 32
    port: int = 8123


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict[str, str], float]:
    """(status, headers with lower-case names, seconds) of one POST of a JSON body."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            r.read()
            return r.status, {k.lower(): v for k, v in r.headers.items()}, time.perf_counter() - start
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, {k.lower(): v for k, v in e.headers.items()}, time.perf_counter() - start
    except (urllib.error.URLError, OSError):
        return 0, {}, time.perf_counter() - start  # no answer at all: counted as an error


def _body(i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}


def drive(url: str, requests: int, clients: int) -> dict[str, Any]:
    """`requests` edits from `clients` clients that each wait for an answer before sending again."""
    todo = iter(range(requests))
    results: list[tuple[int, dict, float]] = []

    def client() -> None:
        for i in todo:  # the iterator is shared: each index is taken by exactly one client
            results.append(_post(url + "/v1/edit", _body(i)))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    ok = [(h, s) for code, h, s in results if code == 200]
    batches = [int(h.get("x-ffclip-batch-size", 0)) for h, _ in ok]
    latencies = [s * 1000 for _, s in ok]
    return {
        "requests": requests, "clients": clients, "ok": len(ok), "errors": len(results) - len(ok),
        "seconds": round(wall, 2), "req_per_s": round(len(ok) / wall, 2),
        "p50_ms": round(percentile(latencies, 50)) if latencies else None,
        "p99_ms": round(percentile(latencies, 99)) if latencies else None,
        "mean_batch": round(sum(batches) / len(batches), 2) if batches else None,
        "max_batch_seen": max(batches, default=None),
    }


def burst(url: str, count: int) -> dict[str, Any]:
    """`count` edits sent at once; the status codes, and whether /healthz answers afterwards."""
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda i: _post(url + "/v1/edit", _body(i)), range(count)))
    codes = Counter(code for code, _, _ in answers)
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=60) as r:
            healthy = r.status == 200
    except (urllib.error.URLError, OSError):
        healthy = False
    retry_after = all("retry-after" in h for code, h, _ in answers if code in (429, 503))
    return {"sent": count, "codes": dict(sorted(codes.items())), "only_200_429_503": set(codes) <= {200, 429, 503},
            "retry_after_on_every_refusal": retry_after, "healthz_after": healthy}


def run_load(sources: StageSources, artifacts: Path | None, backend: str, plan: Plan, out: Path,
             say: Callable[[str], None], expected_sha256: str | None = None) -> dict[str, Any]:
    """Start Ray on this machine, measure every server of `plan` (on `artifacts` pinned by `expected_sha256` when
    given), write results.json and results.md to `out`."""
    try:
        import ray
        from ray import serve

        from ffclip.serve.app import build_app
        from ffclip.serve.editor import ServeConfig
    except ImportError:
        raise InputError("the serve load test needs Ray Serve: pip install 'ffclip[serve]'") from None

    cores = os.cpu_count() or 1
    base = ServeConfig(sources=sources, artifacts=artifacts, expected_sha256=expected_sha256, backend=backend,
                       max_batch=plan.max_batch, queue=plan.queue)
    url = f"http://127.0.0.1:{plan.port}"
    rows, flood = [], None
    started, machine = time.time(), machine_info(torch.device("cpu"))
    try:
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as exc:  # Ray raises plain Exception when its node does not come up in time
        raise FfclipError(f"cannot start Ray ({summarize(exc)}); retry on a less loaded machine") from None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": plan.port})
        for replicas in plan.replicas:
            for batching in (True, False):
                threads = max(1, cores // replicas)
                config = replace(base, replicas=replicas, max_batch=plan.max_batch if batching else 1,
                                 num_cpus=min(1.0, cores / replicas), threads=threads)
                name = f"{'batching' if batching else 'one at a time'}, {replicas} replica(s)"
                say(f"starting the server: {name}")
                serve.run(build_app(config), name="ffclip", route_prefix="/")
                drive(url, plan.clients, plan.clients)  # warm-up: one edit per client
                say(f"measuring {plan.requests} edits from {plan.clients} clients: {name}")
                row = {"server": name, "replicas": replicas, "max_batch": config.max_batch, "threads": threads,
                       **drive(url, plan.requests, plan.clients)}
                rows.append(row)
                say(f"  {row['req_per_s']} req/s, p99 {row['p99_ms']} ms, errors {row['errors']}")
                if batching and replicas == plan.replicas[0]:
                    say(f"sending {plan.burst} edits at once")
                    flood = {"server": name, **burst(url, plan.burst)}
                serve.delete("ffclip")
    finally:
        serve.shutdown()
        ray.shutdown()
    results = {
        "created": dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "served": str(artifacts) if artifacts else f"{sources.preset} preset (checkpoints where given)",
        "plan": {**asdict(plan), "replicas": list(plan.replicas)},
        "machine": {**machine, "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
        "burst": flood,
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    with atomic_file(out / "results.md") as tmp:
        tmp.write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """The load test's tables in Markdown."""
    m = results["machine"]
    lines = [f"Served: {results['served']}. Machine: {m['cpu']}, {m['cpu_cores_logical']} logical cores; load average "
             f"{m['load_average'][0]} at the start, {m['load_average_end'][0]} at the end.", "","| server | replicas | max batch | threads/replica | req/s | p50 ms | p99 ms | mean batch | max batch "
             "| errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['server']} | {r['replicas']} | {r['max_batch']} | {r['threads']} | {r['req_per_s']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} | {r['max_batch_seen']} | {r['errors']} |")
    b = results["burst"]
    if b:
        codes = ", ".join(f"{n} x {code}" for code, n in b["codes"].items())
        lines += ["", f"{b['sent']} simultaneous edits ({b['server']}): {codes}; Retry-After on every refusal: "
                      f"{'yes' if b['retry_after_on_every_refusal'] else 'no'}; /healthz afterwards: "
                      f"{'200' if b['healthz_after'] else 'no answer'}."]
    return "\n".join(lines) + "\n"
