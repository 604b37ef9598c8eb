"""The service on Ray Serve: a gateway that speaks HTTP and an editor deployment of N replicas that batches edits.

The gateway checks every request before it is queued, so bad input costs no editor time, and keeps the metrics of the
whole service in one place. Each editor replica runs batches of up to `max_batch` edits gathered across clients
(`serve.batch`); the gateway may queue at most `queue` edits beyond those the replicas hold, and answers 503 with
`Retry-After` past that. Bodies are refused by their declared size before they are read, read only up to the limit,
and only `max_uploads` at once, each within `body_timeout_s`, so slow or huge uploads cannot take every gateway slot.
Every error is `{"error": "..."}` in one line; what went wrong inside goes to the server log.
"""

import asyncio
import html
import logging
import time
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from ..errors import InputError
from .editor import BatchRunner, Editor, EditRequest, ServeConfig
from .metrics import CONTENT_TYPE, Metrics
from .requests import parse_edit, parse_json, parse_prompts

MAX_BODY_BYTES = 2 << 20
GATEWAY_HEADROOM = 64  # gateway slots left for /healthz, /metrics and the page when uploads and edits hold the rest
GATEWAY_MAX_QUEUED = 256
UNSEEN_HEADER = "X-Ffclip-Unseen-Words"
ABOUT_MARK = "<!--about-->"

api = FastAPI(title="ffclip", docs_url=None, redoc_url=None, openapi_url=None)
log = logging.getLogger("ray.serve")


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


class Refusal(Exception):
    """A request answered with `status` and a one-line `message` (and `headers`) instead of being served."""

    def __init__(self, status: int, message: str, **headers: str):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(code: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=code, headers=headers or None)


@api.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods answer in the API's one-line form too."""
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}; the API is GET /healthz, "
                                   "GET /metrics, POST /v1/edit, /v1/encode and /v1/invert")


