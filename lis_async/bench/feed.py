"""The simulated world of one phase, and how the phase's jobs are fed to the connector.

:func:`build_world` makes the world (OpenCTI platform double, LastInfoSec double, OpenCTI worker
emulation in its cheap mode, job producer) from the configuration; :func:`preregister` registers
the connector id in it, as a connector that ran before would be, so that the platform double
declares the queues before any job is published.

A :class:`Feed` says how the jobs reach the listen queue: :class:`Queued` publishes them all
before the connector starts, :class:`Paced` publishes them at a fixed rate while it runs,
:class:`Burst` publishes them all at once when the connectors consume the queue. A new
way of feeding a phase is a new :class:`Feed`; the phase runner only calls its two hooks.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp

from lis_async.bench.config import BenchConfig
from lis_async.bench.progress import Progress
from lis_async.bench.results import BenchError, Mode
from lis_async.sim.lastinfosec import LisSimConfig
from lis_async.sim.opencti import PlatformSimConfig
from lis_async.sim.world import SimWorld

REGISTER = (
    "mutation RegisterConnector($input: RegisterConnectorInput) "
    "{ registerConnector(input: $input) { id } }"
)
#: Queued jobs are published in batches of this size (one progress update each).
PUBLISH_CHUNK = 500
#: A burst is published in batches of this size, while the connectors run.
BURST_CHUNK = 25


def build_world(
    cfg: BenchConfig, repeat_share: float = 0.0, producer: Mapping[str, Any] | None = None
) -> SimWorld:
    """A fresh world (a new connector id, hence fresh queues) shaped by the options;
    ``repeat_share`` of its jobs carry the observable of an earlier job; ``producer``: other
    :class:`~lis_async.sim.producer.JobProducer` options (the job mix)."""
    return SimWorld(
        platform_config=PlatformSimConfig(
            amqp_url=cfg.amqp_url, latency_s=cfg.platform_latency, max_recorded_requests=1000
        ),
        lis_config=LisSimConfig(
            latency_s=cfg.latency, jitter_s=cfg.jitter, bundle_size=cfg.bundle_size
        ),
        amqp_url=cfg.amqp_url,
        seed=cfg.seed,
        # Playbook jobs have no work to time; everything else is the producer's mix.
        producer_options={"playbook_share": 0.0, "repeat_share": repeat_share}
        | dict(producer or {}),
        # Cheap mode: no stix2 validation, nothing recorded (the simulator must not be the
        # bottleneck).
        worker_options={"validate": False, "max_records": 0, "prefetch_count": 256},
    )


async def preregister(world: SimWorld) -> None:
    """Register the connector id so that the platform double declares its queues."""
    connector_input = {
        "id": world.connector_id,
        "name": world.connector_name,
        "type": "INTERNAL_ENRICHMENT",
        "scope": world.scope.split(","),
        "auto": False,
        "only_contextual": False,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            world.opencti_url + "/graphql",
            json={"query": REGISTER, "variables": {"input": connector_input}},
            headers={"Authorization": f"Bearer {world.opencti_token}"},
        ) as resp,
    ):
        body = await resp.json()
    if body.get("errors"):
        raise BenchError(f"pre-registration failed: {body['errors']}")


@dataclass
class Jobs:
    """The jobs a phase waits for."""

    #: how many jobs the phase waits for
    total: int = 0
    #: their work ids, in publishing order (filled while publishing)
    work_ids: list[str] = field(default_factory=list)
    #: when each job published while the connector runs was published (epoch seconds)
    sent_at: dict[str, float] = field(default_factory=dict)


class Feed(ABC):
    """How a phase's jobs reach the connector's listen queue."""

    mode: ClassVar[Mode]
    #: True: jobs wait in the queue when the connector starts, and the connector is ready once
    #: it took the first one; False: it is ready once it consumes its queue.
    backlog: ClassVar[bool]

    @property
    def offered_jobs_per_s(self) -> float | None:
        """The publishing rate of a paced feed (None: everything published at once)."""
        return None

    @abstractmethod
    async def before_start(
        self, world: SimWorld, jobs: Jobs, progress: Progress, label: str
    ) -> None:
        """Before the connector starts: publish what must be waiting, set ``jobs.total``."""

    def while_running(self, world: SimWorld, jobs: Jobs) -> Coroutine[Any, Any, None] | None:
        """What to publish once the connector is ready and measured (None: nothing)."""
        return None


@dataclass(frozen=True)
class Queued(Feed):
    """``jobs`` jobs published before the connector starts (throughput phases)."""

    mode: ClassVar[Mode] = "queued"
    backlog: ClassVar[bool] = True
    jobs: int

    async def before_start(
        self, world: SimWorld, jobs: Jobs, progress: Progress, label: str
    ) -> None:
        for start in range(0, self.jobs, PUBLISH_CHUNK):
            batch = await world.producer.publish_many(min(PUBLISH_CHUNK, self.jobs - start))
            jobs.work_ids.extend(j.work_id for j in batch if j.work_id)
            progress.update(f"{label:<16} publishing {len(jobs.work_ids)}/{self.jobs} jobs")
        jobs.total = len(jobs.work_ids)


@dataclass(frozen=True)
class Paced(Feed):
    """``rate`` jobs/s published for ``seconds`` while the connector runs (latency phase)."""

    mode: ClassVar[Mode] = "paced"
    backlog: ClassVar[bool] = False
    rate: float
    seconds: float

    @property
    def offered_jobs_per_s(self) -> float | None:
        return self.rate

    async def before_start(
        self, world: SimWorld, jobs: Jobs, progress: Progress, label: str
    ) -> None:
        jobs.total = max(1, round(self.rate * self.seconds))

    def while_running(self, world: SimWorld, jobs: Jobs) -> Coroutine[Any, Any, None] | None:
        return self._pace(world, jobs)

    async def _pace(self, world: SimWorld, jobs: Jobs) -> None:
        loop = asyncio.get_running_loop()
        producer = world.producer
        pending: set[asyncio.Task[None]] = set()
        t0 = loop.time()
        for i in range(jobs.total):
            delay = t0 + i / self.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            job = producer.make_job(producer.next_index())
            assert job.work_id is not None  # no playbook jobs in the bench mix
            jobs.sent_at[job.work_id] = time.time()
            jobs.work_ids.append(job.work_id)
            task = asyncio.create_task(producer.publish(job))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)


@dataclass(frozen=True)
class Burst(Feed):
    """``jobs`` jobs published at once as soon as the connectors consume their queue (replica
    phases: every replica is up, and measured, before the first job, and they share the
    backlog from the start). Publishing outpaces the connectors, so the backlog builds at once.
    """

    mode: ClassVar[Mode] = "burst"
    backlog: ClassVar[bool] = False
    jobs: int

    async def before_start(
        self, world: SimWorld, jobs: Jobs, progress: Progress, label: str
    ) -> None:
        jobs.total = self.jobs

    def while_running(self, world: SimWorld, jobs: Jobs) -> Coroutine[Any, Any, None] | None:
        return self._publish(world, jobs)

    async def _publish(self, world: SimWorld, jobs: Jobs) -> None:
        # Small batches: the connectors are already at work, and the OpenCTI double and the
        # worker emulation share this event loop (batches of 500 held it for over 100 ms).
        for start in range(0, self.jobs, BURST_CHUNK):
            batch = await world.producer.publish_many(min(BURST_CHUNK, self.jobs - start))
            jobs.work_ids.extend(j.work_id for j in batch if j.work_id)
            await asyncio.sleep(0)
