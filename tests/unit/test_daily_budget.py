"""The daily LastInfoSec budget without Redis: the real client against the LastInfoSec double
on loopback (which counts what arrives), the count kept in a state file, a UTC day the test
controls. The Redis ledger is tested in tests/integration/test_daily_budget_cluster.py."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from lis_async.app import App
from lis_async.check import _check_lastinfosec
from lis_async.enrichment.pipeline import Outcome
from lis_async.errors import LisBudgetSpent
from lis_async.lastinfosec import LastInfoSecClient
from lis_async.lastinfosec.budget import BlockBudget, FileLedger, block_size, default_state_file
from lis_async.ops.gauges import BudgetGauges
from lis_async.ops.metrics import Metrics
from lis_async.settings.model import LastInfoSecSettings, load_settings
from lis_async.sim.lastinfosec import LastInfoSecSim, LisSimConfig
from tests.fakes import SPENT, FakePlatform, Today, make_pipeline
from tests.helpers import OFFLINE_ENV, job_body


def lis_settings(base_url: str, **kw: Any) -> LastInfoSecSettings:
    values: dict[str, Any] = dict(
        api_key_cti="test-lis-key",
        base_url=base_url,
        allow_http=True,
        retry_budget_s=5.0,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        rate_per_s=1e6,
        cache_size=0,  # every lookup asks LastInfoSec unless a test says otherwise
    )
    values.update(kw)
    return LastInfoSecSettings(**values)


def budget_at(
    path: Path, budget: int, share: float = 0.2, block: int = 3, day: Today | None = None
) -> BlockBudget:
    """A budget reading and writing ``path``, as a worker starting now builds it."""
    today = day or Today()
    return BlockBudget(FileLedger(path, day=today), budget, share, block, day=today)


def client(lis: LastInfoSecSim, budget: BlockBudget, **kw: Any) -> LastInfoSecClient:
    assert lis.base_url is not None
    return LastInfoSecClient(
        lis_settings(lis.base_url, **kw), trust_env=False, outage_probe_s=0.01, budget=budget
    )


async def spend_all(c: LastInfoSecClient, prefix: str, urgent: bool = False) -> int:
    """Lookups of fresh values until the budget refuses one; how many went through."""
    for n in range(1000):
        try:
            await c.lookup_value("search_host", f"{prefix}-{n}.example.com", urgent=urgent)
        except LisBudgetSpent as exc:
            assert str(exc) == SPENT
            return n
    raise AssertionError("the budget never ran out")


async def test_auto_jobs_stop_at_their_share_and_urgent_ones_get_the_rest(tmp_path: Path) -> None:
    state = tmp_path / "budget.json"
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        async with client(lis, budget_at(state, 10)) as c:  # auto: 8 of 10
            assert await spend_all(c, "auto") == 8
            assert lis.stats.total == 8
            assert await spend_all(c, "manual", urgent=True) == 2
            assert await spend_all(c, "auto-again") == 0
        assert lis.stats.total == 10


async def test_the_budget_holds_across_a_restart_and_a_crash_wastes_at_most_a_block(
    tmp_path: Path,
) -> None:
    state = tmp_path / "budget.json"
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        async with client(lis, budget_at(state, 10)) as c:
            for n in range(4):  # two blocks of 3 reserved, 4 requests spent, then a "crash"
                await c.lookup_value("search_host", f"first-{n}.example.com")
        assert orjson.loads(state.read_bytes()) == {"day": "2026-12-07", "used": 6, "auto": 6}
        async with client(lis, budget_at(state, 10)) as c:  # restarted: same file
            assert await spend_all(c, "second") == 2  # 8 - 6 reserved before the restart
            assert await spend_all(c, "manual", urgent=True) == 2
        assert lis.stats.total == 8  # the crash wasted 2 (one block's rest), never more than 10
        async with client(lis, budget_at(state, 10)) as c:
            assert await spend_all(c, "third", urgent=True) == 0


async def test_two_workers_sharing_the_file_count_together(tmp_path: Path) -> None:
    state = tmp_path / "budget.json"
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        async with (
            client(lis, budget_at(state, 10, block=2)) as a,
            client(lis, budget_at(state, 10, block=2)) as b,
        ):
            sent = {"a": 0, "b": 0}
            for i in range(20):  # one lookup each in turn: each reserves blocks of 2
                name, c = ("a", a) if i % 2 else ("b", b)
                try:
                    await c.lookup_value("search_host", f"w{i}.example.com")
                    sent[name] += 1
                except LisBudgetSpent:
                    pass
            assert sent == {"a": 4, "b": 4}  # the auto part (8), no block reserved twice
            assert lis.stats.total == 8
            assert await spend_all(a, "manual", urgent=True) == 2
            assert await spend_all(b, "manual-b", urgent=True) == 0
        assert lis.stats.total == 10


async def test_the_next_utc_day_starts_afresh(tmp_path: Path) -> None:
    today = Today()
    budget = budget_at(tmp_path / "budget.json", 5, share=0.0, block=2, day=today)
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        async with client(lis, budget) as c:
            assert await spend_all(c, "day1") == 5
            assert budget.remaining() == (0, 0)
            today.day += timedelta(days=1)
            assert budget.remaining() == (5, 5)
            assert await spend_all(c, "day2") == 5
        assert lis.stats.total == 10
    state = orjson.loads((tmp_path / "budget.json").read_bytes())
    assert state == {"day": "2026-12-08", "used": 5, "auto": 5}


async def test_every_retry_is_a_request_that_counts(tmp_path: Path) -> None:
    """LastInfoSec counts arrivals: two 429s and the answer would be three requests."""
    config = LisSimConfig(known_share=1.0, force_429_count=2, retry_after_s=None)
    async with LastInfoSecSim(config) as lis:
        async with client(lis, budget_at(tmp_path / "b.json", 2, share=0.0, block=1)) as c:
            with pytest.raises(LisBudgetSpent):
                await c.lookup_value("search_host", "throttled.example.com")
        assert lis.stats.total == 2
        assert lis.stats.by_status == {429: 2}


async def test_a_cache_hit_spends_nothing(tmp_path: Path) -> None:
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        budget = budget_at(tmp_path / "b.json", 1, share=0.0, block=1)
        async with client(lis, budget, cache_size=100) as c:
            for _ in range(3):
                found = await c.lookup_value("search_host", "cached.example.com")
                assert found.found
            assert c.stats.cache_hits == 2
        assert lis.stats.total == 1 and budget.spent == 1


async def test_a_state_file_that_is_not_ours_counts_as_spent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "budget.json"
    state.write_text('{"day": "2026-12-07", "used": "0", "auto": -1}')
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        with caplog.at_level(logging.WARNING, "lis_async.lastinfosec"):
            budget = budget_at(state, 10)
        assert "is not a budget tally" in caplog.text
        async with client(lis, budget) as c:
            assert await spend_all(c, "auto") == 0
            assert await spend_all(c, "manual", urgent=True) == 0
        assert lis.stats.total == 0


async def test_an_unwritable_state_file_is_said_at_start_and_counted_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "not-a-dir").write_text("")
    with caplog.at_level(logging.WARNING, "lis_async.lastinfosec"):
        budget = budget_at(tmp_path / "not-a-dir" / "budget.json", 4, share=0.0, block=3)
    assert "cannot be written" in caplog.text and "counted in memory" in caplog.text
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        async with client(lis, budget) as c:
            assert await spend_all(c, "mem") == 4
        assert lis.stats.total == 4


def test_blocks_are_a_second_of_the_rate_at_most_a_hundredth_of_the_budget() -> None:
    assert block_size(100_000, 10) == 10
    assert block_size(500, 10) == 5
    assert block_size(50, 10) == 1
    assert block_size(100_000, 0.5) == 1


def test_the_default_state_file_is_per_connector(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/var/lib/state")
    assert default_state_file("a/b") == Path("/var/lib/state/lis-async/daily-budget-a_b.json")


def test_the_settings_and_their_environment_names() -> None:
    s = load_settings(
        env={
            "OPENCTI_URL": "http://127.0.0.1:1",
            "OPENCTI_TOKEN": "t",
            "CONNECTOR_ID": "8a1f0c52-4d1e-4b7a-9a61-0b3c2d4e5f60",
            "CONFIG_LIS_APIKEY_CTI": "k",
            "LASTINFOSEC_DAILY_BUDGET": "5000",
            "LASTINFOSEC_DAILY_BUDGET_URGENT_SHARE": "0.25",
            "LASTINFOSEC_DAILY_BUDGET_FILE": "/data/budget.json",
        }
    )
    lis = s.lastinfosec
    assert (lis.daily_budget, lis.daily_budget_urgent_share) == (5000, 0.25)
    assert lis.daily_budget_file == "/data/budget.json"


async def test_the_worker_keeps_its_count_in_the_configured_file(tmp_path: Path) -> None:
    """App wiring without Redis: the budget's blocks go to LASTINFOSEC_DAILY_BUDGET_FILE."""
    state = tmp_path / "state" / "budget.json"
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        assert lis.base_url is not None
        env = OFFLINE_ENV | {
            "CONFIG_LIS_APIKEY_CTI": "test-lis-key",  # the double's
            "LASTINFOSEC_BASE_URL": lis.base_url,
            "LASTINFOSEC_ALLOW_HTTP": "true",
            "LASTINFOSEC_DAILY_BUDGET": "1000",
            "LASTINFOSEC_RATE_PER_S": "4",
            "LASTINFOSEC_DAILY_BUDGET_FILE": str(state),
        }
        app = App(load_settings(env=env))
        try:
            async with app._lastinfosec_client() as c:
                await c.lookup_value("search_host", "one.example.com")
        finally:
            await app.platform.close()
        assert lis.stats.total == 1
    # one block reserved: one second of the rate (4), below a hundredth of the budget (10)
    day = orjson.loads(state.read_bytes())
    assert (day["used"], day["auto"]) == (4, 4)


