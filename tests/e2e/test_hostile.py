"""Bad input, for real: hostile listen-queue bodies, and LastInfoSec answers that are not what
they should be (non-JSON, truncated, oversized, wrong shapes, invalid STIX, an invalid key)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import orjson
import pytest
from pycti import Malware

from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.producer import HOSTILE_KINDS
from lis_async.sim.world import SimWorld
from tests.helpers import (
    FAST_ENV,
    LIGHT_WORKER,
    QUIET_PRODUCER,
    jobs_queued,
    log_records,
    poll,
    ready_count,
    start_worker_process,
    stop_async,
    work_ids,
    worker_log,
    world_with_worker,
)

pytestmark = [pytest.mark.rabbitmq]

LIS_PREFIXES = ("/v2/stix21/search_hash/", "/v2/stix21/search_host/")

LIS_KEY = "hostile-KEY-91f0c4-never-shown"
QUERY = "?api_key=***&platform=opencti"
# Malformed for the producer, accepted by the parser: the applicant id is optional, and a
# stix_entity sent as an object instead of a JSON string is used as it is.
LENIENT = frozenset({"missing_applicant_id", "stix_entity_object"})


def jobs_handled(app: Any) -> int:
    """Bodies the worker settled, all outcomes together (the app's job counter)."""
    return int(
        sum(
            s.value
            for m in app.metrics.jobs.collect()
            for s in m.samples
            if s.name == "lis_jobs_total"
        )
    )


async def test_every_hostile_body_is_settled_once_without_crash_or_path_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lis_async")
    lis = LisSimConfig(api_key=LIS_KEY, known_share=0.5, bundle_size=5)
    async with world_with_worker(lis=lis, worker_options=LIGHT_WORKER) as run:
        world, app = run.world, run.app
        hostile = [world.producer.make_hostile(kind) for kind in HOSTILE_KINDS]
        control = next(j.value for j in hostile if j.kind == "control_chars")
        assert control
        for job in hostile:
            await world.producer.publish(job)

        # Each body settled exactly once: no crash, no requeue loop.
        assert await poll(lambda: jobs_handled(app) >= len(hostile), 60), jobs_handled(app)
        consumer = app.consumer
        assert consumer is not None and await poll(lambda: consumer.in_flight == 0, 10)
        # A bounded look for a redelivery loop: a quiet period that must stay quiet, not a wait
        # for a result (a loaded machine can only make it see less, never fail it).
        await asyncio.sleep(1.0)
        assert jobs_handled(app) == len(hostile)
        assert await ready_count(world) == 0
        assert not run.task.done() and consumer.accepting and app.fatal is None

        # One clear log line per body, naming its outcome.
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "lis_async.pipeline" and r.getMessage().startswith("job work=")
        ]
        assert len(lines) == len(hostile), lines
        invalid = {j.kind for j in hostile if j.malformed} - LENIENT | {"very_long_value"}
        assert sum("outcome=invalid" in line for line in lines) == len(invalid)
        # A value cannot forge log lines or send terminal escapes.
        assert not any(c in r.getMessage() for r in caplog.records for c in "\r\n\x00\x1b")
        assert any("srv01.corp.example\\r\\nX-Injected" in line for line in lines)

        # Every readable work id got its work settled (unknown_work: the platform has none).
        for job in hostile:
            if job.work_id is None:
                continue
            w = world.platform.works.get(job.work_id)
            if job.kind == "unknown_work":
                assert w is None and f"work {job.work_id} is no longer alive" in caplog.text
                continue
            assert w is not None and w.processed_time is not None, job.kind
            if job.kind in invalid:
                assert w.in_error and w.errors[-1]["message"].startswith(
                    "Invalid enrichment job: "
                ), (job.kind, w.errors)
            else:
                assert not w.in_error and w.messages[-1], (job.kind, w.errors)

        # LastInfoSec saw only the two lookup endpoints, each value in ONE encoded path segment.
        stats = world.lis.stats
        assert "other" not in stats.by_endpoint, stats.by_endpoint
        assert stats.paths, "no lookup reached LastInfoSec"
        for path in stats.paths:
            prefix = next((p for p in LIS_PREFIXES if path.startswith(p)), None)
            assert prefix is not None, path
            segment, query = path[len(prefix) :].split("?", 1)
            assert "/" not in segment and "#" not in segment and segment not in ("", ".", ".."), (
                path
            )
            assert "?" + query == QUERY, path
        values = {v for v in stats.values if v}
        # Values that are no host name or hash are not sent at all: docs/security.md,
        # "Values checked before they are sent".
        refused = {"../../v2/admin?x=1#", "../../../v2/stix21/search_host/evil.com?x=#"}
        assert not values & (refused | {control.strip()}), values


