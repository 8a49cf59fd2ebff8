"""The docs point at things that exist.

- Every relative link in README.md, BENCHMARKS.md and docs/**/*.md reaches an existing file and,
  when the target is Markdown, its ``#anchor`` one of that file's headings (GitHub's slugs).
- Every ``lis_async/...`` or ``tests/...`` path and every ``lis_async.x.y`` name those pages
  mention exists (a dotted name may end in a module-level name of its module).
- The code's pointers into the docs hold: the ``docs/x.md`` files, the ``docs/protocol.md §N``
  sections and the ``docs/x.md, "Heading"`` headings named in lis_async/ and tests/.
- docs/architecture.md's package map names every package and top-level module, and its layer
  order is the one tests/unit/test_layers.py enforces.
- README.md stays short: the details live in docs/.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.unit.test_layers import LAYERS

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").rglob("*.md")])
CODE = sorted(
    p
    for p in [*(ROOT / "lis_async").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    if p != Path(__file__).resolve()  # its probes name what does not exist, on purpose
)
PROTOCOL = ROOT / "docs" / "protocol.md"
README_MAX_LINES = 200

#: A page another branch is writing (the Kubernetes kit's guide): a link to it is checked like
#: any other once the file exists.
PENDING = {ROOT / "docs" / "deployment" / "kubernetes.md"}

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
_PATH = re.compile(r"(?<![\w/.-])((?:lis_async|tests)/[\w./-]*[\w/])")
_DOTTED = re.compile(r"(?<![\w./-])(lis_async(?:\.[A-Za-z_]\w*)+)")
_DOC_REF = re.compile(r"(?<![\w/.-])(docs/[\w/-]+\.md)")
_SECTION_REFS = re.compile(r"docs/protocol\.md((?:[\s#,(]*(?:and\s+)?§\d+(?:\.\d+)?)+)")
_SECTION = re.compile(r"§(\d+(?:\.\d+)?)")
_HEADING_REF = re.compile(r"(docs/[\w/-]+\.md),\s*(?:#\s*)?\"?([A-Z][\w-]*(?:[ \t]+[a-z][\w-]*)*)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation out, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    return _HEADING.findall(_FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for heading in headings(text):
        base = slug(heading)
        seen[base] = seen.get(base, -1) + 1
    return {base if n == 0 else f"{base}-{n}" for base, top in seen.items() for n in range(top + 1)}


def link_problems(page: Path, text: str) -> list[str]:
    bad = []
    plain = _CODE_SPAN.sub("``", _FENCE.sub("", text))
    for target in _LINK.findall(plain):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if dest != page and not dest.exists():
            if dest not in PENDING:
                bad.append(f"{target} (no such file)")
            continue
        if anchor and dest.suffix == ".md":
            if anchor not in anchors(text if dest == page else read(dest)):
                bad.append(f"{target} (no such heading)")
    return bad


@cache
def module_names(module: Path) -> frozenset[str]:
    names = set()
    for node in ast.parse(read(module)).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return frozenset(names)


def dotted_exists(name: str) -> bool:
    """``lis_async.a.b`` is a module or package, or a module followed by one of its names."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.exists():
            rest = parts[cut:]
            return not rest or (len(rest) == 1 and rest[0] in module_names(module))
    return False


def mention_problems(text: str) -> list[str]:
    bad = [
        f"{p} does not exist" for p in sorted(set(_PATH.findall(text))) if not (ROOT / p).exists()
    ]
    bad += [
        f"{name} is no module or module-level name"
        for name in sorted(set(_DOTTED.findall(text)))
        if not dotted_exists(name)
    ]
    return bad


def protocol_sections() -> set[str]:
    return {h.split()[0].rstrip(".") for h in headings(read(PROTOCOL)) if h[0].isdigit()}


def pointer_problems(text: str) -> list[str]:
    """What a source file's pointers into docs/ name that is not there."""
    bad = [
        f"{doc} does not exist"
        for doc in sorted(set(_DOC_REF.findall(text)))
        if not (ROOT / doc).exists() and ROOT / doc not in PENDING
    ]
    sections = protocol_sections()
    for refs in _SECTION_REFS.findall(text):
        bad += [
            f"docs/protocol.md has no §{n}" for n in _SECTION.findall(refs) if n not in sections
        ]
    for doc, heading in _HEADING_REF.findall(text):
        if (ROOT / doc).exists():
            titles = {h.replace("`", "").lower() for h in headings(read(ROOT / doc))}
            if heading.lower() not in titles:
                bad.append(f"{doc} has no heading {heading!r}")
    return bad


