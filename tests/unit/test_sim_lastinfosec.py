"""Tests of the simulated LastInfoSec API (lis_async.sim.lastinfosec) against a real server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import stix2
import yarl

from lis_async.sim.lastinfosec import (
    _KNOB_COERCERS,
    LastInfoSecSim,
    LisSimConfig,
    build_bundle,
    redact_api_key,
    value_fraction,
)
from tests.helpers import FIXTURES, poll

LIS_FIXTURES = FIXTURES / "lastinfosec"
KEY = "s3cr3t-test-key"
SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
SHA1 = "da39a3ee5e6b4b0d3255bfef95601890afd80709"
MD5 = "d41d8cd98f00b204e9800998ecf8427e"


@pytest.fixture
async def sim() -> AsyncIterator[LastInfoSecSim]:
    async with LastInfoSecSim(LisSimConfig(api_key=KEY, known_share=1.0)) as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def sim_root(sim: LastInfoSecSim) -> str:
    assert sim.base_url is not None
    return sim.base_url.removesuffix("/v2")


def host_url(sim: LastInfoSecSim, host: str, **params: str) -> yarl.URL:
    assert sim.base_url is not None
    query = "&".join(f"{k}={quote(v, safe='')}" for k, v in {"api_key": KEY, **params}.items())
    return yarl.URL(
        f"{sim.base_url}/stix21/search_host/{quote(host, safe='')}?{query}", encoded=True
    )


def hash_url(sim: LastInfoSecSim, value: str, key: str = KEY) -> yarl.URL:
    assert sim.base_url is not None
    return yarl.URL(
        f"{sim.base_url}/stix21/search_hash/{quote(value, safe='')}?api_key={quote(key)}",
        encoded=True,
    )


def check_bundle(bundle: dict[str, Any], size: int | None = None) -> None:
    """The bundle is valid STIX 2.1 and has the documented shape."""
    parsed = stix2.parse(json.dumps(bundle), allow_custom=True)
    assert parsed.type == "bundle"
    objects = bundle["objects"]
    if size is not None:
        assert len(objects) == size
    assert objects[0]["type"] == "identity" and objects[0]["name"] == "LastInfoSec"
    assert objects[1]["type"] == "marking-definition" and objects[1]["name"] == "TLP:AMBER"
    assert objects[-1]["type"] == "report"
    ids = [o["id"] for o in objects]
    assert len(set(ids)) == len(ids)
    assert objects[-1]["object_refs"] == ids[2:-1]
    for obj in objects[2:]:
        if obj["type"] not in ("file", "domain-name", "url"):
            assert obj["created_by_ref"] == ids[0]


async def test_missing_or_wrong_key_is_401(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    expected = json.loads((LIS_FIXTURES / "search_401.json").read_text())
    async with session.get(hash_url(sim, SHA256, key="wrong")) as resp:
        assert resp.status == 401
        assert await resp.json() == expected
    url = yarl.URL(f"{sim.base_url}/stix21/search_hash/{SHA256}")
    async with session.get(url) as resp:
        assert resp.status == 401
        assert await resp.json() == expected
    assert sim.stats.by_status == {401: 2}


async def test_known_hash_answers_envelope_with_valid_stix(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    async with session.get(hash_url(sim, SHA256)) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert list(body) == ["message"] and len(body["message"]) == 1
    bundle = body["message"][0]
    check_bundle(bundle, size=12)
    file_obj = bundle["objects"][2]
    assert file_obj["type"] == "file" and file_obj["hashes"] == {"SHA-256": SHA256}
    indicator = bundle["objects"][3]
    assert indicator["pattern"] == f"[file:hashes.'SHA-256' = '{SHA256}']"
    # Same shape as the sample answer.
    sample = json.loads((LIS_FIXTURES / "search_hash_200.json").read_text())["message"][0]
    assert [o["type"] for o in bundle["objects"]] == [o["type"] for o in sample["objects"]]
    relationships = {
        (o["relationship_type"], o["source_ref"].split("--")[0], o["target_ref"].split("--")[0])
        for o in bundle["objects"]
        if o["type"] == "relationship"
    }
    assert relationships == {
        ("indicates", "indicator", "malware"),
        ("based-on", "indicator", "file"),
        ("uses", "malware", "attack-pattern"),
        ("uses", "intrusion-set", "malware"),
    }


@pytest.mark.parametrize(("value", "key"), [(SHA256, "SHA-256"), (SHA1, "SHA-1"), (MD5, "MD5")])
def test_hash_key_follows_length(value: str, key: str) -> None:
    bundle = build_bundle("hash", value, 12)
    check_bundle(bundle, size=12)
    assert bundle["objects"][2]["hashes"] == {key: value}
    assert bundle["objects"][3]["pattern"] == f"[file:hashes.'{key}' = '{value}']"


@pytest.mark.parametrize("size", [5, 8, 12, 13, 14, 15, 40, 200])
def test_bundle_size_is_exact_and_valid(size: int) -> None:
    check_bundle(build_bundle("host", "bad.example.com", size), size=size)


def test_observable_ids_are_stix_deterministic_ids() -> None:
    bundle = build_bundle("host", "bad.example.com", 15)
    for obj in bundle["objects"]:
        if obj["type"] == "domain-name":
            assert stix2.DomainName(value=obj["value"]).id == obj["id"]
    file_obj = build_bundle("hash", SHA256, 12)["objects"][2]
    assert stix2.File(hashes={"SHA-256": SHA256}).id == file_obj["id"]


async def test_bundle_size_and_two_bundles(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    sim.config.bundle_size = 30
    sim.config.bundles_per_answer = 2
    async with session.get(host_url(sim, "bad.example.com")) as resp:
        assert resp.status == 200
        body = await resp.json()
    first, second = body["message"]
    check_bundle(first, size=30)
    check_bundle(second)
    assert first["objects"][2] == {
        "type": "domain-name",
        "spec_version": "2.1",
        "id": stix2.DomainName(value="bad.example.com").id,
        "value": "bad.example.com",
    }
    assert first["objects"][3]["pattern"] == "[domain-name:value = 'bad.example.com']"
    assert second["objects"][2]["type"] == "url"
    assert second["objects"][2]["value"] == "http://bad.example.com/gate.php"
    assert first["id"] != second["id"]


async def test_headers_false_answers_bare_list(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    async with session.get(host_url(sim, "bad.example.com", headers="false")) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert isinstance(body, list) and len(body) == 1
    check_bundle(body[0], size=12)
    async with session.get(host_url(sim, "bad.example.com", platform="opencti")) as resp:
        assert (await resp.json())["message"] == body


async def test_answers_are_deterministic(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    bodies = []
    for _ in range(2):
        async with session.get(host_url(sim, "evil.example.org")) as resp:
            bodies.append(await resp.read())
    assert bodies[0] == bodies[1] == sim.answer_for("host", "evil.example.org")
    sim.clear_cache()
    other = LastInfoSecSim(LisSimConfig(known_share=1.0))
    assert other.answer_for("host", "evil.example.org") == bodies[0]
    assert sim.answer_for("host", "evil.example.org") == bodies[0]
    assert sim.answer_for("host", "other.example.org") != bodies[0]


async def test_unknown_value_is_422(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    expected = json.loads((LIS_FIXTURES / "search_422_not_found.json").read_text())
    sim.config.unknown_values = {"clean.example.com"}
    async with session.get(host_url(sim, "clean.example.com")) as resp:
        assert resp.status == 422
        assert await resp.json() == expected
    assert sim.answer_for("host", "clean.example.com") is None


async def test_known_share_zero_and_one(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    values = [f"host-{i}.example.com" for i in range(8)]
    for share, status in ((0.0, 422), (1.0, 200)):
        sim.config.known_share = share
        for value in values:
            async with session.get(host_url(sim, value)) as resp:
                assert resp.status == status
    # Overrides win over the share.
    sim.config.known_share = 0.0
    sim.config.known_values = {values[0]}
    async with session.get(host_url(sim, values[0])) as resp:
        assert resp.status == 200


def test_known_share_is_a_deterministic_fraction() -> None:
    values = [f"v{i}.example.net" for i in range(2000)]
    sim = LastInfoSecSim(LisSimConfig(known_share=0.8))
    known = sum(sim.is_known(v) for v in values)
    assert 0.75 * len(values) < known < 0.85 * len(values)
    assert all(0.0 <= value_fraction(v) < 1.0 for v in values)
    assert [value_fraction(v) for v in values] == [value_fraction(v) for v in values]


async def test_latency(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    sim.config.latency_s = 0.2
    start = time.monotonic()
    async with session.get(host_url(sim, "slow.example.com")) as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 0.2


async def test_rate_limit_429_with_retry_after(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    limit, burst = 3, 20
    sim.config.rate_limit_per_s = limit

    async def one() -> tuple[int, str | None]:
        async with session.get(host_url(sim, "rl.example.com")) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")

    results = await asyncio.gather(*(one() for _ in range(burst)))
    accepted = [r for r in results if r[0] == 200]
    limited = [r for r in results if r[0] == 429]
    assert len(accepted) + len(limited) == burst
    assert limited and all(ra == "1" for _, ra in limited)
    assert sim.stats.max_per_window(accepted_only=True) <= limit
    # The rule, window by window, from the arrival times the simulator recorded (a loaded
    # machine may spread the burst over more one-second windows; the rule holds in each): the
    # first `limit` requests of a window are answered, the others get 429.
    statuses: dict[int, list[int | None]] = {}
    for r in sim.stats.requests:
        statuses.setdefault(int(r.time), []).append(r.status)
    assert sum(map(len, statuses.values())) == burst
    for window, got in statuses.items():
        n = len(got)
        assert got == [200] * min(n, limit) + [429] * max(n - limit, 0), (window, got)

    sim.config.retry_after_s = None
    sim.config.force_429 = True
    status, retry_after = await one()
    assert (status, retry_after) == (429, None)


async def test_force_429_count(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    sim.config.force_429_count = 2
    sim.config.retry_after_s = 0.5
    statuses = []
    for _ in range(3):
        async with session.get(host_url(sim, "storm.example.com")) as resp:
            statuses.append((resp.status, resp.headers.get("Retry-After")))
    assert statuses == [(429, "0.5"), (429, "0.5"), (200, None)]
    assert sim.config.force_429_count == 0


async def test_error_rate_one_is_500(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    sim.config.error_rate = 1.0
    expected = json.loads((LIS_FIXTURES / "search_500.json").read_text())
    async with session.get(host_url(sim, "err.example.com")) as resp:
        assert resp.status == 500
        assert await resp.json() == expected


async def test_invalid_key_answer(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    sim.config.invalid_key_answer = True
    expected = json.loads((LIS_FIXTURES / "search_200_invalid_key.json").read_text())
    async with session.get(hash_url(sim, SHA256)) as resp:
        assert resp.status == 200
        assert await resp.json() == expected


async def test_empty_values(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    sim.config.empty_values = {"empty.example.com"}
    async with session.get(host_url(sim, "empty.example.com")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"message": []}


async def test_body_override(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    sim.config.body_override = (200, b'{"message": [{"type": "bund', "application/json")
    async with session.get(hash_url(sim, SHA256)) as resp:
        assert resp.status == 200
        assert await resp.read() == b'{"message": [{"type": "bund'
    sim.config.body_override = (502, b"<html>Bad gateway</html>", "text/html")
    async with session.get(hash_url(sim, SHA256)) as resp:
        assert resp.status == 502
        assert resp.content_type == "text/html"


async def test_max_concurrency_counter(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    # Each request is held 1 s: the 10 sent at once all overlap even when a loaded machine
    # spreads out their arrivals.
    sim.config.latency_s = 1.0

    async def one(i: int) -> int:
        async with session.get(host_url(sim, f"c{i}.example.com")) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one(i) for i in range(10)))
    assert statuses == [200] * 10
    assert sim.stats.max_concurrent == 10
    assert sim.stats.concurrent == 0
    assert sim.stats.total == 10
    assert sim.stats.by_endpoint == {"search_host": 10}


async def test_hostile_value_is_one_path_segment(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    hostile = "../../v2/admin?x=1#"
    async with session.get(host_url(sim, hostile)) as resp:
        assert resp.status == 200
        bundle = (await resp.json())["message"][0]
    check_bundle(bundle, size=12)
    assert bundle["objects"][2]["value"] == hostile
    record = sim.stats.requests[-1]
    assert record.endpoint == "search_host"
    assert record.value == hostile
    assert record.path == "/v2/stix21/search_host/..%2F..%2Fv2%2Fadmin%3Fx%3D1%23?api_key=***"
    # A client that does not encode the value never reaches the endpoint.
    unencoded = yarl.URL(f"{sim.base_url}/stix21/search_host/a/b?api_key={KEY}", encoded=True)
    async with session.get(unencoded) as resp:
        assert resp.status == 404
    assert sim.stats.requests[-1].endpoint == "other"


async def test_quotes_in_values_give_valid_patterns(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    for value in ["it's.example.com", "back\\slash.example.com"]:
        async with session.get(host_url(sim, value)) as resp:
            assert resp.status == 200
            check_bundle((await resp.json())["message"][0], size=12)


async def test_post_search(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    url = f"{sim.base_url}/stix21/search/"
    params = {"api_key": KEY, "platform": "opencti"}
    cases = {
        "http://bad.example.com/gate.php?id=1": ("url", "[url:value = '"),
        SHA256: ("file", "[file:hashes.'SHA-256' = '"),
        "bad.example.com": ("domain-name", "[domain-name:value = '"),
    }
    for value, (obs_type, pattern_start) in cases.items():
        async with session.post(url, params=params, json={"value": value}) as resp:
            assert resp.status == 200
            bundle = (await resp.json())["message"][0]
        check_bundle(bundle, size=12)
        assert bundle["objects"][2]["type"] == obs_type
        assert bundle["objects"][3]["pattern"].startswith(pattern_start)
        assert sim.stats.requests[-1].value == value
    async with session.post(url, params=params, data=b"not json") as resp:
        assert resp.status == 422
    assert sim.stats.by_endpoint == {"search": 4}


async def test_timeout_rate_hangs_and_close_is_quick(session: aiohttp.ClientSession) -> None:
    sim = LastInfoSecSim(LisSimConfig(api_key=KEY, timeout_rate=1.0, hang_s=30.0))
    await sim.start()
    try:
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(
                hash_url(sim, SHA256), timeout=aiohttp.ClientTimeout(total=0.2)
            ) as resp:
                await resp.read()
        # The hung handler is cancelled when the client goes away (long before its 30 s).
        assert await poll(lambda: sim.stats.concurrent == 0, 10), sim.stats.concurrent
        assert sim.stats.by_status == {}
    finally:
        start = time.monotonic()
        await sim.close()
    # Quick: shutdown_timeout_s is 0.5 s, so well under 10 s even on a loaded machine (a close
    # held up by the hung handler would take its 30 s).
    assert time.monotonic() - start < 10.0


async def test_api_key_never_recorded(sim: LastInfoSecSim, session: aiohttp.ClientSession) -> None:
    async with session.get(host_url(sim, "bad.example.com")) as resp:
        assert resp.status == 200
    async with session.get(hash_url(sim, SHA256, key="another-secret")) as resp:
        assert resp.status == 401
    assert all(KEY not in p and "another-secret" not in p for p in sim.stats.paths)
    assert sim.stats.paths[0].endswith("?api_key=***")
    async with session.get(f"{sim_root(sim)}/_sim/stats") as resp:
        text = await resp.text()
    assert KEY not in text and "another-secret" not in text
    stats = json.loads(text)
    assert stats["total"] == 2
    assert stats["by_status"] == {"200": 1, "401": 1}
    assert stats["requests"][0]["path"].endswith("api_key=***")
    async with session.get(f"{sim_root(sim)}/_sim/config") as resp:
        assert KEY not in await resp.text()


def test_redact_api_key() -> None:
    assert redact_api_key("/p?api_key=abc&platform=x") == "/p?api_key=***&platform=x"
    assert redact_api_key("/p?platform=x&API_KEY=abc") == "/p?platform=x&API_KEY=***"
    assert redact_api_key("/p?x=1") == "/p?x=1"


async def test_sim_config_and_reset_endpoints(
    sim: LastInfoSecSim, session: aiohttp.ClientSession
) -> None:
    root = sim_root(sim)
    async with session.post(
        f"{root}/_sim/config",
        json={"known_share": 0, "unknown_values": ["x.example"], "retry_after_s": None},
    ) as resp:
        assert resp.status == 200
    assert sim.config.known_share == 0.0
    assert sim.config.unknown_values == {"x.example"}
    assert sim.config.retry_after_s is None
    async with session.post(f"{root}/_sim/config", json={"no_such_knob": 1}) as resp:
        assert resp.status == 400
    async with session.post(f"{root}/_sim/config", json={"latency_s": "fast"}) as resp:
        assert resp.status == 400
    async with session.get(host_url(sim, "a.example.com")) as resp:
        assert resp.status == 422
    assert sim.stats.total == 1
    async with session.post(f"{root}/_sim/reset") as resp:
        assert resp.status == 200
    assert sim.stats.total == 0 and sim.stats.by_status == {} and not sim.stats.requests


def test_every_knob_is_settable() -> None:
    # update() (POST /_sim/config) accepts every field: each knob has its checker-converter.
    names = {f.name for f in dataclasses.fields(LisSimConfig)}
    assert set(_KNOB_COERCERS) == names


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"latency_s": 1, "rate_limit_per_s": 5}, {"latency_s": 1.0, "rate_limit_per_s": 5.0}),
        ({"retry_after_s": None, "seed": None}, {"retry_after_s": None, "seed": None}),
        ({"bundle_size": 20, "force_429": True}, {"bundle_size": 20, "force_429": True}),
        ({"known_values": ["a", "b", "a"]}, {"known_values": {"a", "b"}}),
        ({"api_key": "k", "seed": 3}, {"api_key": "k", "seed": 3}),
        ({"body_override": [503, "x", "text/plain"]}, {"body_override": (503, b"x", "text/plain")}),
        ({"body_override": None}, {"body_override": None}),
    ],
)
def test_update_converts_knobs(values: dict[str, Any], expected: dict[str, Any]) -> None:
    config = LisSimConfig()
    config.update(values)
    for name, value in expected.items():
        got = getattr(config, name)
        assert got == value and type(got) is type(value), name


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"latency_s": True}, "latency_s must be a number"),
        ({"retry_after_s": "1"}, "retry_after_s must be a number"),
        ({"cache_size": 1.5}, "cache_size must be an integer"),
        ({"seed": False}, "seed must be an integer or null"),
        ({"latency_s": 2, "force_429": 1}, "force_429 must be a boolean"),
        ({"empty_values": ["a", 1]}, "empty_values must be a list of strings"),
        ({"api_key": None}, "api_key must be a string"),
        ({"body_override": [200, "x"]}, "body_override must be [status, body, content_type]"),
        ({"nope": 1, "latency_s": 2}, "unknown knob(s): nope"),
    ],
)
def test_update_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    config = LisSimConfig()
    with pytest.raises(ValueError) as excinfo:
        config.update(values)
    assert message in str(excinfo.value)
    assert config.latency_s == 0.0  # nothing applied, not even the valid knobs


def test_cli_main_serves() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lis_async.sim.lastinfosec",
            "--port",
            "0",
            "--api-key",
            KEY,
            "--known-share",
            "1",
            "--retry-after",
            "none",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        base = line.split(" on ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v2")

        async def fetch() -> int:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{base}/stix21/search_hash/{SHA256}", params={"api_key": KEY}) as resp,
            ):
                return resp.status

        assert asyncio.run(fetch()) == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
