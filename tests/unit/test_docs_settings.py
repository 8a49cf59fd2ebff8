"""Every setting is documented: the README's settings tables, config.yml.sample and the settings
model list the same keys with the same defaults, and the README's pycti table covers every
variable pycti's connector helper reads.

The lists come from the code (``Settings``, ``unsupported.UNSUPPORTED``, the installed pycti), so
a setting added later fails here until it is documented in both places.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lis_async.settings.model import Settings, all_env_names, load_settings
from lis_async.settings.unsupported import UNSUPPORTED

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SAMPLE = ROOT / "config.yml.sample"
REQUIRED = {
    "OPENCTI_TOKEN": "octi-token-secret",
    "CONNECTOR_ID": "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e",
    "CONFIG_LIS_APIKEY_CTI": "lis-key-secret",
}
_CELL_KEY = re.compile(r"^`([a-z_]+)\.([a-z_]+)`")


def model_defaults() -> dict[tuple[str, str], Any]:
    """(section, key) -> the model's default, ``PydanticUndefined`` when required."""
    out: dict[tuple[str, str], Any] = {}
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        for name, f in model.model_fields.items():
            out[(section, f.alias or name)] = f.default
    return out


def render(default: Any) -> str:
    """A default as the README writes it."""
    if default is PydanticUndefined:
        return "required"
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    if isinstance(default, tuple):
        return ",".join(default)
    return str(default)


def table_rows(text: str, heading: str | None = None) -> list[list[str]]:
    """The cells of every Markdown table row (after ``heading`` when given)."""
    if heading is not None:
        text = text[text.index(heading) :]
        end = text.find("\n## ", 1)
        text = text if end < 0 else text[:end]
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def readme_settings() -> dict[tuple[str, str], tuple[str, str]]:
    """(section, key) -> (environment cell, default cell) from the Configuration tables."""
    out: dict[tuple[str, str], tuple[str, str]] = {}
    config = README.read_text(encoding="utf-8")
    config = config[config.index("## Configuration") : config.index("### pycti's")]
    for cells in table_rows(config):
        m = _CELL_KEY.match(cells[1]) if len(cells) >= 3 else None
        if m:
            key = (m.group(1), m.group(2))
            assert key not in out, f"{key} has two rows in the README"
            out[key] = (cells[0], cells[2])
    return out


def readme_default(cell: str) -> str:
    """The first `code` of a default cell, else its first word (required, none)."""
    m = re.search(r"`([^`]*)`", cell)
    return m.group(1) if m else cell.split()[0].lower()


# ----------------------------------------------------------------------------- config.yml.sample
def sample() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_every_setting_is_in_the_sample_with_its_default(tmp_path: Path) -> None:
    data, defaults = sample(), model_defaults()
    in_sample = {(s, k) for s, block in data.items() for k in block}
    assert not sorted(set(defaults) - in_sample), "missing from config.yml.sample"
    assert not sorted(in_sample - set(defaults)), "not settings (typo?)"
    empty = tmp_path / "config.yml"
    empty.write_text("", encoding="utf-8")
    env = REQUIRED | {"OPENCTI_URL": "http://localhost:8080"}
    from_sample, from_defaults = load_settings(SAMPLE, env=env), load_settings(empty, env=env)
    for (section, key), default in defaults.items():
        if default is PydanticUndefined:
            continue  # the sample's ChangeMe, checked by test_deploy_files
        attr = "password" if key == "pass" else key
        got = getattr(getattr(from_sample, section), attr)
        want = getattr(getattr(from_defaults, section), attr)
        assert got == want, f"config.yml.sample {section}.{key}: {got!r}, default {want!r}"


# ----------------------------------------------------------------------------- pycti's table
def pycti_names_of(cell: str) -> set[str]:
    """The variables a pycti-table cell names (`_API_PATH` abbreviates
    `CONNECTOR_LISTEN_PROTOCOL_API_PATH`)."""
    names = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", cell))
    names |= {"CONNECTOR_LISTEN_PROTOCOL" + s for s in re.findall(r"`(_[A-Z0-9_]+)`", cell)}
    return names


def pycti_rows() -> list[list[str]]:
    return table_rows(README.read_text(encoding="utf-8"), "### pycti's")[1:]  # no header


def pycti_table_names() -> set[str]:
    return {name for row in pycti_rows() for name in pycti_names_of(row[0])}


def pycti_helper_variables() -> set[str]:
    """Every variable the installed pycti's connector helper reads."""
    import pycti.connector.opencti_connector_helper as helper

    source = Path(helper.__file__).read_text(encoding="utf-8")
    calls = re.findall(r'get_config_variable\(\s*(?:env_var=)?"([A-Z0-9_]+)"', source)
    assert len(calls) > 40, "pycti's helper source changed shape"
    return set(calls)


def test_every_pycti_helper_variable_is_honoured_or_refused_and_documented() -> None:
    pycti_names = pycti_helper_variables()
    refused = {name for entry in UNSUPPORTED for name in entry.env}
    honoured = set(all_env_names()) - refused
    undecided = sorted(pycti_names - honoured - refused)
    assert not undecided, f"pycti reads these, lis-async neither honours nor refuses: {undecided}"
    in_table = pycti_table_names()
    missing = sorted((pycti_names | refused) - in_table)
    assert not missing, f"missing from the README's pycti table: {missing}"


@pytest.mark.parametrize("entry", UNSUPPORTED, ids=lambda e: e.env[0])
def test_refused_settings_say_what_is_accepted_in_the_readme(entry: Any) -> None:
    (row,) = [r for r in pycti_rows() if entry.env[0] in pycti_names_of(r[0])]
    assert "refused" in row[1], row
    for value in entry.accepted:
        assert value.lower() in row[1].lower(), (entry.env[0], value, row[1])


# ----------------------------------------------------------------------------- the model
def test_every_setting_has_a_description_and_an_origin() -> None:
    from lis_async.settings.model import ORIGINS, field_extra, settings_fields

    fields = settings_fields()
    assert len(fields) > 50
    for section, key, field in fields:
        assert field.description and field.description.strip(), f"{section}.{key}: no description"
        assert "\n" not in field.description, f"{section}.{key}: one line"
        assert field_extra(field).get("origin") in ORIGINS, f"{section}.{key}: no origin"
