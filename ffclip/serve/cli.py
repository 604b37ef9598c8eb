"""`ffclip serve`: start (or join) Ray, deploy the service, and serve until interrupted."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import click

from ..cli.options import StageSources, artifact_options, stage_options
from ..errors import FfclipError, InputError, summarize
from .editor import ServeConfig

APP_NAME = "ffclip"


def _say(message: str) -> None:
    click.echo(message, err=True)


@click.command()
@stage_options
@artifact_options("Serve an ffclip-export folder instead of the checkpoints (default: the embedded default).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--replicas", type=click.IntRange(1, 64), default=1, show_default=True, help="Editor replicas.")
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Most edits one replica runs at once, gathered across clients; 1 runs them one at a time.")
@click.option("--queue", type=click.IntRange(0, 100000), default=32, show_default=True,
              help="Edits that may wait beyond those the replicas hold; past that, 503 with Retry-After.")
@click.option("--num-cpus", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True,
              help="Ray CPUs reserved by each replica.")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="PyTorch threads in each replica [default: its --num-cpus, rounded down, at least 1].")
@click.option("--address", default=None,
              help="Join this Ray cluster (ray://host:port, or auto) instead of starting a local one.")
def serve(sources: StageSources, artifacts: Path | None, expect_sha256: str | None, backend: str, device: str,
          host: str, port: int, replicas: int, max_batch: int, queue: int, num_cpus: float, threads: int | None,
          address: str | None) -> None:
    """Serve edits over HTTP on Ray Serve, with a web editor at /."""
    if artifacts is not None and not sources.is_embedded_default:
        raise InputError("--generator/--mapper/--clip do not apply with --artifacts: the folder holds its own weights")
    if artifacts is not None:
        from ..artifacts import read_manifest

        read_manifest(artifacts, expected_sha256=expect_sha256)
    if address is None:
        _check_port(host, port)
    config = ServeConfig(sources=sources, artifacts=artifacts, expected_sha256=expect_sha256, backend=backend,
                         device=device, replicas=replicas,
                         max_batch=max_batch, queue=queue, num_cpus=num_cpus,
                         threads=threads or max(1, int(num_cpus)))
    ray, serve_api = _import_ray()
    from .app import build_app

    _say("joining the Ray cluster at " + address if address else "starting a local Ray instance")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises plain Exception when its node does not come up in time
        raise FfclipError(f"cannot start or join Ray ({summarize(exc)}); check --address, or retry on a less "
                          "loaded machine") from None
    try:
        serve_api.start(http_options={"host": host, "port": port})
        _say(f"loading the stages in {replicas} replica(s)")
        try:
            serve_api.run(build_app(config), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            raise FfclipError(f"the service did not start ({summarize(exc)})") from None
        click.echo(f"serving on http://{host}:{port}/ (Ctrl-C stops)")
        while True:
            time.sleep(3600)
    finally:
        if address is None:
            serve_api.shutdown()
        else:
            serve_api.delete(APP_NAME)
        ray.shutdown()


def _import_ray():
    try:
        import ray
        from ray import serve as serve_api
    except ImportError:
        raise InputError("ffclip serve needs Ray Serve: pip install 'ffclip[serve]'") from None
    return ray, serve_api


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") \
                from None
