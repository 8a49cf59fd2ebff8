"""Every setting documents itself: the model declares each one once (with a description and where
it comes from), and everything else about settings is generated from it and committed
(docs/configuration.md, config.yml.sample, __metadata__/*.json). A generated file that is stale
fails here; so does a variable pycti's connector helper reads that is neither a setting nor
refused.

The lists come from the code (the model, ``unsupported.UNSUPPORTED``, ``removed.REMOVED``, the
installed pycti), so a setting added later is documented by ``lis-async settings --write``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_core import PydanticUndefined

from lis_async.cli import main
from lis_async.settings import reference
from lis_async.settings.model import (
    ORIGINS,
    SECTIONS,
    all_env_names,
    field_extra,
    load_settings,
    settings_fields,
)
from lis_async.settings.removed import REMOVED
from lis_async.settings.unsupported import UNSUPPORTED

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "config.yml.sample"
REQUIRED = {
    "OPENCTI_TOKEN": "octi-token-secret",
    "CONNECTOR_ID": "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e",
    "CONFIG_LIS_APIKEY_CTI": "lis-key-secret",
}


# ----------------------------------------------------------------------------- the model
def test_every_setting_has_a_description_and_an_origin() -> None:
    fields = settings_fields()
    assert len(fields) > 50
    for section, key, field in fields:
        assert field.description and field.description.strip(), f"{section}.{key}: no description"
        assert "\n" not in field.description, f"{section}.{key}: one line"
        assert field_extra(field).get("origin") in ORIGINS, f"{section}.{key}: no origin"
        assert field_extra(field).get("group", section) in reference.GROUPS, (section, key)


def pycti_helper_variables() -> set[str]:
    """Every variable the installed pycti's connector helper reads."""
    import pycti.connector.opencti_connector_helper as helper

    source = Path(helper.__file__).read_text(encoding="utf-8")
    calls = re.findall(r'get_config_variable\(\s*(?:env_var=)?"([A-Z0-9_]+)"', source)
    assert len(calls) > 40, "pycti's helper source changed shape"
    return set(calls)


def test_the_pycti_mark_is_exactly_what_pyctis_helper_reads() -> None:
    """A setting marked "pycti" has a name pycti's helper reads, and every setting with such a
    name is marked so (an upstream or lis-async mark would hide a pycti meaning)."""
    pycti_names = pycti_helper_variables()
    marked = {e.env for e in reference.entries() if e.origin == "pycti"}
    ours = {e.env for e in reference.entries()}
    assert marked == ours & pycti_names


def test_every_pycti_helper_variable_is_honoured_or_refused_and_documented() -> None:
    pycti_names = pycti_helper_variables()
    refused = {name for entry in UNSUPPORTED for name in entry.env}
    honoured = set(all_env_names()) - refused
    undecided = sorted(pycti_names - honoured - refused)
    assert not undecided, f"pycti reads these, lis-async neither honours nor refuses: {undecided}"
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", reference.markdown()))
    missing = sorted((pycti_names | refused) - documented)
    assert not missing, f"missing from docs/configuration.md: {missing}"


# ----------------------------------------------------------------------------- generated files
@pytest.mark.parametrize("path", sorted(reference.GENERATED))
def test_the_generated_file_is_up_to_date(path: str) -> None:
    committed = ROOT / path
    assert committed.is_file(), f"{path} is missing: run `lis-async settings --write`"
    assert committed.read_text(encoding="utf-8") == reference.GENERATED[path](), (
        f"{path} is stale: run `lis-async settings --write`"
    )


def reference_rows() -> dict[str, list[str]]:
    """Environment name -> the cells of its row in the settings tables of the reference."""
    rows: dict[str, list[str]] = {}
    text = reference.markdown()
    text = text[: text.index("## pycti settings lis-async does not implement")]
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            name = re.match(r"`([A-Z0-9_]+)`", cells[0])
            assert name, line
            assert name.group(1) not in rows, f"{name.group(1)} has two rows"
            rows[name.group(1)] = cells
    return rows


