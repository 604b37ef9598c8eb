"""`ffclip serve`: start (or join) Ray, deploy the service, and serve until interrupted (Ctrl-C or SIGTERM)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path

import click

from ..cli.options import artifact_options, stage_options
from ..errors import FfclipError, InputError, summarize
from ..stages import StageSources, check_sources
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
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=60.0, show_default=True,
              help="Seconds an edit or encode may take in the editor; past that, 504.")
@click.option("--health-timeout", type=click.FloatRange(0, min_open=True), default=5.0, show_default=True,
              help="Seconds the editor has to answer /healthz; past that, 503.")
@click.option("--body-timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Seconds a client has to send a request body; past that, 408.")
@click.option("--max-uploads", type=click.IntRange(1, 100000), default=256, show_default=True,
              help="Request bodies received at once; past that, 503 with Retry-After.")
@click.option("--address", default=None,
              help="Join this Ray cluster (ray://host:port, or auto) instead of starting a local one.")
def serve(sources: StageSources, artifacts: Path | None, expect_sha256: str | None, backend: str, device: str,
          host: str, port: int, replicas: int, max_batch: int, queue: int, num_cpus: float, threads: int | None,
          timeout: float, health_timeout: float, body_timeout: float, max_uploads: int, address: str | None) -> None:
    """Serve edits over HTTP on Ray Serve, with a web editor at /."""
    check_sources(sources, artifacts, expect_sha256)
    if artifacts is not None:
        from ..artifacts import read_manifest

        read_manifest(artifacts, expected_sha256=expect_sha256)
    if address is None:
        _check_port(host, port)
    config = ServeConfig(sources=sources, artifacts=artifacts, expected_sha256=expect_sha256, backend=backend,
                         device=device, replicas=replicas,
                         max_batch=max_batch, queue=queue, num_cpus=num_cpus,
                         threads=threads or max(1, int(num_cpus)), edit_timeout_s=timeout,
                         health_timeout_s=health_timeout, body_timeout_s=body_timeout, max_uploads=max_uploads)
    ray, serve_api = _import_ray(local=address is None)
    from .app import build_app

    if address is None:
        from ray._private.utils import get_num_cpus  # what a local Ray instance will offer

        _check_cpus(replicas, num_cpus, get_num_cpus(), "this machine")
    _say("joining the Ray cluster at " + address if address else "starting a local Ray instance")
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        # a local instance serves this process alone: no dashboard, no Ray metrics port
        local = {} if address else {"_system_config": {"enable_metrics_collection": False}}
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, **local)
    except Exception as exc:  # Ray raises plain Exception when its node does not come up in time
        raise FfclipError(f"cannot start or join Ray ({summarize(exc)}); check --address, or retry on a less "
                          "loaded machine") from None
    finally:
        # Ray's own SIGTERM handler exits without stopping the processes it started; SIGTERM unwinds as Ctrl-C does
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if address is not None:
            _check_cpus(replicas, num_cpus, ray.cluster_resources().get("CPU", 0), f"the cluster at {address}")
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


def _import_ray(local: bool):
    """Ray and Ray Serve. For a `local` instance, every port Ray opens listens on the loopback interface only."""
    if local:
        # Ray reads this when imported: with multi-node clusters off, its node address is 127.0.0.1
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
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


def _check_cpus(replicas: int, num_cpus: float, available: float, where: str) -> None:
    """Refuse replicas that need more CPUs than Ray has: Ray would wait for them forever."""
    needed = replicas * num_cpus
    if needed > available:
        raise InputError(f"--replicas {replicas} with --num-cpus {num_cpus:g} needs {needed:g} CPUs and {where} "
                         f"has {available:g} for Ray; lower --replicas or --num-cpus (0.5 lets two replicas share "
                         "a CPU)")
