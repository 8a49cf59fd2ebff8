"""Everything about settings that is not the model, generated from it.

- ``docs/configuration.md``: the reference, grouped the way an operator thinks, with the rules
  that apply to every setting stated once at the top.
- ``config.yml.sample``: every ``config.yml`` key with its default.
- ``__metadata__/connector_config_schema.json`` and ``__metadata__/connector_manifest.json``: the
  OpenCTI connector catalog's files, in the format of the upstream connectors' (their
  ``connectors-sdk`` flattens each ``section.key`` into its ``SECTION_KEY`` environment variable,
  drops ``CONNECTOR_ID`` and inlines nullable types; this module does the same).

``lis-async settings`` prints the reference (or one of the others) and ``--write`` rewrites the
four files; tests/unit/test_docs_settings.py regenerates them in memory and fails on a stale copy.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic.fields import FieldInfo

from lis_async.settings.model import (
    DEFAULT_CONFIG_PATHS,
    LEGACY_ENV,
    SECTIONS,
    env_name,
    field_extra,
    secret_names,
)
from lis_async.settings.removed import REMOVED
from lis_async.settings.unsupported import UNSUPPORTED

__all__ = ["GENERATED", "Entry", "entries", "generate", "stale", "write"]

#: The operator's groups, in the reference's order: a setting is in its section's group unless
#: the model marks another (``group="limits"``).
GROUPS: Final[Mapping[str, str]] = {
    "opencti": "OpenCTI",
    "connector": "Connector",
    "lastinfosec": "LastInfoSec",
    "mq": "RabbitMQ",
    "redis": "Cluster (Redis)",
    "limits": "Limits",
}
_GROUP_INTROS: Final[Mapping[str, str]] = {
    "limits": "How much work is taken and sent at once: the throughput and safety bounds of the "
    "connector and of LastInfoSec.",
}
_ORIGIN_NOTES: Final[Mapping[str, str]] = {
    "upstream": "a setting of the upstream LastInfoSec connector, same name and meaning",
    "pycti": "a setting pycti's connector helper reads (`OpenCTIConnectorHelper`), honoured with "
    "pycti's name and meaning; differences are in its description",
    "lis-async": "lis-async's own",
}
# The catalog entry's fixed facts (lis-async's image, the upstream connector's subscription page).
_SLUG: Final = "lis-async"
_IMAGE: Final = "lis-async"
_SUBSCRIPTION: Final = "https://www.gatewatcher.com/en/our-solutions/lastinfosec/"
_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
# Keys of the model's JSON schema that are ours (lis_async.settings.model._setting; examples
# are config.yml.sample's values), not the catalog's.
_OURS: Final = frozenset(
    {"origin", "group", "legacy_env", "legacy_yaml", "secret_file", "title", "examples"}
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One setting, as the generators see it."""

    section: str
    key: str
    field: FieldInfo
    schema: Mapping[str, Any]  # the model's JSON schema of it, nullable types inlined

    @property
    def env(self) -> str:
        return env_name(self.section, self.key)

    @property
    def extra(self) -> dict[str, Any]:
        return field_extra(self.field)

    @property
    def origin(self) -> str:
        return str(self.extra["origin"])

    @property
    def group(self) -> str:
        return str(self.extra.get("group", self.section))

    @property
    def required(self) -> bool:
        return self.field.is_required()

    @property
    def legacy_env(self) -> list[str]:
        return [e for e, target in LEGACY_ENV.items() if target == (self.section, self.key)]

    @property
    def legacy_yaml(self) -> list[str]:
        return list(self.extra.get("legacy_yaml", ()))

    @property
    def description(self) -> str:
        return self.field.description or ""


def _inline_nullable(schema: Mapping[str, Any]) -> dict[str, Any]:
    """``anyOf: [X, null]`` -> X, merged with the outer keys (the catalog's own rule)."""
    out = dict(schema)
    branches = out.pop("anyOf", None)
    if branches is not None:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) != 1:
            raise ValueError(f"cannot inline {branches!r}")
        out = {**kept[0], **out}
    return out


