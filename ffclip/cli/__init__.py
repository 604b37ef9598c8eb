"""The `ffclip` command group and the stand-alone `ffclip-export`, `ffclip-bench`, `ffclip-train` entry points.

Commands are imported only when invoked, so `ffclip --help` stays quick. User errors (`FfclipError`) print one line
and exit with status 2; nothing reaches the user as a traceback.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
import warnings

import click

from ..errors import FfclipError

# command name -> "module:attribute" of its click command
COMMANDS = {
    "edit": "ffclip.cli.edit:edit",
    "export": "ffclip.cli.export:export",
    "bench": "ffclip.benchmarks.cli:bench",
    "train": "ffclip.cli.train:train",
    "serve": "ffclip.serve.cli:serve",
    "eval-world": "ffclip.cli.eval_world:eval_world",
    "invert": "ffclip.cli.invert:invert",
}

# every entry point and command answers both
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}

HELP = {
    "edit": "Edit images from text prompts.",
    "export": "Export the three stages to ONNX, TorchScript and TensorRT.",
    "bench": "Compare backends on every stage.",
    "train": "Train a mapper.",
    "serve": "Serve edits over HTTP on Ray Serve, with a web editor.",
    "eval-world": "Judge the shapes world: valid pictures and edit accuracy, read from pixels.",
    "invert": "Invert face photos to W+ latents with the e4e encoder (--align aligns them first).",
}


def _load(name: str) -> click.Command:
    module, attr = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return _load(cmd_name) if cmd_name in COMMANDS else None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="ffclip")
def cli() -> None:
    """FFCLIP: free-form text-driven StyleGAN2 image editing."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds (and cleans up) as on Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _run(command: click.Command, prog_name: str) -> None:
    def show_warning(message, category, filename, lineno, file=None, line=None):
        click.echo(f"{prog_name}: warning: {message}", err=True)

    warnings.showwarning = show_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        command.main(prog_name=prog_name, standalone_mode=False, **CONTEXT_SETTINGS)
    except FfclipError as exc:
        click.echo(f"{prog_name}: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(2)
    except (Terminated, click.exceptions.Abort) as exc:
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):
            click.echo(f"{prog_name}: terminated", err=True)
            sys.exit(128 + signal.SIGTERM)
        click.echo(f"{prog_name}: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog_name}: interrupted", err=True)
        sys.exit(130)


def main() -> None:
    """Entry point of `ffclip`."""
    _run(cli, "ffclip")


def export_main() -> None:
    """Entry point of `ffclip-export`."""
    _run(_load("export"), "ffclip-export")


def bench_main() -> None:
    """Entry point of `ffclip-bench`."""
    _run(_load("bench"), "ffclip-bench")


def train_main() -> None:
    """Entry point of `ffclip-train`."""
    _run(_load("train"), "ffclip-train")
