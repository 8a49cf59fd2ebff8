"""The Grafana dashboard (docs/grafana/lis-async.json) queries only metrics a real worker
exports: a worker in cluster mode (Redis database 11) runs jobs against the simulators, its
/metrics is scraped, and every metric name the dashboard's PromQL selects (parsed, tests/
promql.py) has samples there.

pycti's metric names (``bundles_sent_total``, ``runs_total``...) may be added to /metrics by
another change; the dashboard does not use them, so their presence or absence changes nothing
here."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import CACHE_KEY, QUIET_PRODUCER, poll, work_ids, world_with_worker
from tests.promql import metric_names

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "lis-async.json"
REDIS_DB_URL = "redis://127.0.0.1:6379/11"  # this test's own database


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def queries() -> list[str]:
    out = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []) if t.get("expr")]
    assert out
    return out


def variable_metrics() -> set[str]:
    """The metrics the template variables read (Grafana's ``label_values(metric, label)``)."""
    names = set()
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        text = query.get("query") if isinstance(query, dict) else None
        if text and text.startswith("label_values("):
            names.add(text.removeprefix("label_values(").split(",")[0].strip())
    return names


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_panel_has_queries_and_the_job_variable() -> None:
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert '$job"' in target["expr"], (panel["title"], target["expr"])
            assert metric_names(target["expr"]), target["expr"]
    assert variable_metrics() == {"lis_jobs_running"}


async def test_dashboard_metrics_exist_on_a_running_worker() -> None:
    wanted = set().union(*(metric_names(q) for q in queries())) | variable_metrics()
    env = {
        "CONNECTOR_EXPOSE_METRICS": "true",
        "CONNECTOR_METRICS_PORT": "0",
        "REDIS_URL": REDIS_DB_URL,
        "REDIS_CACHE_KEY": CACHE_KEY,
        "REDIS_KEY_PREFIX": f"test-dashboard-{uuid.uuid4()}",
    }
    async with world_with_worker(env, producer_options=QUIET_PRODUCER) as run:
        jobs = await run.world.producer.publish_many(20)
        assert await run.world.platform.wait_works(work_ids(jobs), timeout=60)
        server = run.app.metrics_server
        assert server is not None and server.port
        seen: set[str] = set()
        async with aiohttp.ClientSession() as http:

            async def all_there() -> bool:
                async with http.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
                    assert resp.status == 200
                    seen.update(sample_names(await resp.text()))
                return wanted <= seen

            # The sampled gauges (queue depths) get their first figure within seconds.
            await poll(all_there, timeout=30, every=0.5)
    assert wanted - seen == set()
