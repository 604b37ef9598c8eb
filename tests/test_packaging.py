"""The top-level export/, engines/, kernels/ and benchmarks/ folders import as ffclip.* from both an editable
install and a built wheel, and every command answers --help."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import ffclip
from ffclip.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"export": "export", "engines": "engines", "kernels": "kernels", "benchmarks": "benchmarks"}


def test_editable_install_maps_top_level_folders():
    import importlib

    for name, folder in SUBPACKAGES.items():
        module = importlib.import_module(f"ffclip.{name}")
        assert Path(module.__file__).parent == ROOT / folder


@pytest.mark.slow
def test_built_wheel_holds_and_imports_the_subpackages(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("ffclip-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name, folder in SUBPACKAGES.items():
        sources = {p.name for p in (ROOT / folder).glob("*.py")}
        packed = {Path(n).name for n in names if n.startswith(f"ffclip/{name}/")}
        assert sources <= packed, f"wheel lacks {sorted(sources - packed)} of ffclip/{name}"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "import ffclip.kernels, ffclip.export, ffclip.engines, ffclip.benchmarks, ffclip.models; print(ffclip.kernels.__file__)"
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.stdout.strip().startswith(str(target))


@pytest.mark.parametrize("command", [[], *[[name] for name in sorted(COMMANDS)]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_public_api_names_resolve():
    for name in ("Generator", "Mapper", "TextEncoder", "EditPipeline"):
        assert getattr(ffclip, name).__name__ == name


def _entry_points() -> dict[str, str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("args", [[name, flag] for name in sorted(_entry_points()) for flag in ("-h", "--help")]
                         + [["ffclip", name, "-h"] for name in sorted(COMMANDS)])
def test_every_entry_point_and_command_takes_h(args, monkeypatch, capsys):
    import importlib

    module, function = _entry_points()[args[0]].split(":")
    monkeypatch.setattr(sys, "argv", args)
    code = 0
    try:
        getattr(importlib.import_module(module), function)()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    assert code in (0, None), err
    assert out.startswith("Usage:") and not err


def test_an_editable_build_raises_no_setuptools_warning(tmp_path):
    """The project's own configuration warns about nothing (license, data folders); what `pip install -e .` runs."""
    code = f"from setuptools import build_meta; build_meta.build_editable({str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in (done.stdout + done.stderr).splitlines()
                if "Warning" in line and "InformationOnly" not in line]
    assert warnings == []
    assert list(tmp_path.glob("ffclip-*.whl"))