def test_the_reference_has_one_row_per_setting_with_its_facts() -> None:
    rows = reference_rows()
    fields = settings_fields()
    assert len(rows) == len(fields)
    for section, key, field in fields:
        env = f"{section}_{key}".upper()
        _names, yaml_key, _type, default, _bounds, origin, description = rows[env]
        assert yaml_key.startswith(f"`{section}.{key}`")
        assert origin == field_extra(field)["origin"]
        assert description == (field.description or "").replace("|", "\\|")
        if field.default is PydanticUndefined:
            assert default == "required", env
        else:
            assert default.startswith("`"), env


def test_the_reference_shows_names_bounds_and_types() -> None:
    rows = reference_rows()
    names, _, _, default, _, origin, _ = rows["LASTINFOSEC_API_KEY_CTI"]
    assert "`CONFIG_LIS_APIKEY_CTI` (upstream)" in names
    assert "`LASTINFOSEC_API_KEY_CTI_FILE`" in names and "`CONFIG_LIS_APIKEY_CTI_FILE`" in names
    assert (default, origin) == ("required", "upstream")
    assert "`lastinfosec.proxy_http` (upstream)" in rows["OPENCTI_PROXY_HTTP"][1]
    assert rows["OPENCTI_THREADS"][2:5] == ["integer", "`8`", "≥ 1, ≤ 256"]
    assert rows["REDIS_TIMEOUT_S"][2:5] == ["number", "`0.25`", "> 0, ≤ 30"]
    assert rows["OPENCTI_TOKEN"][2] == "secret"
    assert rows["CONNECTOR_LOG_LEVEL"][2].startswith("one of `debug`")
    assert rows["LASTINFOSEC_RATE_BURST"][3] == "`none`"


def test_the_reference_states_the_rules_once_and_groups_settings() -> None:
    text = reference.markdown()
    assert text.count('**An empty value means "not set"**') == 1
    assert text.count("**Secrets from files (`*_FILE`).**") == 1
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings == [
        "Rules for every setting",
        *reference.GROUPS.values(),
        "pycti settings lis-async does not implement",
        "Removed settings",
    ]
    limits = text[text.index("## Limits") : text.index("## pycti settings")]
    assert "`CONNECTOR_JOBS_IN_FLIGHT`" in limits and "`LASTINFOSEC_RATE_PER_S`" in limits


@pytest.mark.parametrize("entry", UNSUPPORTED, ids=lambda e: e.env[0])
def test_refused_settings_say_what_is_accepted(entry: Any) -> None:
    text = reference.markdown()
    (row,) = [line for line in text.splitlines() if line.startswith(f"| `{entry.env[0]}`")]
    for value in entry.accepted:
        assert f"`{value}`" in row, (entry.env[0], value, row)
    if not entry.accepted:
        assert "| unset |" in row


def test_removed_settings_are_listed() -> None:
    text = reference.markdown()
    removed = text[text.index("## Removed settings") :]
    for entry in REMOVED:
        assert f"| `{entry.env}` | `{entry.section}.{entry.key}` |" in removed


# ----------------------------------------------------------------------------- config.yml.sample
def test_the_sample_is_every_setting_with_its_default(tmp_path: Path) -> None:
    data = yaml.safe_load(reference.sample())
    assert list(data) == list(SECTIONS)
    in_sample = {(s, k) for s, block in data.items() for k in block}
    assert in_sample == {(s, k) for s, k, _ in settings_fields()}
    empty = tmp_path / "config.yml"
    empty.write_text("", encoding="utf-8")
    generated = tmp_path / "sample.yml"
    generated.write_text(reference.sample(), encoding="utf-8")
    env = REQUIRED | {"OPENCTI_URL": "http://localhost:8080"}
    from_sample, from_defaults = load_settings(generated, env=env), load_settings(empty, env=env)
    assert from_sample.summary() == from_defaults.summary()
    assert from_sample.ignored == ()