def entries() -> list[Entry]:
    """Every setting, in the model's order."""
    out: list[Entry] = []
    for section, model in SECTIONS.items():
        props = model.model_json_schema(by_alias=True)["properties"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            out.append(Entry(section, key, field, _inline_nullable(props[key])))
    return out


# ----------------------------------------------------------------------------- rendering values
def _plain(value: Any) -> str:
    """A default as an operator writes it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _type(schema: Mapping[str, Any]) -> str:
    if "const" in schema:
        return f"`{schema['const']}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    if schema.get("format") == "password":
        return "secret"
    kind = str(schema.get("type", "string"))
    if kind == "array":
        return "list, comma-separated"
    return {"number": "number", "integer": "integer", "boolean": "boolean"}.get(kind, "string")


def _bounds(schema: Mapping[str, Any]) -> str:
    marks = (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    )
    return ", ".join(f"{sign} {_plain(schema[k])}" for k, sign in marks if k in schema)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ----------------------------------------------------------------------------- the reference
def _names(entry: Entry) -> str:
    names = [f"`{entry.env}`"] + [f"`{n}` (upstream)" for n in entry.legacy_env]
    if entry.env in secret_names():
        names += [f"`{n}_FILE`" for n in [entry.env, *entry.legacy_env]]
    return "<br>".join(names)


def _yaml_keys(entry: Entry) -> str:
    keys = [f"`{entry.section}.{entry.key}`"] + [f"`{k}` (upstream)" for k in entry.legacy_yaml]
    return "<br>".join(keys)


def _row(entry: Entry) -> str:
    default = "required" if entry.required else f"`{_plain(entry.field.default)}`"
    cells = [
        _names(entry),
        _yaml_keys(entry),
        _type(entry.schema),
        default,
        _bounds(entry.schema),
        entry.origin,
        _cell(entry.description),
    ]
    return "| " + " | ".join(cells) + " |"


def _section_intro(section: str) -> str:
    doc = SECTIONS[section].__doc__ or ""
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "`")


def _rules() -> list[str]:
    paths = ", ".join(f"`{p}`" for p in DEFAULT_CONFIG_PATHS)
    files = ", ".join(f"`{n}_FILE`" for n in secret_names())
    legacy = ", ".join(f"`{n}`" for n in LEGACY_ENV)
    return [
        "## Rules for every setting",
        "",
        "- **Two sources, one name each.** The `config.yml` key `section.key` is the environment "
        "variable `SECTION_KEY` (`lastinfosec.rate_per_s` is `LASTINFOSEC_RATE_PER_S`); the "
        "environment wins. `config.yml` is the file `--config` names, else the first of "
        f"{paths} that exists. The upstream connector's names keep working: {legacy}, and the "
        "`config.yml` keys marked *(upstream)*; the conventional name wins when both are set.",
        '- **An empty value means "not set"**, in both sources: `KEY=` in the environment, '
        "`key:` or `key: ''` in `config.yml` (or only spaces) fall through to the next source "
        "(the environment, then `config.yml`, then the default). An empty variable never hides "
        'a value of the mounted `config.yml`, and an empty required value reads "is required".',
        "- **Secrets from files (`*_FILE`).** "
        f"{files} name a file that holds the value (Docker and Kubernetes secrets; one trailing "
        "newline is stripped). Setting both a variable and its `_FILE` is an error; the error "
        "names the variable and the path, never the content.",
        "- **Booleans** are `true`/`false`, `1`/`0`, `yes`/`no` or `on`/`off`, in any case.",
        "- **Validation.** A bad value stops the start (exit code 2) with one line per problem "
        "naming the variable and the key, never a secret's value. `lis-async check` reports the "
        "same.",
        "- **Where each setting comes from** (column *From*): "
        + "; ".join(f"*{k}*: {v}" for k, v in _ORIGIN_NOTES.items())
        + ". Settings pycti's helper reads that lis-async does not implement are refused "
        "(below); settings lis-async no longer reads are ignored with a warning (below).",
    ]


def _unsupported() -> list[str]:
    lines = [
        "## pycti settings lis-async does not implement",
        "",
        "Each one is accepted only with the value that says what lis-async does anyway (any "
        "case, any boolean spelling); any other value stops the start with one line naming it "
        "and saying why (exit code 2). None is ignored.",
        "",
        "| Environment | config.yml | Accepted | Why |",
        "|---|---|---|---|",
    ]
    for u in UNSUPPORTED:
        names = "<br>".join(f"`{n}`" for n in u.env)
        accepted = ", ".join(f"`{a}`" for a in u.accepted) if u.accepted else "unset"
        lines.append(f"| {names} | `{u.yaml[0]}.{u.yaml[1]}` | {accepted} | {_cell(u.reason)} |")
    return lines


def _removed() -> list[str]:
    lines = [
        "## Removed settings",
        "",
        "lis-async no longer reads these. Set in the environment or `config.yml`, each one is "
        "ignored and named in one WARNING at start (and by `lis-async check`); the start goes "
        "on.",
        "",
        "| Environment | config.yml | Instead |",
        "|---|---|---|",
    ]
    for r in REMOVED:
        lines.append(f"| `{r.env}` | `{r.section}.{r.key}` | {_cell(r.now)} |")
    return lines


def markdown() -> str:
    """docs/configuration.md."""
    lines = [
        "<!-- Generated from lis_async/settings/ by `lis-async settings --write`: do not edit. -->",
        "# Configuration",
        "",
        "Every setting lis-async reads, from the settings model (`lis_async/settings/model.py`). "
        "`lis-async settings` prints this page; `config.yml.sample` lists every key with its "
        "default.",
        "",
        *_rules(),
    ]
    by_group: dict[str, list[Entry]] = {g: [] for g in GROUPS}
    for entry in entries():
        by_group[entry.group].append(entry)
    for group, title in GROUPS.items():
        rows = by_group[group]
        if not rows:
            continue
        intro = _GROUP_INTROS.get(group) or _section_intro(group)
        lines += ["", f"## {title}", "", intro, ""]
        lines.append("| Environment | config.yml | Type | Default | Bounds | From | Description |")
        lines.append("|---|---|---|---|---|---|---|")
        lines += [_row(e) for e in rows]
    lines += ["", *_unsupported(), "", *_removed()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- config.yml.sample
_COMMENT_COLUMN: Final = 38


def _yaml_value(entry: Entry) -> str:
    value = entry.field.examples[0] if entry.required and entry.field.examples else None
    if not entry.required:
        value = entry.field.default
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _plain(value)
    return "'" + _plain(value).replace("'", "''") + "'"


def _comment_block(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 96)]


def sample() -> str:
    """config.yml.sample."""
    legacy_yaml = " / ".join(k for e in entries() for k in e.legacy_yaml)
    header = [
        "lis-async / LastInfoSec enrichment: every setting, with its default. Generated from "
        "lis_async/settings/ by `lis-async settings --write`: do not edit; "
        "docs/configuration.md explains each setting.",
        "Copy to config.yml (" + " or ".join(str(p) for p in DEFAULT_CONFIG_PATHS) + ").",
        "Every key `section.key` can be overridden by the environment variable SECTION_KEY "
        "(lastinfosec.rate_per_s <-> LASTINFOSEC_RATE_PER_S); the environment wins. Upstream "
        f"names keep working: {', '.join(LEGACY_ENV)}, and {legacy_yaml} in this file.",
        "The secrets may come from files instead (Docker/Kubernetes secrets): "
        + ", ".join(f"{n}_FILE" for n in secret_names())
        + " name a file holding the value.",
        "An empty value (`key:` or `key: ''`) means \"not set\", here and in the environment "
        "(`KEY=`): the next source or the default applies.",
    ]
    lines = [line for paragraph in header for line in _comment_block(paragraph)]
    current = ""
    for entry in entries():
        if entry.section != current:
            current = entry.section
            lines += ["", *_comment_block(_section_intro(current)), f"{current}:"]
        text = f"  {entry.key}: {_yaml_value(entry)}".rstrip()
        note = ("required: " if entry.required else "") + entry.description
        lines.append(f"{text.ljust(_COMMENT_COLUMN - 1)} # {note}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the catalog
def config_schema() -> dict[str, Any]:
    """``__metadata__/connector_config_schema.json``: one property per environment variable."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for entry in entries():
        if entry.env == "CONNECTOR_ID":  # the catalog leaves it out: the platform sets it
            continue
        prop = {k: v for k, v in entry.schema.items() if k not in _OURS}
        properties[entry.env] = dict(sorted(prop.items()))
        if entry.required:
            required.append(entry.env)
    return {
        "$schema": _SCHEMA_DIALECT,
        "$id": f"https://www.filigran.io/connectors/{_SLUG}_config.schema.json",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": True,
    }


def _requirement(package: str) -> str:
    """The version specifier of one of lis-async's dependencies (pyproject.toml)."""
    for req in importlib.metadata.requires("lis-async") or ():
        m = re.match(rf"{re.escape(package)}\s*([<>=!~][^;]*)", req)
        if m:
            return m.group(1).strip()
    raise LookupError(package)


def manifest() -> dict[str, Any]:
    """``__metadata__/connector_manifest.json``: the catalog entry."""
    meta = importlib.metadata.metadata("lis-async")
    connector = SECTIONS["connector"].model_fields
    summary = str(meta["Summary"])
    scope = ", ".join(connector["scope"].default)
    return {
        "title": "LastInfoSec Enrichment (lis-async)",
        "slug": _SLUG,
        "description": f"{summary}. It enriches {scope} observables with LastInfoSec's threat "
        "intelligence and reads the upstream LastInfoSec connector's settings unchanged.",
        "short_description": summary,
        "logo": None,
        "use_cases": ["Enrichment & Analysis"],
        "verified": False,
        "last_verified_date": None,
        "playbook_supported": True,
        "max_confidence_level": connector["confidence_level"].default,
        # pycti's floor is the oldest supported platform (docs/protocol.md §2.1).
        "support_version": _requirement("pycti"),
        "subscription_link": _SUBSCRIPTION,
        "source_code": None,
        "manager_supported": False,
        "container_version": importlib.metadata.version("lis-async"),
        "container_image": _IMAGE,
        "container_type": connector["type"].default,
    }


def _json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


#: Repository path -> its generator.
GENERATED: Final[Mapping[str, Callable[[], str]]] = {
    "docs/configuration.md": markdown,
    "config.yml.sample": sample,
    "__metadata__/connector_config_schema.json": lambda: _json(config_schema()),
    "__metadata__/connector_manifest.json": lambda: _json(manifest()),
}


def generate() -> dict[str, str]:
    return {path: make() for path, make in GENERATED.items()}


def stale(root: Path) -> list[str]:
    """The generated files under ``root`` that differ from what the model gives (or are
    missing)."""
    out = []
    for path, text in generate().items():
        target = root / path
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            out.append(path)
    return out


def write(root: Path) -> list[str]:
    """Rewrite the stale generated files under ``root``; the paths written."""
    written = stale(root)
    texts = generate()
    for path in written:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(texts[path], encoding="utf-8")
    return written
