"""The service on Ray Serve: a gateway that speaks HTTP and an editor deployment of N replicas that batches edits.

The gateway checks every request before it is queued, so bad input costs no editor time, and keeps the metrics of the
whole service in one place. Each editor replica runs batches of up to `max_batch` edits gathered across clients
(`serve.batch`); the gateway may queue at most `queue` edits beyond those the replicas hold, and answers 503 with
`Retry-After` past that.
"""

import asyncio
import json
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..errors import InputError, summarize
from .editor import BatchRunner, Editor, EditRequest, ServeConfig
from .metrics import CONTENT_TYPE, Metrics
from .requests import parse_edit, parse_prompts

MAX_BODY_BYTES = 2 << 20
GATEWAY_MAX_ONGOING = 1024
GATEWAY_MAX_QUEUED = 256

api = FastAPI(title="ffclip", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
class EditorReplica:
    """One `Editor`; edits from all callers are gathered into batches (`serve.batch`), run one batch at a time."""

    def __init__(self, config: ServeConfig):
        self.editor = Editor(config)
        self._gather.set_max_batch_size(config.max_batch)
        self._gather.set_batch_wait_timeout_s(config.batch_wait_s)
        self.runner = BatchRunner(self.editor.edit, config.max_batch)

    def info(self) -> dict:
        return self.editor.info()

    async def encode(self, prompts: list[str]) -> list[list[float]]:
        return (await asyncio.to_thread(self.editor.encode, prompts)).tolist()

    async def edit(self, request: EditRequest) -> tuple[bytes, int]:
        """The PNG of one edit and the size of the batch it ran in."""
        return await (await self._gather(request))

    # Ray Serve closes a batch a few ms after its first request, even while the previous batch still runs; under
    # load that makes many small batches. They are handed to the runner at once, which merges those that wait.
    @serve.batch
    async def _gather(self, requests: list[EditRequest]) -> list[asyncio.Future]:
        return self.runner.submit(requests)


def _error(code: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=code, headers=headers or None)


async def _json(request: Request):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise InputError(f"the body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not JSON ({summarize(exc)}); send a JSON object") from None


@serve.deployment
@serve.ingress(api)
class Gateway:
    """HTTP in front of the editor replicas: checks input, applies back-pressure, keeps the metrics."""

    def __init__(self, editor: DeploymentHandle, config: ServeConfig):
        self.editor = editor
        self.config = config
        self.metrics = Metrics(config.max_batch)
        self._info: dict | None = None  # what the editor serves, asked once

    async def _editor_info(self) -> dict:
        if self._info is None:
            self._info = await self.editor.info.remote()
        return self._info

    async def _answer(self, endpoint: str, work) -> Response:
        start = time.perf_counter()
        try:
            response = await work()
        except InputError as exc:
            response = _error(400, str(exc))
        except BackPressureError:
            self.metrics.rejected.inc()
            response = _error(503, "the service is busy; retry after the time in Retry-After",
                              **{"Retry-After": str(self.config.retry_after_s)})
        except Exception as exc:  # anything else is the service's fault: one line, and keep serving
            response = _error(500, f"the edit failed: {summarize(exc)}")
        self.metrics.observe(endpoint, response.status_code, time.perf_counter() - start)
        return response

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return await self._answer("healthz", self._healthz)

    async def _healthz(self) -> Response:
        return JSONResponse({"status": "ok", **await self._editor_info()})

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    @api.post("/v1/edit")
    async def edit(self, request: Request) -> Response:
        return await self._answer("edit", lambda: self._edit(request))

    async def _edit(self, request: Request) -> Response:
        info = await self._editor_info()
        edit = parse_edit(await _json(request), info["num_ws"])
        self.metrics.queue_depth.inc()
        try:
            png, batch = await self.editor.edit.remote(edit)
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.batch_size.observe(batch)
        return Response(png, media_type="image/png", headers={"X-Ffclip-Batch-Size": str(batch)})

    @api.post("/v1/encode")
    async def encode(self, request: Request) -> Response:
        return await self._answer("encode", lambda: self._encode(request))

    async def _encode(self, request: Request) -> Response:
        prompts = parse_prompts(await _json(request))
        return JSONResponse({"embeddings": await self.editor.encode.remote(prompts)})

    @api.post("/v1/invert")
    async def invert(self) -> Response:
        return await self._answer("invert", self._invert)

    async def _invert(self) -> Response:
        info = await self._editor_info()
        return _error(501, f"{info['source']} holds no inversion encoder (ffclip exports none yet); "
                           "invert the photo elsewhere, e.g. with e4e, and send its latents to /v1/edit")


def build_app(config: ServeConfig) -> serve.Application:
    """The gateway bound to `config.replicas` editor replicas, ready for `serve.run`."""
    editor = EditorReplica.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.num_cpus},
        max_ongoing_requests=2 * config.max_batch,
        max_queued_requests=config.queue,
    ).bind(config)
    return Gateway.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=GATEWAY_MAX_ONGOING,
        max_queued_requests=GATEWAY_MAX_QUEUED,
        backpressure_config={"status_code": 503, "retry_after_s": config.retry_after_s},
    ).bind(editor, config)
