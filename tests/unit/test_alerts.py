"""The Prometheus alerting rules shipped in docs/prometheus (issue #12).

With promtool on PATH (`apt-get install prometheus`; .ci/run installs it when it can), the rules
are checked and their unit tests (lis-async-alerts*.test.yml) run. Without it those two tests skip,
and the checks that need no promtool still run: every rule is complete (expr, for, severity,
summary, description), every metric name in an expression is one the worker really exports (as
the worker's own registry reports them), and the promtool tests cover each alert both ways.
"""

from __future__ import annotations

import asyncio
import functools
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from lis_async.app import App
from lis_async.lastinfosec import LisStats
from lis_async.ops.metrics import ClusterCollector
from lis_async.settings.model import load_settings
from tests.helpers import OFFLINE_ENV

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "docs" / "prometheus"
RULES = PROM_DIR / "lis-async-alerts.yml"
#: promtool's unit tests: the minutes-long cases, and the days-long ones (evaluated hourly).
RULE_TESTS = (PROM_DIR / "lis-async-alerts.test.yml", PROM_DIR / "lis-async-alerts-7d.test.yml")

# Series Prometheus itself writes for every target.
PROMETHEUS_METRICS = frozenset({"up"})

ALERTS = {
    "LisAsyncBacklogGrowing",
    "LisAsyncLastInfoSecThrottled",
    "LisAsyncWorksInError",
    "LisAsyncDegraded",
    "LisAsyncNoHeartbeat",
    "LisAsyncBackpressure",
    "LisAsyncDown",
    "LisAsyncDailyBudgetLow",
}
BASE_ENV = OFFLINE_ENV | {"CONNECTOR_HEALTH_PORT": "0"}  # no server: only the registry


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    (group,) = doc["groups"]
    assert group["name"] == "lis-async"
    return list(group["rules"])


