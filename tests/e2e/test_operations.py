"""Operations: Prometheus metrics, health endpoints, `lis-async check`, the demo."""

from __future__ import annotations

import re
import socket

import aiohttp
import pytest

from lis_async.check import run_check
from lis_async.settings.model import load_settings
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.world import SimWorld
from tests.helpers import app_only, poll, world_with_worker

pytestmark = [pytest.mark.rabbitmq]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" ([0-9.e+-]+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    assert m, f"{name}{{{labels}}} not in metrics"
    return float(m.group(1))


async def test_metrics_and_health_endpoints_in_a_run() -> None:
    health, metrics = free_port(), free_port()
    env = {
        "CONNECTOR_EXPOSE_METRICS": "true",
        "CONNECTOR_METRICS_PORT": str(metrics),
        "CONNECTOR_HEALTH_PORT": str(health),
    }
    async with world_with_worker(env=env, lis=LisSimConfig(latency_s=0.01, known_share=0.7)) as run:
        world = run.world
        produced = await world.producer.publish_many(40, kind="manual")
        works = [j.work_id for j in produced if j.work_id]
        assert await world.platform.wait_works(works, timeout=60)
        assert await world.worker.wait_idle(timeout=20)
        # A work is complete as soon as the platform has its last report; the job's handler
        # counts it in the metrics a little later, and is done once no job is in flight.
        consumer = run.app.consumer
        assert consumer is not None and await poll(lambda: consumer.in_flight == 0, 30)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{health}/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
            async with http.get(f"http://127.0.0.1:{health}/readyz") as resp:
                body = await resp.json()
                assert resp.status == 200, body
                assert body["checks"] == {
                    "consumer": True,
                    "publisher": True,
                    "heartbeat": True,
                    "accepting": True,
                    "platform": True,
                }
            async with http.get(f"http://127.0.0.1:{health}/metrics") as resp:
                assert resp.status == 404  # metrics only on the metrics port
            async with http.get(f"http://127.0.0.1:{metrics}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
        outcomes = {
            o: sample(text, "lis_jobs_total", f'outcome="{o}"')
            for o in ("enriched", "not_found", "skipped")
            if f'lis_jobs_total{{outcome="{o}"}}' in text
        }
        assert sum(outcomes.values()) == len(works)
        assert outcomes["enriched"] > 0
        assert sample(text, "lis_job_duration_seconds_count") == len(works)
        assert sample(text, "lis_push_messages_total") == world.worker.counters.received
        assert sample(text, "lis_api_latency_seconds_count") == world.lis.stats.total
        assert sample(text, "lis_api_requests_total", 'status="200"') > 0
        assert sample(text, "lis_jobs_running") == 0
        assert sample(text, "lis_heartbeat_age") < 60
        assert sample(text, "lis_platform_up") == 1 and sample(text, "lis_lastinfosec_up") == 1
        for name in (
            "lis_api_retries_total",
            "lis_api_throttled_total",
            "lis_cache_hits_total",
            "lis_listen_queue_messages",
        ):
            assert name in text
        assert world.lis_api_key not in text and world.opencti_token not in text

        # Readiness follows the worker: not ready once it stops taking jobs.
        await consumer.stop_intake()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{health}/readyz") as resp,
        ):
            assert resp.status == 503 and (await resp.json())["checks"]["accepting"] is False


async def test_check_passes_against_the_simulated_world() -> None:
    async with SimWorld() as world:
        lines: list[str] = []
        code = await run_check(load_settings(env=world.env()), out=lines.append)
        assert code == 0, lines
        assert [line.split()[0:2] for line in lines] == [
            ["PASS", "opencti:"],
            ["PASS", "rabbitmq:"],
            ["PASS", "lastinfosec:"],
        ]


async def test_check_fails_clearly_on_a_wrong_key_and_a_wrong_url() -> None:
    async with SimWorld() as world:
        lines: list[str] = []
        env = world.env() | {"CONFIG_LIS_APIKEY_CTI": "wrong-key-123"}
        assert await run_check(load_settings(env=env), out=lines.append) == 1
        assert lines[0].startswith("PASS opencti") and lines[2].startswith("FAIL lastinfosec")
        assert "wrong-key-123" not in "\n".join(lines)

        lines.clear()
        env = world.env() | {
            "OPENCTI_URL": f"http://127.0.0.1:{free_port()}",
            "OPENCTI_TOKEN": "octi-secret-xyz",
        }
        assert await run_check(load_settings(env=env), out=lines.append) == 1
        assert lines[0].startswith("FAIL opencti") and "unreachable" in lines[0]
        assert lines[1].startswith("FAIL rabbitmq")
        assert "octi-secret-xyz" not in "\n".join(lines)


async def test_demo_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    from lis_async.sim.demo import run_demo

    assert await run_demo(jobs=30, latency_s=0.01) == 0
    out = capsys.readouterr().out
    assert re.search(r"works completed\s+(\d+)/\1\b", out), out


async def test_demo_explains_how_to_start_rabbitmq(capsys: pytest.CaptureFixture[str]) -> None:
    from lis_async.sim.demo import run_demo

    assert await run_demo(jobs=1, amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/") == 1
    assert "rabbitmq-server -detached" in capsys.readouterr().err


async def test_pycti_metrics_prefix_and_queue_threshold_in_a_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CONNECTOR_METRICS_NAMESPACE / _SUBSYSTEM prefix every metric, collectors included;
    CONNECTOR_QUEUE_THRESHOLD is reported in the heartbeat with the last check's figures
    (nothing held: an empty queue is below it), and applied without any warning."""
    env = {
        "CONNECTOR_METRICS_NAMESPACE": "octi",
        "CONNECTOR_METRICS_SUBSYSTEM": "lis",
        "CONNECTOR_QUEUE_THRESHOLD": "123",
    }
    caplog.set_level("WARNING", logger="lis_async")
    async with SimWorld() as world:
        async with app_only(world, env) as run:
            text = run.app.metrics.render().decode()
            names = re.findall(r"^# HELP (\S+)", text, re.M)
            assert (
                "octi_lis_lis_jobs_running" in names and "octi_lis_lis_api_retries_total" in names
            )
            # ours (lis_*) and pycti's connector metrics, all under the prefix
            pycti = re.compile(
                r"octi_lis_(bundles_sent|records_sent|runs|ping_api|ping_api_errors|errors"
                r"|client_errors)_(total|created)|octi_lis_state"
            )
            assert all(n.startswith("octi_lis_lis_") or pycti.fullmatch(n) for n in names), names
            assert "octi_lis_bundles_sent_total" in names and "octi_lis_state" in names
            connector = world.platform.connectors[run.app.settings.connector.id]
            assert await poll(lambda: connector.connector_info is not None, 10)
            assert connector.connector_info is not None
            info = connector.connector_info
            assert info["queue_threshold"] == 123.0
            assert (info["buffering"], info["queue_messages_size"]) == (False, 0.0)
            assert run.app.queue_threshold is not None
            assert run.app.queue_threshold.threshold_mb == 123.0
        assert not [r for r in caplog.records if "CONNECTOR_QUEUE_THRESHOLD" in r.getMessage()]
        async with app_only(world) as run:
            assert "\n# HELP lis_jobs_running " in run.app.metrics.render().decode()
            assert run.app.queue_threshold is not None
            assert run.app.queue_threshold.threshold_mb == 500.0  # pycti's default applies
