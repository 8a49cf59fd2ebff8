"""The package map of docs/architecture.md, checked: imports run one way, from the top layer to
the bottom, siblings in one layer never import each other, and each I/O library is imported by
the one package that faces its system. ``sim`` and ``bench`` are tools beside the product (never
imported by it: tests/unit/test_cli_imports.py) and are not checked here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "lis_async"

#: Top to bottom. A unit may import units of lower layers only.
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"app", "check"},
    {"cluster", "intake"},
    {"lastinfosec", "platform", "ops"},
    {"broker"},
    {"settings"},
    {"enrichment"},
    {"errors", "redact", "retry"},
]
TOOLS = {"sim", "bench"}

#: Third-party libraries that belong to one system each, and the units allowed to import them.
OWNERS: dict[str, set[str]] = {
    "aio_pika": {"broker"},
    "aiormq": {"broker"},
    "pamqp": {"broker"},
    "redis": {"cluster"},
    "pycti": {"platform", "enrichment.delivery"},
    "aiohttp": {"lastinfosec", "platform", "ops"},
}


def _rank(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"lis_async.{unit} is in no layer of LAYERS: add it to the map")


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in TOOLS:
            continue
        out.append((".".join(p for p in parts if p != "__init__"), path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "lis_async":  # from lis_async import x
                found += [(node.lineno, f"lis_async.{a.name}") for a in node.names]
    return found


def _violations() -> list[str]:
    bad = []
    for module, path in _modules():
        unit = module.split(".")[0] if module else "__init__"
        if unit == "__init__":
            continue
        where = f"lis_async/{path.relative_to(ROOT)}"
        for line, name in _imports(path):
            top, _, rest = name.partition(".")
            if top == "lis_async" and rest:
                other = rest.split(".")[0]
                if other == unit:
                    continue
                if other in TOOLS:
                    if unit != "cli":
                        bad.append(f"{where}:{line} imports the tool lis_async.{other}")
                    continue
                if _rank(other) <= _rank(unit):
                    bad.append(f"{where}:{line}: {unit} -> {other} breaks the layer order")
            elif top in OWNERS:
                allowed = OWNERS[top]
                if unit not in allowed and module not in allowed:
                    bad.append(f"{where}:{line} imports {top}, which only {sorted(allowed)} may")
    return bad


def test_imports_follow_the_layers_and_library_owners() -> None:
    assert _violations() == []


def test_every_unit_is_on_the_map_and_the_top_level_is_small() -> None:
    units = {
        p.stem if p.is_file() else p.name
        for p in ROOT.iterdir()
        if not p.name.startswith(("_", "."))
    }
    units.discard("py")
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    for unit in units - TOOLS:
        _rank(unit)
    top_modules = [p for p in ROOT.glob("*.py")]
    assert len(top_modules) <= 8, sorted(p.name for p in top_modules)
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc, f"lis_async/{pkg}/__init__.py has no docstring"
        if pkg in TOOLS:
            continue
        for mod in (ROOT / pkg).glob("*.py"):
            if mod.stem != "__init__":
                assert re.search(rf"\b{mod.stem}\b", doc), (
                    f"lis_async/{pkg}'s docstring does not name {mod.stem}"
                )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import aio_pika\n", "imports aio_pika"),
        ("from lis_async.app import App\n", "breaks the layer order"),
        ("from lis_async.sim import world\n", "imports the tool"),
    ],
)
def test_the_checker_catches_a_wrong_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str
) -> None:
    """The check itself can fail: a planted module in enrichment/ with a forbidden import."""
    fake = tmp_path / "lis_async"
    (fake / "enrichment").mkdir(parents=True)
    (fake / "enrichment" / "__init__.py").write_text('"""``bad``"""\n')
    (fake / "enrichment" / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake)
    assert any(expected in v for v in _violations())