# ----------------------------------------------------------------------------- the pages
@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_between_pages_resolve(page: Path) -> None:
    assert not link_problems(page, read(page))


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_paths_and_modules_exist(page: Path) -> None:
    assert not mention_problems(read(page))


def test_protocol_md_cites_its_own_sections() -> None:
    cited = set(_SECTION.findall(read(PROTOCOL)))
    assert cited and not sorted(cited - protocol_sections())


def test_readme_stays_short() -> None:
    lines = read(ROOT / "README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move the details into docs/"


def architecture_map() -> tuple[list[set[str]], str]:
    """The layers docs/architecture.md states, top to bottom, and its package-map table."""
    text = read(ROOT / "docs" / "architecture.md")
    stated = re.search(r"Layers, top to bottom:(.+?)\.\s", text, re.S)
    assert stated, "docs/architecture.md states no layer order"
    layers = [set(re.findall(r"`(\w+)`", layer)) for layer in stated.group(1).split(">")]
    section = text[text.index("## Package map") : text.index("## One job")]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    return layers, table


def test_architecture_states_the_enforced_layers_and_maps_every_package() -> None:
    layers, table = architecture_map()
    assert layers == [layer for layer in LAYERS if layer != {"__main__"}]
    package = ROOT / "lis_async"
    for sub in package.iterdir():
        if (sub / "__init__.py").exists():
            assert f"`{sub.name}/`" in table, f"the package map has no row for {sub.name}/"
        elif sub.suffix == ".py" and not sub.name.startswith("_"):
            assert f"`{sub.stem}`" in table, f"the package map does not name {sub.stem}"


# ----------------------------------------------------------------------------- the code
def test_code_pointers_into_the_docs_hold() -> None:
    bad = [
        f"{rel(source)}: {problem}" for source in CODE for problem in pointer_problems(read(source))
    ]
    assert not bad


# ----------------------------------------------------------------------------- the checks
def test_the_checks_see_what_is_wrong() -> None:
    """A broken link, anchor, path, name or pointer is reported, and a sound one is not."""
    page = ROOT / "docs" / "probe.md"  # read as if it lived in docs/; never written
    text = (
        "# Top\n\n## The max-TLP / max-PAP gate\n\n## Top\n\n"
        "[a](#top) [b](#top-1) [c](#the-max-tlp--max-pap-gate) [d](https://example.org/x)\n"
        "[e](#nowhere) [f](nowhere.md) [g](protocol.md#99-none) [h](protocol.md#21-registerconnector)\n"
        "[i](../README.md) `[j](not-a-link.md)`\n"
        "```\n[k](inside-a-fence.md)\n```\n"
    )
    assert link_problems(page, text) == [
        "#nowhere (no such heading)",
        "nowhere.md (no such file)",
        "protocol.md#99-none (no such heading)",
    ]
    assert mention_problems(
        "`lis_async/enrichment/pipeline.py`, `lis_async/sim/`, `lis_async/nowhere.py`,"
        " `tests/unit/nowhere.py`, `lis_async.enrichment.pipeline.Pipeline`, `lis_async.cli`,"
        " `lis_async.enrichment.nope`, `lis_async.enrichment.pipeline.Nope`."
    ) == [
        "lis_async/nowhere.py does not exist",
        "tests/unit/nowhere.py does not exist",
        "lis_async.enrichment.nope is no module or module-level name",
        "lis_async.enrichment.pipeline.Nope is no module or module-level name",
    ]
    assert pointer_problems(
        '"""See docs/protocol.md §2.1, §99 and §3.6; docs/nowhere.md;\n'
        '    docs/architecture.md, "Priority lanes"; docs/architecture.md,\n'
        '    Nothing here)."""\n'
    ) == [
        "docs/nowhere.md does not exist",
        "docs/protocol.md has no §99",
        "docs/architecture.md has no heading 'Nothing here'",
    ]
