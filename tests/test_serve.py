"""`ffclip serve` on Ray Serve, over HTTP: edits match the pipeline, bad input gets 400, a flood gets 503 with
Retry-After, metrics count it all, and the web editor works in headless Chromium. One Ray instance serves the module."""

import io
import os
import json
import socket
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from export_fixtures import TINY
from PIL import Image

from ffclip.checkpoints.bundle import save_module
from ffclip.cli.options import StageSources
from ffclip.factory import build_preset
from ffclip.imaging import to_uint8
from ffclip.pipeline import EditPipeline
from ffclip.serve.editor import ServeConfig
from ffclip.serve.requests import DEFAULT_TRUNCATION

ray = pytest.importorskip("ray", reason="the serve extra (ray[serve]) is not installed")
serve = pytest.importorskip("ray.serve")
MAX_BATCH, QUEUE = 4, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The tiny stages as bundle files, served the way `ffclip serve --generator/--mapper/--clip` serves them."""
    folder = tmp_path_factory.mktemp("serve")
    text, mapper, generator = build_preset(TINY)
    paths = [save_module(folder / f"{name}.safetensors", module)
             for name, module in (("generator", generator), ("mapper", mapper), ("clip", text))]
    return StageSources(*paths, clip_model=None, preset=_default_preset())


def _default_preset() -> str:
    from ffclip.serve.cli import serve as command

    return next(p.default for p in command.params if p.name == "preset")


@pytest.fixture(scope="module")
def pipeline(bundles):
    return EditPipeline(*bundles.load("cpu"))


@pytest.fixture(scope="module")
def url(bundles):
    from ffclip.serve.app import build_app

    port = _free_port()
    options = dict(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.init(**options)
    except Exception:  # Ray's node gives up after 30 s when the machine is heavily loaded: try once more
        ray.shutdown()
        ray.init(**options)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(sources=bundles, max_batch=MAX_BATCH, queue=QUEUE, num_cpus=0.5)
        serve.run(build_app(config), name="ffclip", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        ray.shutdown()  # stops every process of this local instance, Serve's included


def call(url: str, path: str, body=None) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body) of a GET, or of a POST when `body` is given."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def picture(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy())


def levels(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


def test_healthz_and_page(url):
    code, _, body = call(url, "/healthz")
    assert code == 200
    info = json.loads(body)
    assert info["status"] == "ok" and info["resolution"] == TINY.generator.resolution
    code, headers, page = call(url, "/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert b'id="prompt"' in page and b'id="strength"' in page


def test_edit_is_the_pipelines_picture_and_repeats_exactly(url, pipeline):
    body = {"prompt": "a red circle", "seed": 5, "strength": 0.8}
    code, headers, png = call(url, "/v1/edit", body)
    assert code == 200 and headers["content-type"] == "image/png", png
    assert call(url, "/v1/edit", body)[2] == png
    w = pipeline.sample_latents(1, 5, DEFAULT_TRUNCATION)
    assert levels(picture(png), pipeline.edit(w, ["a red circle"], strength=0.8)[0]) <= 1

    # the same latents sent as numbers give the same picture; strength 0 is the original
    code, _, by_latents = call(url, "/v1/edit", {"prompt": "a red circle", "latents": w[0].tolist(), "strength": 0.8})
    assert code == 200 and levels(picture(by_latents), picture(png)) == 0
    code, _, original = call(url, "/v1/edit", {"prompt": "a red circle", "seed": 5, "strength": 0})
    assert code == 200 and levels(picture(original), to_uint8(pipeline.synthesize(w))[0]) <= 1
    code, _, broadcast = call(url, "/v1/edit", {"prompt": "a red circle", "latents": w[0, 0].tolist()})
    assert code == 200
    expected = pipeline.edit(w[:, :1].expand(-1, pipeline.num_ws, -1), ["a red circle"])[0]
    assert levels(picture(broadcast), expected) <= 1


def test_encode_and_invert(url, pipeline):
    code, _, body = call(url, "/v1/encode", {"prompts": ["a red circle", "a blue square"]})
    assert code == 200
    got = torch.tensor(json.loads(body)["embeddings"])
    assert torch.allclose(got, pipeline.encode_text(["a red circle", "a blue square"]), atol=1e-5)
    code, _, body = call(url, "/v1/invert", {"image": "..."})
    assert code == 501 and "no inversion encoder" in json.loads(body)["error"]


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not JSON"),
    ([1, 2], "JSON object"),
    ({"prompt": "", "seed": 1}, "non-empty"),
    ({"prompt": "x"}, "exactly one of"),
    ({"prompt": "x", "seed": 1, "latents": [0.0] * 512}, "exactly one of"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "latents": [[0.0] * 512] * 3}, "shape [3, 512]"),
    ({"prompt": "x", "latents": [[0.0, "a"]]}, "latents"),
    (b'{"prompt": "x", "latents": [NaN' + b", 0" * 511 + b"]}", "NaN"),
    ({"prompt": "x", "seed": 1, "strength": "strong"}, "strength"),
    ({"prompt": "x", "seed": 1, "sede": 2}, "unknown field"),
])
def test_bad_input_is_400_with_one_line(url, body, fragment):
    code, headers, answer = call(url, "/v1/edit", body)
    assert code == 400 and headers["content-type"] == "application/json", answer
    error = json.loads(answer)["error"]
    assert fragment in error and "\n" not in error
    assert call(url, "/healthz")[0] == 200


def test_a_flood_gets_503_with_retry_after_and_batches_form(url, pipeline):
    bodies = [{"prompt": f"shape {i % 3}", "seed": i} for i in range(60)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: call(url, "/v1/edit", b), bodies))
    codes = [code for code, _, _ in answers]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    assert all(int(h["retry-after"]) >= 1 for code, h, _ in answers if code == 503)
    batches = [int(h["x-ffclip-batch-size"]) for code, h, _ in answers if code == 200]
    assert max(batches) > 1 and max(batches) <= MAX_BATCH
    # pictures made in a batch are within one level of the same edit made alone
    for body, (code, _, png) in zip(bodies, answers):
        if code == 200:
            w = pipeline.sample_latents(1, body["seed"], DEFAULT_TRUNCATION)
            assert levels(picture(png), pipeline.edit(w, [body["prompt"]])[0]) <= 1
    assert call(url, "/healthz")[0] == 200
    assert call(url, "/v1/edit", {"prompt": "after", "seed": 1})[0] == 200


def test_metrics_count_requests_latency_batches_and_queue(url):
    from prometheus_client.parser import text_string_to_metric_families

    call(url, "/v1/edit", {"prompt": "counted", "seed": 2})
    call(url, "/v1/edit", b"nope")
    code, headers, text = call(url, "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert samples[("ffclip_requests_total", (("code", "200"), ("endpoint", "edit")))] >= 1
    assert samples[("ffclip_requests_total", (("code", "400"), ("endpoint", "edit")))] >= 1
    assert samples[("ffclip_request_seconds_count", (("endpoint", "edit"),))] >= 2
    assert samples[("ffclip_batch_size_count", ())] >= 1
    assert samples[("ffclip_queue_depth", ())] == 0


def test_batch_runner_merges_what_waits_and_keeps_order():
    import asyncio
    import threading

    from ffclip.serve.editor import BatchRunner

    release, calls = threading.Event(), []

    def work(items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(10)
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    async def scenario():
        runner = BatchRunner(work, max_batch=3)
        first = runner.submit(["a"])
        await asyncio.sleep(0.05)  # "a" is running; the next five wait and go in calls of at most 3
        later = runner.submit(["b", "c"]) + runner.submit(["d", "e", "f"])
        release.set()
        done = await asyncio.gather(*first, *later)
        failed = await asyncio.gather(*runner.submit(["bad"]), return_exceptions=True)
        return done, failed

    done, failed = asyncio.run(scenario())
    assert calls == [["a"], ["b", "c", "d"], ["e", "f"], ["bad"]]
    assert done == [("A", 1), ("B", 3), ("C", 3), ("D", 3), ("E", 2), ("F", 2)]
    assert isinstance(failed[0], ValueError)


def test_load_test_driver_counts_answers_and_batches(url):
    from ffclip.benchmarks.serve_load import drive

    row = drive(url, requests=6, clients=3)
    assert row["ok"] == 6 and row["errors"] == 0
    assert 1 <= row["mean_batch"] <= row["max_batch_seen"] <= MAX_BATCH and row["p50_ms"] <= row["p99_ms"]


def serve_cli(monkeypatch, capsys, *args: str) -> str:
    """The last line `ffclip serve ARGS` writes to stderr, checked to be a one-line user error (exit status 2)."""
    from ffclip.cli import main

    monkeypatch.setattr(sys, "argv", ["ffclip", "serve", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_cli_refuses_a_busy_port_and_mixed_sources_in_one_line(monkeypatch, capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        line = serve_cli(monkeypatch, capsys, "--port", str(s.getsockname()[1]))
    assert line.startswith("ffclip: error: cannot listen on 127.0.0.1")
    (tmp_path / "g.pt").write_bytes(b"")
    line = serve_cli(monkeypatch, capsys, "--artifacts", str(tmp_path), "--generator", str(tmp_path / "g.pt"))
    assert line.startswith("ffclip: error: --generator/--mapper/--clip do not apply with --artifacts")


CHROMIUM = "/usr/bin/chromium"
PIXELS = """(selector) => {
    const img = document.querySelector(selector);
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const context = canvas.getContext("2d");
    context.drawImage(img, 0, 0);
    return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
}"""


def shown(page, selector: str) -> torch.Tensor:
    """The RGB pixels of the picture an <img> shows, as uint8 [R, R, 3]."""
    rgba = torch.tensor(page.evaluate(PIXELS, selector), dtype=torch.uint8)
    side = int((rgba.numel() // 4) ** 0.5)
    return rgba.reshape(side, side, 4)[..., :3]


def test_web_editor_in_headless_chromium(url, pipeline):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the serve extra) is not installed")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: `make install` could not install the Debian chromium package")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('about').textContent.startsWith('Serving')")
            assert page.get_attribute("#edited", "src") is None

            page.fill("#prompt", "a red circle")
            page.fill("#seed", "3")
            page.click("#edit")
            page.wait_for_function("document.querySelectorAll('#history li').length === 1", timeout=30_000)
            w = pipeline.sample_latents(1, 3, DEFAULT_TRUNCATION)
            first, original = shown(page, "#edited"), shown(page, "#original")
            assert levels(first, pipeline.edit(w, ["a red circle"])[0]) <= 1
            assert levels(original, to_uint8(pipeline.synthesize(w))[0]) <= 1
            assert levels(first, original) > 1

            page.fill("#prompt", "a blue square")
            page.eval_on_selector("#strength", "(s) => { s.value = '0.5'; s.dispatchEvent(new Event('input')); }")
            page.click("#edit")
            page.wait_for_function("document.querySelectorAll('#history li').length === 2", timeout=30_000)
            second = shown(page, "#edited")
            assert levels(second, pipeline.edit(w, ["a blue square"], strength=0.5)[0]) <= 1
            assert levels(second, first) > 1
            assert page.inner_text("#history li:first-child").startswith("a blue square")
            assert page.inner_text("#status") == "done"
        finally:
            browser.close()