# ----------------------------------------------------------------------------- the catalog
def test_the_config_schema_has_the_catalogs_shape() -> None:
    schema = reference.config_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("_config.schema.json")
    assert schema["type"] == "object" and schema["additionalProperties"] is True
    props = schema["properties"]
    assert "CONNECTOR_ID" not in props and "CONNECTOR_ID" not in schema["required"]
    assert set(props) == {e.env for e in reference.entries()} - {"CONNECTOR_ID"}
    assert schema["required"] == ["OPENCTI_URL", "OPENCTI_TOKEN", "LASTINFOSEC_API_KEY_CTI"]
    for name, prop in props.items():
        assert prop["description"] and "type" in prop, name
        assert not {"anyOf", "title", "origin", "group", "examples"} & set(prop), name
    assert props["OPENCTI_TOKEN"] == {
        "description": "the connector's OpenCTI API token (never logged)",
        "format": "password",
        "type": "string",
        "writeOnly": True,
    }
    assert props["OPENCTI_THREADS"]["minimum"] == 1 and props["OPENCTI_THREADS"]["default"] == 8
    assert props["MQ_PORT"] == {
        "default": None,
        "description": "broker port",
        "maximum": 65535,
        "minimum": 1,
        "type": "integer",
    }


def test_the_config_schema_accepts_the_defaults_and_refuses_out_of_bounds() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = reference.config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    values = {n: p["default"] for n, p in schema["properties"].items() if p.get("default")}
    values |= {"OPENCTI_URL": "http://opencti:8080", "OPENCTI_TOKEN": "t"}
    values |= {"LASTINFOSEC_API_KEY_CTI": "k"}
    validator.validate(values)
    assert not validator.is_valid(values | {"OPENCTI_THREADS": 0})
    assert not validator.is_valid({k: v for k, v in values.items() if k != "OPENCTI_TOKEN"})


def test_the_manifest_has_the_catalogs_shape() -> None:
    data = reference.manifest()
    assert list(data) == [
        "title",
        "slug",
        "description",
        "short_description",
        "logo",
        "use_cases",
        "verified",
        "last_verified_date",
        "playbook_supported",
        "max_confidence_level",
        "support_version",
        "subscription_link",
        "source_code",
        "manager_supported",
        "container_version",
        "container_image",
        "container_type",
    ]
    assert data["container_type"] == "INTERNAL_ENRICHMENT"
    assert reference.config_schema()["$id"].endswith(f"/{data['slug']}_config.schema.json")
    assert re.fullmatch(r">=\d+\.\d+\.\d+", data["support_version"])
    json.dumps(data)


# ----------------------------------------------------------------------------- lis-async settings
def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["settings", *args])
    return code, out.getvalue()


def test_lis_async_settings_prints_the_reference() -> None:
    code, text = run_cli()
    assert code == 0 and text == reference.markdown()
    code, text = run_cli("--show", "sample")
    assert code == 0 and text == reference.sample()


def test_lis_async_settings_write_and_check(tmp_path: Path) -> None:
    code, _ = run_cli("--check", "--root", str(tmp_path))
    assert code == 1  # nothing generated yet
    code, out = run_cli("--write", "--root", str(tmp_path))
    assert code == 0 and len(out.splitlines()) == len(reference.GENERATED)
    for path, make in reference.GENERATED.items():
        assert (tmp_path / path).read_text(encoding="utf-8") == make()
    assert run_cli("--check", "--root", str(tmp_path))[0] == 0
    (tmp_path / "config.yml.sample").write_text("opencti: {}\n", encoding="utf-8")
    assert run_cli("--check", "--root", str(tmp_path))[0] == 1
    code, out = run_cli("--write", "--root", str(tmp_path))
    assert out.strip() == f"wrote {tmp_path / 'config.yml.sample'}"
