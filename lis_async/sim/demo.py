"""``lis-async demo``: the worker against a simulated OpenCTI and LastInfoSec on the local RabbitMQ.

Everything runs in this process on one event loop: the platform double, the LastInfoSec double,
the OpenCTI worker emulation, the job producer, and the real worker (:class:`lis_async.app.App`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from collections.abc import Sequence

from lis_async.app import App
from lis_async.broker.connection import ExpectedReconnection
from lis_async.ops.logs import setup_logging
from lis_async.settings.model import load_settings
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.producer import ProducedJob
from lis_async.sim.world import SimWorld, rabbit_reachable

RABBIT_HELP = (
    "RabbitMQ is not reachable at {url}.\n"
    "Start it first, for example:\n"
    "  rabbitmq-server -detached                      (Debian/Ubuntu package rabbitmq-server)\n"
    "  docker run -d -p 5672:5672 rabbitmq:3-management\n"
    "then run `lis-async demo` again (or pass --amqp-url)."
)


async def run_demo(jobs: int = 300, latency_s: float = 0.15, amqp_url: str | None = None) -> int:
    url = amqp_url or "amqp://guest:guest@127.0.0.1:5672/"
    if not await rabbit_reachable(url):
        print(RABBIT_HELP.format(url=url.split("@")[-1]), file=sys.stderr)
        return 1
    setup_logging("warning", False, filters=(ExpectedReconnection(),))
    logging.getLogger("lis_async.sim").setLevel(logging.ERROR)
    print(f"lis-async demo: {jobs} enrichment jobs, LastInfoSec latency {latency_s * 1000:.0f} ms")
    lis_config = LisSimConfig(latency_s=latency_s, jitter_s=latency_s / 5, bundle_size=12)
    async with SimWorld(amqp_url=url, lis_config=lis_config) as world:
        env = world.env() | {
            "CONNECTOR_LOG_LEVEL": "warning",
            "CONNECTOR_HEALTH_PORT": "0",
            "CONNECTOR_JOBS_IN_FLIGHT": "64",
            "LASTINFOSEC_CONCURRENCY": "64",
            "LASTINFOSEC_RATE_PER_S": "500",
            "CONNECTOR_SHUTDOWN_TIMEOUT_S": "10",
        }
        app = App(load_settings(env=env))
        started = time.monotonic()
        try:
            run = await app.start_in_background()
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        await world.start_worker_emulation()
        produced = await world.producer.publish_many(jobs)
        hostile = [world.producer.make_hostile(name) for name in ("not_json", "wrong_types")]
        for job in hostile:
            await world.producer.publish(job)
        work_ids = [j.work_id for j in produced if j.work_id]
        playbooks = sum(1 for j in produced if j.playbook)
        done = await world.platform.wait_works(work_ids, timeout=max(60.0, jobs * 0.2))
        deadline = time.monotonic() + 30
        # The platform double records playbook answers in a list (no event to wait on).
        while len(world.platform.playbook_calls) < playbooks and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        app.request_stop()
        await run
        _print_report(app, world, produced, len(hostile), work_ids, playbooks, elapsed, done)
        return 0 if done else 1


def _print_report(
    app: App,
    world: SimWorld,
    produced: Sequence[ProducedJob],
    hostile: int,
    work_ids: Sequence[str],
    playbooks: int,
    elapsed: float,
    done: bool,
) -> None:
    registry = app.metrics.registry
    outcomes = collections.Counter(
        {
            o: int(registry.get_sample_value("lis_jobs_total", {"outcome": o}) or 0)
            for o in ("enriched", "not_found", "skipped", "failed", "invalid", "dropped")
        }
    )
    works = [world.platform.works[w] for w in work_ids]
    complete = sum(1 for w in works if w.status == "complete")
    objects = int(registry.get_sample_value("lis_objects_published_total") or 0)
    pushes = int(registry.get_sample_value("lis_push_messages_total") or 0)
    print()
    print(f"  jobs published        {len(produced)} (+{hostile} malformed bodies)")
    print(f"  works completed       {complete}/{len(works)}" + ("" if done else "  (timed out)"))
    print(f"  playbook answers      {len(world.platform.playbook_calls)}/{playbooks}")
    print("  outcomes              " + ", ".join(f"{k} {v}" for k, v in outcomes.items() if v))
    print(f"  push messages         {pushes}, one STIX object each ({objects} objects)")
    print(f"  LastInfoSec requests  {world.lis.stats.total}")
    print(f"  time                  {elapsed:.1f} s ({len(produced) / elapsed:.0f} jobs/s)")
