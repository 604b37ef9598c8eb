"""The project's layout rules, read from the code and the docs: the direction of imports between packages, and every
repository path and DESIGN section the docs and code cite."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject's package-dir)
PACKAGES = {"ffclip": "ffclip", "export": "ffclip.export", "engines": "ffclip.engines", "kernels": "ffclip.kernels",
            "benchmarks": "ffclip.benchmarks"}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "RESULTS.md"]


def _module_name(path: Path) -> str:
    top = path.relative_to(ROOT).parts[0]
    parts = [p for p in path.relative_to(ROOT / top).with_suffix("").parts if p != "__init__"]
    return ".".join([PACKAGES[top], *parts])


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """The project modules `path` imports at run time (anywhere in the file; `if TYPE_CHECKING:` blocks left out)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name == "ffclip" or name.startswith("ffclip.")}


def _graph() -> dict[str, set[str]]:
    modules = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            modules[_module_name(path)] = path
    names = set(modules)
    # `from ffclip.x import name` names a module only when ffclip.x.name is one
    return {m: {t for t in _imports(p) if t in names} for m, p in modules.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# (importer, imported, why): no module within `importer` may import one within `imported`
FORBIDDEN = [
    ("ffclip.models", "ffclip.checkpoints", "models never know the files they are read from"),
    ("ffclip.models", "ffclip.export", "models come before their export"),
    ("ffclip.checkpoints", "ffclip.export", "checkpoints come before export"),
    ("ffclip.artifacts", "ffclip.models", "the artifact contract is read by engines without the models"),
    ("ffclip.artifacts", "ffclip.export", "the contract is shared by both ends of a folder"),
    ("ffclip.artifacts", "ffclip.engines", "the contract is shared by both ends of a folder"),
    ("ffclip.engines", "ffclip.export", "engines read folders; they never build them"),
    ("ffclip.engines", "ffclip.runtime", "the runtime sits above its engines"),
    ("ffclip.runtime", "ffclip.export", "the runtime reads folders; it never builds them"),
    ("ffclip.export", "ffclip.runtime", "export sits below the runtime"),
]


@pytest.mark.parametrize("importer, imported, why", FORBIDDEN)
def test_import_direction(importer: str, imported: str, why: str) -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in _graph().items() if _within(m, importer)
                 for t in targets if _within(t, imported) and not _within(t, importer))
    assert not bad, f"{why}: {bad}"


def test_kernels_import_only_each_other_and_leaf_modules() -> None:
    """Kernels sit beside the models' maths: they may read leaf modules (which import nothing of the project, such as
    the precision table or the atomic writer), never a module with dependencies of its own."""
    graph = _graph()
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if _within(m, "ffclip.kernels")
                 for t in targets if not _within(t, "ffclip.kernels") and t != "ffclip" and graph.get(t))
    assert not bad, f"kernels import modules that are not leaves: {bad}"


def test_library_never_imports_the_command_line() -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in _graph().items() if not _within(m, "ffclip.cli")
                 and not m.endswith(".cli") for t in targets if _within(t, "ffclip.cli"))
    assert not bad, f"only command-line modules may import ffclip.cli: {bad}"


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # a package importing its own submodules (re-exports) is not a cycle of meaning
            if _within(nxt, node):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                walk(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    real = [c for c in cycles if not all(_within(c[0], x) or _within(x, c[0]) for x in c)]
    assert not real, f"import cycles: {real[:5]}"


_PATH = re.compile(r"(?<![\w/.-])((?:ffclip|docs|tests|benchmarks|export|engines|kernels)/[\w./-]*\w)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_path_the_docs_name_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = sorted({p for p in _PATH.findall(text) if not (ROOT / p).exists()
                      and not (doc.parent / p).exists()})
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_every_design_section_cited_exists() -> None:
    design = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", design, flags=re.M))
    cited: dict[str, set[str]] = {}
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *(p for top in PACKAGES for p in (ROOT / top).rglob("*.py")),
                 *(ROOT / "tests").glob("*.py")]:
        for number in re.findall(r"DESIGN §(\d+(?:\.\d+)?)", path.read_text(encoding="utf-8")):
            cited.setdefault(number, set()).add(path.relative_to(ROOT).as_posix())
    unknown = {n: sorted(paths) for n, paths in cited.items() if n not in sections}
    assert not unknown, f"DESIGN sections cited but absent: {unknown}"


def test_the_readme_stays_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