async def test_lis_async_check_counts_its_probe(tmp_path: Path) -> None:
    """The check's one request is counted (a block of one: it wastes nothing), and a spent
    budget is said rather than overspent."""
    state = tmp_path / "budget.json"
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        assert lis.base_url is not None
        env = OFFLINE_ENV | {
            "CONFIG_LIS_APIKEY_CTI": "test-lis-key",
            "LASTINFOSEC_BASE_URL": lis.base_url,
            "LASTINFOSEC_ALLOW_HTTP": "true",
            "LASTINFOSEC_DAILY_BUDGET": "1",
            "LASTINFOSEC_DAILY_BUDGET_FILE": str(state),
        }
        lines: list[tuple[bool, str]] = []
        for _ in range(2):
            await _check_lastinfosec(
                load_settings(env=env), lambda ok, _what, text: lines.append((ok, text))
            )
        assert lis.stats.total == 1
    assert lines[0][0] and not lines[1][0] and SPENT in lines[1][1]
    assert orjson.loads(state.read_bytes())["used"] == 1


async def test_the_gauges_show_what_is_left(tmp_path: Path) -> None:
    budget = budget_at(tmp_path / "b.json", 10, share=0.2, block=3)
    await budget.spend()  # one block of 3 reserved for auto jobs, one spent
    metrics = Metrics()
    metrics.add_collector(BudgetGauges(budget, metrics.name))
    text = metrics.render().decode()
    assert 'lis_daily_budget_remaining{share="auto"} 7.0' in text
    assert 'lis_daily_budget_remaining{share="urgent"} 9.0' in text
    assert 'lis_daily_budget_limit{share="auto"} 8.0' in text
    assert 'lis_daily_budget_limit{share="urgent"} 10.0' in text


# -- the pipeline: auto jobs past the budget complete at once -------------------------------


async def test_auto_jobs_past_the_budget_complete_at_once_not_in_error(tmp_path: Path) -> None:
    async with LastInfoSecSim(LisSimConfig(known_share=1.0)) as lis:
        budget = budget_at(tmp_path / "b.json", 2, share=0.5, block=1)  # auto: 1 of 2
        async with client(lis, budget) as c:
            platform = FakePlatform()
            pipeline, platform, _ = make_pipeline(c, platform)  # type: ignore[arg-type]
            first = await pipeline.handle(job_body("auto_create_domain_green.json"))
            assert first.outcome is Outcome.ENRICHED and lis.stats.total == 1
            second = await pipeline.handle(job_body("auto_create_domain_green.json"))
            assert (second.outcome, second.message) == (Outcome.SKIPPED, SPENT)
            assert platform.calls[-1][2:] == (SPENT, False)  # toProcessed, not in error
            assert lis.stats.total == 1  # nothing sent
            manual = await pipeline.handle(job_body("manual_stixfile_amber_shared.json"))
            assert manual.outcome is not Outcome.SKIPPED
            assert lis.stats.total == 2  # the manual job had the reserved share