# ------------------------------------------------------------------------------------------
# LastInfoSec answers that are not what they should be

T = "2026-10-14T08:12:03.000Z"
GOOD_MALWARE = {
    "type": "malware",
    "spec_version": "2.1",
    "id": "malware--6a1f0e1c-3c1b-4f2e-9b7a-1c2d3e4f5a6b",
    "created": T,
    "modified": T,
    "name": "Good",
    "is_family": True,
}
NO_ID = {
    "type": "malware",
    "spec_version": "2.1",
    "created": T,
    "modified": T,
    "name": "No id",
    "is_family": True,
}
NO_TYPE = {"id": "malware--6a1f0e1c-3c1b-4f2e-9b7a-1c2d3e4f5a6c", "name": "No type"}
INT_ID = {"type": "malware", "id": 12345, "name": "Int id"}
NO_PATTERN = {
    "type": "indicator",
    "spec_version": "2.1",
    "id": "indicator--6a1f0e1c-3c1b-4f2e-9b7a-1c2d3e4f5a6d",
    "created": T,
    "modified": T,
    "valid_from": T,
}
BAD_ID = {
    "type": "malware",
    "spec_version": "2.1",
    "id": "malware--not-a-uuid",
    "created": T,
    "modified": T,
    "name": "Bad id",
    "is_family": True,
}
CUSTOM = {
    "type": "x-weird",
    "spec_version": "2.1",
    "id": "x-weird--6a1f0e1c-3c1b-4f2e-9b7a-1c2d3e4f5a6e",
}


def _bundles(*objects: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "message": [
                {
                    "type": "bundle",
                    "id": "bundle--6a1f0e1c-3c1b-4f2e-9b7a-1c2d3e4f5a60",
                    "objects": list(objects),
                }
            ]
        }
    )


VALID = _bundles(GOOD_MALWARE)
CAP = 64 * 1024

