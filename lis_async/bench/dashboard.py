"""A picture of the Grafana dashboard (docs/grafana/lis-async.json) from a demo run, without
Grafana: two workers in cluster mode run against the simulators while a real Prometheus (the
``prometheus`` binary, Debian's package) scrapes them; each panel's queries are then evaluated by
that Prometheus (``query_range``) and drawn with matplotlib, panel by panel, in the dashboard's
layout. It is a rendering of the dashboard's queries, not a Grafana screenshot.

    python3 -m lis_async.bench.dashboard --out docs/grafana/lis-async.png

Needs the ``bench`` extra (matplotlib), RabbitMQ on 127.0.0.1:5672, Redis (database 11 by
default) and ``prometheus`` on PATH. The run, ~110 s: a steady feed, a burst that fills the
priority lane, a few manual jobs, a stretch of 429s and a short LastInfoSec outage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from lis_async.app import App
from lis_async.settings.model import load_settings
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.world import SimWorld

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "lis-async.json"
SCRAPE_S = 2
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 2 s scrape: 4 scrapes, and a margin


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_prometheus(workdir: Path, targets: list[int]) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("prometheus is not on PATH (apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [
            {
                "job_name": "lis-async",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


def _worker_env(world: SimWorld, redis_url: str, prefix: str) -> dict[str, str]:
    return world.env() | {
        "CONNECTOR_LOG_LEVEL": "error",
        "CONNECTOR_HEALTH_PORT": "0",
        "CONNECTOR_EXPOSE_METRICS": "true",
        "CONNECTOR_METRICS_PORT": str(_free_port()),
        "CONNECTOR_JOBS_IN_FLIGHT": "32",
        "LASTINFOSEC_CONCURRENCY": "16",
        "LASTINFOSEC_RATE_PER_S": "20",
        "LASTINFOSEC_BACKOFF_MAX_S": "2",
        "CONNECTOR_SHUTDOWN_TIMEOUT_S": "5",
        "REDIS_URL": redis_url,
        "REDIS_CACHE_KEY": f"demo-{prefix}",  # the run's unique prefix: both replicas share it
        "REDIS_KEY_PREFIX": prefix,
    }


async def _feed(world: SimWorld, seconds: float) -> None:
    """The scenario: steady jobs, a burst, manual jobs, 429s, an outage."""
    cfg = world.lis.config
    started = time.monotonic()

    def at() -> float:
        return time.monotonic() - started

    throttled = False
    events = {
        30.0: lambda: world.producer.publish_many(500),  # a burst: the lane fills
        40.0: lambda: world.producer.publish_many(10, kind="manual"),
    }
    while (now := at()) < seconds:
        await world.producer.publish_many(12)
        for when in [w for w in events if w <= now]:
            await events.pop(when)()
        if now >= 45 and not throttled:
            cfg.force_429_count = 60  # the key's quota below the configured rate, a while
            throttled = True
        cfg.error_rate = 1.0 if 70 <= now < 80 else 0.0  # a LastInfoSec outage
        await asyncio.sleep(1.0)


async def _query_range(
    http: aiohttp.ClientSession, api: str, expr: str, start: float, end: float
) -> list[dict[str, Any]]:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$job", ".*")
    params = {"query": expr, "start": str(start), "end": str(end), "step": str(SCRAPE_S)}
    async with http.get(f"{api}/api/v1/query_range", params=params) as resp:
        body = await resp.json()
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _legend(fmt: str, labels: dict[str, str]) -> str:
    for key, value in labels.items():
        fmt = fmt.replace("{{" + key + "}}", value)
    return fmt


async def _series(api: str, start: float, end: float) -> list[dict[str, Any]]:
    """Each panel with its targets' series: (legend, times, values)."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out: list[dict[str, Any]] = []
    async with aiohttp.ClientSession() as http:
        for panel in dash["panels"]:
            lines: list[tuple[str, list[float], list[float]]] = []
            for target in panel.get("targets", []):
                for res in await _query_range(http, api, target["expr"], start, end):
                    ts = [float(t) - start for t, _ in res["values"]]
                    vs = [float(v) for _, v in res["values"]]
                    lines.append((_legend(target.get("legendFormat", ""), res["metric"]), ts, vs))
            out.append({**panel, "lines": lines})
    return out


def _draw(panels: list[dict[str, Any]], path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.36))
    fig.suptitle(f"lis-async dashboard: {note}", fontsize=11, y=0.995)
    grid = fig.add_gridspec(rows, 24, hspace=0.2, wspace=0.6, top=0.97, bottom=0.02)
    for panel in panels:
        g = panel["gridPos"]
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[g["y"], :])
            ax.axis("off")
            ax.text(0, 0.5, panel["title"], fontsize=11, fontweight="bold", va="center")
            continue
        # a grid unit for the panel's title, one for the x labels
        ax = fig.add_subplot(grid[g["y"] + 1 : g["y"] + g["h"] - 1, g["x"] : g["x"] + g["w"] - 1])
        for legend, ts, vs in panel["lines"]:
            ax.plot(ts, vs, label=legend, linewidth=1.2)
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("s", fontsize=7)
        if panel["lines"]:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


async def render(out: Path, seconds: float, redis_url: str) -> None:
    lis = LisSimConfig(latency_s=0.08, jitter_s=0.02, bundle_size=12)
    # Some jobs repeat an earlier observable: the caches have something to answer.
    async with SimWorld(lis_config=lis, producer_options={"repeat_share": 0.4}) as world:
        prefix = f"lis-async-dashboard-{uuid.uuid4()}"
        apps = [App(load_settings(env=_worker_env(world, redis_url, prefix))) for _ in range(2)]
        tasks = [await app.start_in_background() for app in apps]
        await world.start_worker_emulation()
        ports = [app.settings.connector.metrics_port for app in apps]
        with tempfile.TemporaryDirectory() as tmp:
            prom, api = _start_prometheus(Path(tmp), ports)
            try:
                await asyncio.sleep(2 * SCRAPE_S)
                start = time.time()
                await _feed(world, seconds)
                await asyncio.sleep(3 * SCRAPE_S)
                end = time.time()
                panels = await _series(api, start, end)
            finally:
                prom.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    prom.wait(10)
        for app in apps:
            app.request_stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    note = (
        f"a {seconds:.0f} s demo run (2 replicas, cluster mode, simulators), the queries "
        "evaluated by Prometheus and drawn with matplotlib (not Grafana)"
    )
    _draw(panels, out, note)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lis_async.bench.dashboard")
    parser.add_argument("--out", type=Path, default=DASHBOARD.with_suffix(".png"))
    parser.add_argument("--seconds", type=float, default=100.0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    args = parser.parse_args(argv)
    asyncio.run(render(args.out, args.seconds, args.redis_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
