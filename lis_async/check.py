"""``lis-async check``: settings are valid (checked by the CLI), then reach OpenCTI, RabbitMQ and
LastInfoSec once each and print one PASS/FAIL line per check. Exit code 0 only if all pass."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING

from lis_async.enrichment.job import Observable
from lis_async.errors import LisError, PlatformError
from lis_async.lastinfosec import LastInfoSecClient
from lis_async.lastinfosec.budget import DailyBudget, file_budget
from lis_async.platform.client import Platform, Registration
from lis_async.redact import mask_url, redact
from lis_async.settings.model import Settings

if TYPE_CHECKING:
    from lis_async.cluster.link import RedisLink

# A value LastInfoSec is asked about: the EICAR test file's SHA-256 (harmless, well known).
PROBE_HASH = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"

Report = Callable[[bool, str, str], None]


async def run_check(settings: Settings, out: Callable[[str], None] = print) -> int:
    failures = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        # redact: an error text may quote a URL or a secret (the settings' are registered)
        out(redact(f"{'PASS' if ok else 'FAIL'} {what}: {detail}"))

    reg = await _check_opencti(settings, report)
    await _check_rabbitmq(reg, report)
    await _check_lastinfosec(settings, report)
    if settings.redis.url is not None:
        await _check_redis(settings, report)
    return 0 if failures == 0 else 1


async def _check_opencti(settings: Settings, report: Report) -> Registration | None:
    platform = Platform(settings)
    url = mask_url(settings.opencti.url)  # it may carry credentials
    try:
        await platform.start()
        version = await platform.about()
        reg = await platform.register()
        report(True, "opencti", f"{url} (version {version}), connector registered")
        return reg
    except PlatformError as exc:
        report(False, "opencti", f"{url}: {exc}")
        return None
    finally:
        await platform.close()


async def _check_rabbitmq(reg: Registration | None, report: Report) -> None:
    if reg is None:
        report(False, "rabbitmq", "skipped: the RabbitMQ settings come from the registration")
        return
    from lis_async.broker.connection import connect

    where = f"{reg.amqp.host}:{reg.amqp.port}"
    try:
        conn = await connect(reg.amqp, "lis-async check", timeout_s=10)
        try:
            channel = await conn.channel()
            await channel.get_queue(reg.listen, ensure=True)  # passive: never re-declares
        finally:
            await conn.close()
        report(True, "rabbitmq", f"{where}, queue {reg.listen} found")
    except Exception as exc:
        text = redact(str(exc), [reg.amqp.password])
        report(False, "rabbitmq", f"{where}: {type(exc).__name__} {text}"[:300])


async def _check_lastinfosec(settings: Settings, report: Report) -> None:
    probe = Observable(
        entity_type="StixFile",
        stix_type="file",
        stix_id="file--probe",
        value=None,
        hashes=MappingProxyType({"SHA-256": PROBE_HASH}),
        marking_refs=(),
        granted_refs=None,
        stix=MappingProxyType({}),
    )
    once = settings.lastinfosec.model_copy(update={"retry_budget_s": 0, "cache_size": 0})
    link, budget = _daily_budget(settings)
    client = LastInfoSecClient(once, proxy=settings.lastinfosec_proxy, budget=budget)
    base = mask_url(settings.lastinfosec.base_url)
    try:
        await client.start()
        # urgent: an operator asks; the probe is counted in the daily budget like any request
        result = await client.lookup(probe, urgent=True)
        found = "known" if result.found else "not found (the key works)"
        report(True, "lastinfosec", f"{base}: probe hash {found}")
    except LisError as exc:
        report(False, "lastinfosec", f"{base}: {exc}")
    finally:
        await client.close()
        if link is not None:
            await link.close()


def _daily_budget(settings: Settings) -> tuple[RedisLink | None, DailyBudget | None]:
    """The daily budget the probe counts in (blocks of one: the check wastes nothing), and the
    Redis link it uses in cluster mode."""
    lis = settings.lastinfosec
    if lis.daily_budget is None:
        return None, None
    if settings.redis.url is None:
        return None, file_budget(lis, settings.connector.id, block=1)
    from lis_async.cluster.budget import cluster_budget
    from lis_async.cluster.link import RedisLink

    link = RedisLink(settings)
    share = lis.daily_budget_urgent_share
    return link, cluster_budget(link, lis.daily_budget, share, lis.rate_per_s, block=1)


async def _check_redis(settings: Settings, report: Report) -> None:
    from lis_async.cluster.link import RedisLink

    link = RedisLink(settings)
    try:
        version = await link.check()
        report(True, "redis", f"{link.where} (version {version}), key prefix {link.prefix}")
    except RuntimeError as exc:
        report(False, "redis", f"{link.where}: {exc}")
    finally:
        await link.close()
