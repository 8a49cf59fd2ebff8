"""The worker end to end: a few hundred mixed jobs through the simulated world."""

from __future__ import annotations

import collections

import pytest

from lis_async.enrichment.job import STIX_EXT_OCTI, normalise_tlp
from lis_async.sim.lastinfosec import LisSimConfig
from tests.helpers import poll, world_with_worker

pytestmark = [pytest.mark.rabbitmq]


def _orgs(obj: dict) -> list[str]:
    ext = (obj.get("extensions") or {}).get(STIX_EXT_OCTI) or {}
    return list(ext.get("granted_refs") or obj.get("x_opencti_granted_refs") or [])


@pytest.mark.slow
async def test_mixed_jobs_end_to_end() -> None:
    async with world_with_worker(lis=LisSimConfig(latency_s=0.02, bundle_size=12)) as run:
        world = run.world
        produced = await world.producer.publish_many(300)
        hostile = [
            world.producer.make_hostile(k)
            for k in (
                "not_json",
                "not_utf8",
                "wrong_types",
                "missing_event",
                "path_traversal",
                "control_chars",
                "very_long_value",
                "huge_stix_entity",
                "unknown_entity_type",
            )
        ]
        for job in hostile:
            await world.producer.publish(job)
        works = [j.work_id for j in produced if j.work_id]
        hostile_works = [j.work_id for j in hostile if j.work_id]
        assert await world.platform.wait_works(works + hostile_works, timeout=120)
        playbooks = [j for j in produced if j.playbook]
        assert await poll(lambda: len(world.platform.playbook_calls) >= len(playbooks), 30), (
            len(world.platform.playbook_calls),
            len(playbooks),
        )
        assert await world.worker.wait_idle(timeout=30)
        consumer = run.app.consumer
        assert consumer is not None
        # Settled: a job's last platform call comes before its ack.
        assert await poll(lambda: consumer.in_flight == 0, 30), consumer.in_flight

        # Every work completed; expectations equal what was published and imported.
        by_work = collections.Counter(r.work_id for r in world.worker.messages)
        for job in produced:
            if not job.work_id:
                continue
            work = world.platform.works[job.work_id]
            assert work.status == "complete", (job.kind, work)
            assert work.expected == by_work.get(job.work_id, 0) == work.processed

        # Push messages decode like OpenCTI's worker and carry the job's ids.
        jobs_by_work = {j.work_id: j for j in produced + hostile if j.work_id}
        user = world.platform.config.connector_user_id
        assert world.worker.messages and not world.worker.rejections
        for rec in world.worker.messages:
            assert rec.work_id is not None and rec.bundle is not None
            job = jobs_by_work[rec.work_id]
            assert rec.applicant_id == user
            assert rec.draft_id == job.draft_id
            assert (
                rec.properties["delivery_mode"] == 2
                and rec.properties["content_encoding"] == "utf-8"
            )
            (obj,) = rec.bundle["objects"]
            assert not obj["id"].startswith("x-opencti-hostname")
            if job.granted_refs:  # organisation sharing reaches every pushed object
                assert set(job.granted_refs) <= set(_orgs(obj)), obj["id"]
            else:
                assert not _orgs(obj)

        # TLP above AMBER never reached LastInfoSec.
        asked = set(world.lis.stats.values)
        for job in produced:
            if normalise_tlp(job.tlp) in ("TLP:AMBER+STRICT", "TLP:RED") and job.value:
                assert job.value not in asked, job
        red = [j.work_id for j in produced if normalise_tlp(j.tlp) == "TLP:RED" and j.work_id]
        assert red and all("above the max TLP" in world.platform.works[w].messages[-1] for w in red)

        # Playbooks: one answer each, the whole bundle, nothing published for them.
        calls = collections.Counter(
            c["variables"]["step_id"] if "variables" in c else c.get("step_id")
            for c in world.platform.playbook_calls
        )
        assert len(world.platform.playbook_calls) == len(playbooks) and all(
            n == 1 for n in calls.values()
        )
        assert all(rec.work_id for rec in world.worker.messages)

        # Hostile bodies: acked (the listen queue is empty), works with an id ended in error.
        for job in hostile:
            if job.work_id and job.malformed:
                assert world.platform.works[job.work_id].in_error
        assert await run.stop() == 0
        purged = await world.purge()
        assert purged.get("listen", 0) == 0


async def test_same_job_twice_gives_the_same_object_ids() -> None:
    async with world_with_worker(lis=LisSimConfig(known_share=1.0)) as run:
        world = run.world
        job = world.producer.make_job(7, kind="manual", entity_type="Domain-Name")
        await world.producer.publish(job)
        assert job.work_id and await world.platform.wait_works([job.work_id], timeout=30)
        first = sorted(o["id"] for o in world.worker.objects_by_work[job.work_id])
        world.worker.objects_by_work.clear()
        await world.producer.publish(job)  # the platform's at-least-once redelivery
        assert await world.worker.wait_for(
            lambda w: len(w.objects_by_work.get(job.work_id or "", [])) >= len(first), timeout=30
        )
        second = sorted(o["id"] for o in world.worker.objects_by_work[job.work_id])
        assert first == second


async def test_jobs_really_run_concurrently() -> None:
    # 1 s lookups: 16 of the 32 jobs taken at once must reach LastInfoSec within a second of
    # each other, which holds even when a loaded machine spreads out their starts.
    lis = LisSimConfig(latency_s=1.0, known_share=1.0)
    async with world_with_worker(
        env={
            "CONNECTOR_JOBS_IN_FLIGHT": "32",
            "LASTINFOSEC_CONCURRENCY": "32",
            "LASTINFOSEC_CACHE_SIZE": "0",
        },
        lis=lis,
    ) as run:
        world = run.world
        produced = await world.producer.publish_many(64, kind="manual", entity_type="Domain-Name")
        assert await world.platform.wait_works(
            [j.work_id for j in produced if j.work_id], timeout=60
        )
        # Sequential processing would never have more than one request open at once.
        assert world.lis.stats.max_concurrent >= 16


# At-least-once across a SIGKILL is proven in test_faults.py
# (test_sigkill_mid_run_duplicates_only_jobs_in_flight).