# name -> (body override, what the work's error says; None: the work is enriched)
ANSWERS: dict[str, tuple[tuple[int, bytes, str], str | None]] = {
    "html": (
        (200, b"<html><body>Bad gateway</body></html>", "text/html"),
        "answer is not valid JSON",
    ),
    "truncated": ((200, VALID[: len(VALID) // 2], "application/json"), "answer is not valid JSON"),
    "empty_body": ((200, b"", "application/json"), "answer is not valid JSON"),
    "over_the_cap": (
        (200, b'{"message":[' + b" " * (2 * 1024 * 1024) + b"]}", "application/json"),
        f"answer is larger than {CAP} bytes",
    ),
    "object_not_bundles": ((200, b'{"foo": 1}', "application/json"), "unexpected shape"),
    "json_string": ((200, b'"bundles"', "application/json"), "unexpected shape"),
    "json_number": ((200, b"42", "application/json"), "unexpected shape"),
    "message_object": (
        (200, b'{"message": {"objects": []}}', "application/json"),
        "unexpected shape",
    ),
    "message_text": (
        (200, b'{"message": "temporary hiccup"}', "application/json"),
        "answered a text instead of bundles",
    ),
    "list_of_numbers": (
        (200, b"[1, 2, 3]", "application/json"),
        "holds 3 item(s) but no STIX bundle",
    ),
    "objects_not_a_list": (
        (200, b'[{"type": "bundle", "objects": "x"}]', "application/json"),
        "no STIX bundle",
    ),
    # Objects OpenCTI cannot import (no id or type, an id that is not `<type>--<uuid>`, a ref
    # that is not an id) are dropped; the rest is pushed as is (the OpenCTI worker reports what
    # it cannot import on the work; it rejects nothing).
    "unroutable_ref": (
        (200, _bundles(GOOD_MALWARE | {"created_by_ref": 7}), "application/json"),
        None,
    ),
    "invalid_stix_objects": (
        (
            200,
            _bundles(GOOD_MALWARE, NO_ID, NO_TYPE, INT_ID, NO_PATTERN, BAD_ID, CUSTOM),
            "application/json",
        ),
        None,
    ),
}


@pytest.mark.slow
async def test_bad_lastinfosec_answers_fail_the_work_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lis_async")
    env = {"LASTINFOSEC_MAX_ANSWER_BYTES": str(CAP), "LASTINFOSEC_RETRY_BUDGET_S": "1"}
    lis = LisSimConfig(api_key=LIS_KEY)
    async with world_with_worker(env=env, lis=lis, producer_options=QUIET_PRODUCER) as run:
        world, app = run.world, run.app
        for name, (override, error) in ANSWERS.items():
            world.lis.config.body_override = override
            jobs = await world.producer.publish_many(2, kind="manual", entity_type="Domain-Name")
            works = work_ids(jobs)
            assert await world.platform.wait_works(works, timeout=30), name
            assert await world.worker.wait_idle(timeout=30)
            for wid in works:
                w = world.platform.works[wid]
                if error is None:
                    assert not w.in_error and w.expected == w.processed > 0, (name, w)
                    continue
                assert w.in_error, (name, w.messages)
                message = w.errors[-1]["message"]
                assert error in message and LIS_KEY not in message, (name, message)
                assert message.startswith(
                    ("LastInfoSec lookup failed: ", "Cannot build a STIX bundle")
                ), message
            assert app.fatal is None and app.consumer is not None and app.consumer.accepting, name

        # Nothing we pushed was rejected by the OpenCTI worker, and nothing without an id or a
        # type went out.
        assert not world.worker.rejections
        pushed = [o for objs in world.worker.objects_by_work.values() for o in objs]
        assert pushed and all(
            isinstance(o.get("id"), str) and isinstance(o.get("type"), str) for o in pushed
        )
        ids = {o["id"] for o in pushed}
        good_id = Malware.generate_id(GOOD_MALWARE["name"])  # ids derived from content
        assert good_id in ids and NO_TYPE["id"] not in ids and CUSTOM["id"] not in ids
        assert not any(o.get("name") in ("No id", "Bad id") for o in pushed)
        assert all(isinstance(o.get("created_by_ref", ""), str) for o in pushed)
        assert LIS_KEY not in caplog.text


def processed(world: SimWorld, works: list[str]) -> int:
    return sum(world.platform.works[w].processed_time is not None for w in works)


@pytest.mark.slow
async def test_invalid_key_mid_run_stops_the_worker_with_exit_3_and_keeps_the_queue() -> None:
    lis = LisSimConfig(latency_s=0.2, known_share=1.0, bundle_size=5)
    async with SimWorld(
        lis_config=lis, producer_options=QUIET_PRODUCER, worker_options=LIGHT_WORKER
    ) as world:
        env = world.env() | FAST_ENV | {"CONNECTOR_JOBS_IN_FLIGHT": "16"}
        proc = start_worker_process(env)
        try:
            assert await world.wait_registration(timeout=30)
            await world.start_worker_emulation()
            jobs = await world.producer.publish_many(300, kind="manual")
            works = work_ids(jobs)
            assert await poll(lambda: processed(world, works) >= 20 or proc.poll() is not None, 60)
            world.lis.config.invalid_key_answer = True  # the key expires mid-run
            code = await asyncio.to_thread(proc.wait, 60)
        finally:
            await stop_async(proc, signal.SIGKILL)
        log_text = worker_log(proc)
        assert code == 3, log_text[-3000:]
        assert any(
            r["level"] == "CRITICAL"
            and r["name"] == "lis_async.app"
            and r["message"].startswith(
                "FATAL, the worker stops taking jobs: LastInfoSec rejected the API key"
            )
            for r in log_records(log_text)
        ), log_text[-3000:]
        assert world.lis_api_key not in log_text

        # It did not burn the queue into errors: no work in error, most jobs still queued.
        assert not [w for w in works if world.platform.works[w].in_error]
        ready, unacked = await jobs_queued(world)
        assert unacked == 0 and ready == len(works) - processed(world, works)
        assert ready > len(works) // 2
