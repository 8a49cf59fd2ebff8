"""The Kubernetes kit (deploy/kubernetes) as the tests read it: overlays rendered by
``kubectl kustomize``, objects picked by kind, the budgets the manifests must cover computed from
the code."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from lis_async import app as app_module
from lis_async.app import STEP_TIMEOUT_S, App
from lis_async.settings.model import load_settings
from tests.helpers import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("single", "cluster")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not on PATH: `kubectl kustomize` renders the overlays")
    return path


def render_dir(path: Path) -> list[dict[str, Any]]:
    """Every object ``kubectl kustomize <path>`` renders."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@functools.cache
def _rendered(overlay: str) -> str:
    return yaml.safe_dump_all(render_dir(KIT / overlay))


def render(overlay: str) -> list[dict[str, Any]]:
    """An overlay's objects (rendered once per test run; each call gets its own copy)."""
    return [doc for doc in yaml.safe_load_all(_rendered(overlay)) if doc]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(c, dict)
    return c


def config_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    data = one(objects, "ConfigMap")["data"]
    assert isinstance(data, dict)
    return {str(k): str(v) for k, v in data.items()}


def generator() -> ModuleType:
    """deploy/kubernetes/generate.py (not a package: loaded from its path)."""
    spec = importlib.util.spec_from_file_location("lis_async_k8s_generate", KIT / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ budgets
def closes_at_most() -> int:
    """How many closes ``App.stop`` runs at most: every part there is, both servers included
    (counted by the code's own list, so a new part raises the budget)."""
    app = App(load_settings(None, env=OFFLINE_ENV))
    part = object()
    app._servers = [part, part]  # type: ignore[list-item]
    for name in ("consumer", "publisher", "lis", "redis", "health"):
        setattr(app, name, part)
    return len(app._closers())


def shutdown_budget_s(shutdown_timeout_s: float) -> float:
    """The longest ``App.stop`` can take (lis_async/app.py): the mover's two steps, cancelling
    the consumer, the drain, the background tasks, then each close, every step bounded by
    :data:`STEP_TIMEOUT_S`."""
    steps = 2 + 1 + 1 + closes_at_most()
    return shutdown_timeout_s + steps * STEP_TIMEOUT_S


def registration_budget_s(platform_timeout_s: float) -> float:
    """The longest registration that still succeeds (``App._register``): building the pycti
    client once (its request to the platform) and every registration attempt wait out the
    platform's time-out, with the back-off's longest pauses between the attempts."""
    attempts = app_module._REGISTER_ATTEMPTS
    pauses = sum(app_module._REGISTER_BACKOFF.ceiling(n) for n in range(1, attempts))
    return (1 + attempts) * platform_timeout_s + pauses