# ----------------------------------------------------------------------------- metric names
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names, strings,
    numbers and durations left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )  # label lists
    names = set()
    for m in re.finditer(r"[0-9][0-9A-Za-z_.]*|([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if name and not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def _family_names(family: Any) -> set[str]:
    """The sample names a metric family is exported under (counters with ``_total``)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("", "_count", "_sum"),
    }.get(family.type, ("",))
    return {family.name + s for s in suffixes} | {s.name for s in family.samples}


async def _exported() -> frozenset[str]:
    """The names in the worker's registry once its metrics are wired as app.py wires them: the
    Metrics, the LastInfoSec collector and the gauge collectors of ``App._start_servers`` (run
    for real on stand-in parts), and the cluster collector ``App`` adds in cluster mode."""
    app = App(load_settings(env=BASE_ENV))
    consumer = SimpleNamespace(in_flight=0, connected=False)
    budget = SimpleNamespace(limits=(9, 10), remaining=lambda: (9, 10))  # a daily budget set
    lis = SimpleNamespace(stats=LisStats(), outage_down=False, budget=budget)
    app.consumer, app.lis = consumer, lis  # type: ignore[assignment]
    try:
        await app._start_servers()
        stats = SimpleNamespace(errors=0, transitions=0, replicas_seen=1)
        link = SimpleNamespace(shared=True, stats=stats)
        limiter = SimpleNamespace(granted_shared=0, fallback_share=1.0, last_window=0)
        cache = SimpleNamespace(stats=SimpleNamespace(waits=0, waits_answered=0))
        app.metrics.add_collector(ClusterCollector(link, limiter, cache, app.metrics.name))
        return frozenset(n for f in app.metrics.registry.collect() for n in _family_names(f))
    finally:
        for task in list(app._tasks):
            task.cancel()
        await asyncio.gather(*app._tasks, return_exceptions=True)
        await app.platform.close()


@functools.cache
def exported() -> frozenset[str]:
    return asyncio.run(_exported())


def unknown_names(rule_list: list[dict[str, Any]], known: frozenset[str]) -> dict[str, set[str]]:
    """Per alert, the names its expression uses that are neither exported nor allowed."""
    allowed = known | PROMETHEUS_METRICS
    out: dict[str, set[str]] = {}
    for rule in rule_list:
        unknown = metric_names(rule["expr"]) - allowed
        if unknown:
            out.setdefault(rule["alert"], set()).update(unknown)
    return out


def test_metric_names_reads_promql() -> None:
    expr = """
        sum without (outcome) (increase(lis_jobs_total{outcome="failed", x=~"a(b)"}[15m]))
        / on (instance, job) group_left () rate(lis_api_throttled_total[1m:30s] offset 5m) > 0.2
        and deriv((queue_a or queue_b * 0)[30m:1m]) > bool 1e3 unless up offset 15m
    """
    assert metric_names(expr) == {
        "lis_jobs_total",
        "lis_api_throttled_total",
        "queue_a",
        "queue_b",
        "up",
    }


def test_the_worker_registry_is_collected() -> None:
    names = exported()
    for name in (
        "lis_jobs_total",  # Metrics, a labelled counter without samples yet
        "lis_listen_queue_messages",
        "lis_api_throttled_total",  # LisStatsCollector
        "lis_heartbeat_age",  # ops.gauges.WorkerGauges, wired by App._start_servers
        "runs_total",  # pycti's connector metrics (Metrics)
        "state",  # ops.gauges.PyctiGauges
        "lis_redis_shared",  # ClusterCollector
        "lis_daily_budget_remaining",  # ops.gauges.BudgetGauges, with a daily budget
    ):
        assert name in names, sorted(names)
    assert "lis_jobs" not in names  # a counter is only exported with _total


def test_every_metric_in_the_rules_is_exported() -> None:
    assert unknown_names(rules(), exported()) == {}


def test_an_unknown_metric_name_is_caught() -> None:
    bad = [{"alert": "Typo", "expr": 'increase(lis_job_total{outcome="failed"}[5m]) > 0'}]
    assert unknown_names(bad, exported()) == {"Typo": {"lis_job_total"}}


# ----------------------------------------------------------------------------- completeness
_DURATION = re.compile(r"(?:\d+[smhdwy])+")


def test_every_rule_is_complete() -> None:
    rule_list = rules()
    assert {r.get("alert") for r in rule_list} == ALERTS
    for rule in rule_list:
        name = rule.get("alert")
        assert name and not rule.get("record"), rule
        assert str(rule.get("expr", "")).strip(), name
        assert _DURATION.fullmatch(str(rule.get("for", ""))), f"{name}: for {rule.get('for')!r}"
        assert rule.get("labels", {}).get("severity") in {"warning", "critical"}, name
        notes = rule.get("annotations", {})
        assert notes.get("summary", "").strip() and notes.get("description", "").strip(), name
        text = notes["summary"] + notes["description"]
        assert "$labels.instance" in text and "$labels.job" in text, f"{name}: which worker?"
    # Two rules of one alert differ by a label (severity, reason), or Alertmanager mixes them.
    keys = [(r["alert"], tuple(sorted(r["labels"].items()))) for r in rule_list]
    assert len(keys) == len(set(keys))


def test_promtool_tests_cover_each_alert_both_ways() -> None:
    """Each rule (alert and labels) is expected to fire in some case, and each alert has a case
    where a series of its test group is expected not to fire."""
    docs = [yaml.safe_load(path.read_text(encoding="utf-8")) for path in RULE_TESTS]
    assert all(doc["rule_files"] == [RULES.name] for doc in docs)
    fired: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    quiet: set[str] = set()
    for group in (group for doc in docs for group in doc["tests"]):
        instances = {
            m.group(1)
            for s in group["input_series"]
            if (m := re.search(r'instance="([^"]+)"', s["series"]))
        }
        for case in group["alert_rule_test"]:
            expected = case.get("exp_alerts") or []
            for alert in expected:
                labels = alert["exp_labels"]
                assert {"instance", "job", "severity"} <= labels.keys(), alert
                assert alert.get("exp_annotations", {}).keys() == {"summary", "description"}
                fired.add((case["alertname"], tuple(sorted(labels.items()))))
            if instances - {a["exp_labels"]["instance"] for a in expected}:
                quiet.add(case["alertname"])
    for rule in rules():
        want = set(rule["labels"].items())
        assert any(n == rule["alert"] and want <= set(labels) for n, labels in fired), rule
    assert quiet == ALERTS


# ----------------------------------------------------------------------------- promtool
def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not on PATH (apt-get install prometheus): the rules were checked "
            "without it (YAML, metric names, coverage) but not evaluated"
        )
    return subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules() -> None:
    proc = _promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_test_rules() -> None:
    proc = _promtool("test", "rules", *(str(path.relative_to(ROOT)) for path in RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
