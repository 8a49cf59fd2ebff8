"""Secrets never leak, and TLP policy holds, across a full run at debug level with failures."""

from __future__ import annotations

import dataclasses
import logging

import orjson
import pytest

from lis_async.app import EXIT_FATAL
from lis_async.enrichment.job import normalise_tlp
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.producer import TLP_IDS, ProducedJob
from lis_async.sim.world import SimWorld
from tests.helpers import LIGHT_WORKER, poll, work_ids, world_with_worker

pytestmark = [pytest.mark.rabbitmq]

LIS_KEY = "LIS-sEcReT-7f3a9c1e"
OPENCTI_TOKEN = "OCTI-sEcReT-42b1e8d0"
LOGGERS = (
    "",
    "lis_async",
    "aiohttp",
    "aiohttp.client",
    "aio_pika",
    "aiormq",
    "urllib3",
    "pycti",
    "api",
    "asyncio",
)


def _with_markings(world: SimWorld, i: int, *tlps: str) -> ProducedJob:
    """A Domain-Name job whose entity carries several TLP markings."""
    job = world.producer.make_job(i, kind="manual", entity_type="Domain-Name")
    body = orjson.loads(job.body)
    entity = orjson.loads(body["event"]["stix_entity"])
    entity["object_marking_refs"] = [TLP_IDS[t] for t in tlps]
    body["event"]["stix_entity"] = orjson.dumps(entity).decode()
    return dataclasses.replace(
        job, body=orjson.dumps(body), tlp=max(tlps, key=lambda t: normalise_tlp(t))
    )


@pytest.mark.slow
async def test_secrets_never_leak_and_tlp_policy_holds(caplog: pytest.LogCaptureFixture) -> None:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    env = {"CONNECTOR_LOG_LEVEL": "debug", "LASTINFOSEC_RETRY_BUDGET_S": "0"}  # one attempt
    lis = LisSimConfig(api_key=LIS_KEY, known_share=0.8, bundle_size=5, error_rate=0.3, seed=11)
    platform = PlatformSimConfig(token=OPENCTI_TOKEN)
    async with world_with_worker(
        env=env, lis=lis, platform=platform, worker_options=LIGHT_WORKER
    ) as run:
        world, app = run.world, run.app
        produced = await world.producer.publish_many(150)

        # One entity, several markings: judged by the most restrictive.
        base = world.producer.next_index()
        crafted = {
            "green+red": _with_markings(world, base, "GREEN", "RED"),
            "clear+amber+strict": _with_markings(world, base + 1, "CLEAR", "AMBER+STRICT"),
            "green+amber": _with_markings(world, base + 2, "GREEN", "AMBER"),  # allowed: looked up
        }
        for job in crafted.values():
            await world.producer.publish(job)
        works = work_ids([*produced, *crafted.values()])
        assert await world.platform.wait_works(works, timeout=120)
        failed = [w for w in works if world.platform.works[w].in_error]
        assert failed, "the run should include some works in error (5xx past the retry budget)"

        # TLP: nothing above AMBER reached LastInfoSec; several markings -> the strictest wins.
        asked = set(world.lis.stats.values)
        for job in [*produced, *crafted.values()]:
            if job.value and normalise_tlp(job.tlp) in ("TLP:AMBER+STRICT", "TLP:RED"):
                assert job.value not in asked, job.kind
        assert crafted["green+amber"].value in asked
        for name, tlp in (("green+red", "TLP:RED"), ("clear+amber+strict", "TLP:AMBER+STRICT")):
            wid = crafted[name].work_id
            assert (
                wid
                and world.platform.works[wid].messages[-1]
                == f"{tlp} is above the max TLP TLP:AMBER: not sent to LastInfoSec"
            )

        # At the end the key is revoked: a 401, fatal.
        world.lis.config.api_key = "rotated-key"
        world.lis.config.error_rate = 0.0
        last = _with_markings(world, world.producer.next_index(), "GREEN")  # sure to be looked up
        await world.producer.publish(last)
        assert await poll(lambda: run.task.done(), 30)
        assert run.task.result() == EXIT_FATAL and app.fatal and "HTTP 401" in app.fatal
        metrics = app.metrics.render().decode()

    records = caplog.records
    assert any(r.levelno == logging.DEBUG and r.name.startswith("lis_async") for r in records)
    assert any(r.name.startswith(("aiohttp", "aio_pika", "aiormq", "urllib3")) for r in records)
    assert any("api_key=***" in r.getMessage() for r in records)  # request URLs logged, redacted
    texts = [caplog.text, metrics]
    texts += [r.getMessage() for r in records]
    texts += [repr(r.args) for r in records]
    for w in world.platform.works.values():
        texts += w.messages
        texts += [str(e) for e in w.errors]
    for secret in (LIS_KEY, OPENCTI_TOKEN):
        leaks = [t[:300] for t in texts if secret in t]
        assert not leaks, (secret, leaks[:3])