def _declared_size(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not declared.strip().isdigit():
        raise Refusal(400, "Content-Length is not a number of bytes; send the body's size in bytes")
    return int(declared)


def _too_large(size: str) -> Refusal:
    return Refusal(413, f"the body is {size} bytes; the limit is {MAX_BODY_BYTES}; send a smaller request")


@serve.deployment
@serve.ingress(api)
class Gateway:
    """HTTP in front of the editor replicas: checks input, applies back-pressure, keeps the metrics."""

    def __init__(self, editor: DeploymentHandle, config: ServeConfig):
        self.editor = editor
        self.config = config
        self.metrics = Metrics(config.max_batch)
        self.world_vocabulary = config.world_text_encoder
        self._info: dict | None = None  # what the editor serves, asked once
        self._uploads = 0  # bodies being received now

    async def _editor_info(self) -> dict:
        if self._info is None:
            self._info = await asyncio.wait_for(self.editor.info.remote(), self.config.health_timeout_s)
        return self._info

    async def _json(self, request: Request) -> Any:
        """The request's JSON: refused by its declared size before reading, and while reading past the limit or
        past `body_timeout_s`; at most `max_uploads` bodies are read at once."""
        declared = _declared_size(request)
        if declared is not None and declared > MAX_BODY_BYTES:
            raise _too_large(str(declared))
        if self._uploads >= self.config.max_uploads:
            raise Refusal(503, "too many request bodies are arriving at once; retry after the time in Retry-After",
                          **{"Retry-After": str(self.config.retry_after_s)})
        self._uploads += 1
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        raise _too_large(f"over {MAX_BODY_BYTES}")
                    chunks.append(chunk)
        except TimeoutError:
            raise Refusal(408, f"the body did not arrive within {self.config.body_timeout_s:g} s; send the "
                               "whole body within that time") from None
        finally:
            self._uploads -= 1
        return parse_json(b"".join(chunks))

    async def _answer(self, endpoint: str, work) -> Response:
        start = time.perf_counter()
        try:
            response = await work()
        except Refusal as exc:
            response = _error(exc.status, exc.message, **exc.headers)
        except RayTaskError as exc:  # raised in a replica; its text holds a traceback, so only the cause's line goes out
            log.warning("%s failed in the editor: %s", endpoint, exc)
            if isinstance(exc.cause, InputError):
                response = _error(400, str(exc.cause))
            else:
                response = _error(500, f"the {endpoint} failed in the editor ({type(exc.cause).__name__}); the "
                                       "server log has the details")
        except InputError as exc:
            response = _error(400, str(exc))
        except BackPressureError:
            self.metrics.rejected.inc()
            response = _error(503, "the service is busy; retry after the time in Retry-After",
                              **{"Retry-After": str(self.config.retry_after_s)})
        except TimeoutError:
            log.warning("%s: the editor did not answer in time", endpoint)
            response = _error(504, f"the editor did not answer the {endpoint} in time; retry later")
        except Exception as exc:  # anything else is the service's fault: one line out, the details in the log
            log.exception("%s failed", endpoint)
            response = _error(500, f"the {endpoint} failed ({type(exc).__name__}); the server log has the details")
        self.metrics.observe(endpoint, response.status_code, time.perf_counter() - start)
        return response

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        try:
            info = await self._editor_info()
            about = (f"Serving {html.escape(info['source'])} with the {html.escape(info['backend'])} backend, "
                     f"{info['resolution']} px.")
        except Exception:  # the page still loads; it says why nothing can be edited yet
            log.exception("the editor did not describe itself")
            about = "The editor is not answering yet; reload in a moment."
        page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace(ABOUT_MARK, about))

    @api.get("/healthz")
    async def healthz(self) -> Response:
        return await self._answer("healthz", self._healthz)

    async def _healthz(self) -> Response:
        try:
            info = await asyncio.wait_for(self.editor.info.remote(), self.config.health_timeout_s)
        except TimeoutError:
            raise Refusal(503, f"the editor did not answer within {self.config.health_timeout_s:g} s; edits "
                               "cannot be served now") from None
        return JSONResponse({"status": "ok", **info})

    @api.get("/metrics")
    async def metrics_text(self) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE)

    def _unseen(self, prompts: list[str]) -> dict[str, str]:
        """The header naming the words of `prompts` the world's text encoder never saw (none for other encoders)."""
        if not self.world_vocabulary:
            return {}
        from ..world.vocabulary import unseen_words

        words = dict.fromkeys(word for prompt in prompts for word in unseen_words(prompt))
        return {UNSEEN_HEADER: ",".join(quote(word, safe="") for word in words)}

    @api.post("/v1/edit")
    async def edit(self, request: Request) -> Response:
        return await self._answer("edit", lambda: self._edit(request))

    async def _edit(self, request: Request) -> Response:
        info = await self._editor_info()
        edit = parse_edit(await self._json(request), info["num_ws"], info["latent_dim"])
        self.metrics.queue_depth.inc()
        try:
            png, batch = await asyncio.wait_for(self.editor.edit.remote(edit), self.config.edit_timeout_s)
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.batch_size.observe(batch)
        return Response(png, media_type="image/png",
                        headers={"X-Ffclip-Batch-Size": str(batch), **self._unseen([edit.prompt])})

    @api.post("/v1/encode")
    async def encode(self, request: Request) -> Response:
        return await self._answer("encode", lambda: self._encode(request))

    async def _encode(self, request: Request) -> Response:
        prompts = parse_prompts(await self._json(request))
        embeddings = await asyncio.wait_for(self.editor.encode.remote(prompts), self.config.edit_timeout_s)
        return JSONResponse({"embeddings": embeddings}, headers=self._unseen(prompts))

    @api.post("/v1/invert")
    async def invert(self) -> Response:
        return await self._answer("invert", self._invert)

    async def _invert(self) -> Response:
        info = await self._editor_info()
        return _error(501, f"this service does not invert photos ({info['source']}); invert them with ffclip invert "
                           "(or Runtime.invert on a folder exported with --encoder) and send the latents to /v1/edit")


def build_app(config: ServeConfig) -> serve.Application:
    """The gateway bound to `config.replicas` editor replicas, ready for `serve.run`."""
    editor = EditorReplica.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.num_cpus},
        max_ongoing_requests=config.editor_slots,
        max_queued_requests=config.queue,
    ).bind(config)
    edits_held = config.replicas * config.editor_slots + config.queue
    return Gateway.options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.max_uploads + edits_held + GATEWAY_HEADROOM,
        max_queued_requests=GATEWAY_MAX_QUEUED,
        backpressure_config={"status_code": 503, "retry_after_s": config.retry_after_s},
    ).bind(editor, config)
