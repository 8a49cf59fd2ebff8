"""Unit tests of the LastInfoSec client (aioresponses, plus tiny aiohttp servers on 127.0.0.1:0)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

import aiohttp
import aioresponses.core as aioresponses_core
import orjson
import pytest
from aiohttp import web
from aioresponses import CallbackResult, aioresponses
from yarl import URL

from lis_async.enrichment.job import Observable, parse_job
from lis_async.enrichment.ports import LookupResult
from lis_async.errors import (
    LisBadAnswer,
    LisError,
    LisFatalError,
    LisRetriesExhausted,
    NothingToLookUp,
)
from lis_async.lastinfosec import LastInfoSecClient
from lis_async.lastinfosec.wire import path_segment, retry_after_s
from lis_async.redact import redact
from lis_async.settings.model import LastInfoSecSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LIS = FIXTURES / "lastinfosec"
JOBS = FIXTURES / "jobs"

KEY = "K3y-0123456789abcdef-SECRET"
BASE = "https://lis.test/v2"
HASH_RE = re.compile(r"^https://lis\.test/v2/stix21/search_hash/.*$")
HOST_RE = re.compile(r"^https://lis\.test/v2/stix21/search_host/.*$")
SEARCH_RE = re.compile(r"^https://lis\.test/v2/stix21/search/.*$")
ANY_RE = re.compile(r"^https://lis\.test/.*$")

SHA256 = "275a021bbfb6489e54d471899f7db9d1663fc695ec2fe2a2c4538aabf651fd0f"
SHA1 = "3395856ce81f2b7382dee72602f798b642f14140"
MD5 = "44d88612fea8a8f36de82e1278abb02f"


class _CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds ``ClientResponse`` without the ``stream_writer`` argument that
    aiohttp 3.14 requires (pnuckowski/aioresponses#289); supply a stand-in."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.fixture(autouse=True)
def _aioresponses_compat(monkeypatch: pytest.MonkeyPatch) -> None:
    if "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters:
        monkeypatch.setattr(aioresponses_core, "ClientResponse", _CompatResponse)


def fixture(name: str) -> bytes:
    return (LIS / f"{name}.json").read_bytes()


def obs(entity_type: str, value: str | None = None, **hashes: str) -> Observable:
    stix_type = {
        "StixFile": "file",
        "Domain-Name": "domain-name",
        "Hostname": "hostname",
        "Url": "url",
    }.get(entity_type, "x-other")
    return Observable(
        entity_type=entity_type,
        stix_type=stix_type,
        stix_id=f"{stix_type}--00000000-0000-4000-8000-000000000000",
        value=value,
        hashes=MappingProxyType({k.replace("_", "-"): v for k, v in hashes.items()}),
        marking_refs=(),
        granted_refs=None,
        stix=MappingProxyType({}),
    )


def domain(value: str) -> Observable:
    return obs("Domain-Name", value)


_CLIENT_KW = ("proxy", "trust_env", "clock", "outage_probe_s")


def settings(**kw: Any) -> LastInfoSecSettings:
    """Validated LastInfoSec settings for tests: fast retries, a rate limit that never binds."""
    base: dict[str, Any] = dict(
        api_key_cti=KEY,
        base_url=BASE,
        retry_budget_s=0.3,
        backoff_base_s=0.001,
        backoff_max_s=0.01,
        rate_per_s=1e6,
    )
    base.update(kw)
    if str(base["base_url"]).startswith("http://"):  # the loopback test servers: plain http
        base.setdefault("allow_http", True)
    unknown = set(base) - set(LastInfoSecSettings.model_fields)
    assert not unknown, f"not a LastInfoSec setting: {unknown}"  # the model ignores extras
    return LastInfoSecSettings(**base)


def new_client(**kw: Any) -> LastInfoSecClient:
    """A client from :func:`settings`; ``proxy``, ``trust_env`` (default off), ``clock`` and
    ``outage_probe_s`` (default 0.01 s) go to the client itself."""
    client_kw: dict[str, Any] = {"trust_env": False, "outage_probe_s": 0.01}
    client_kw |= {k: kw.pop(k) for k in _CLIENT_KW if k in kw}
    return LastInfoSecClient(settings(**kw), **client_kw)


@asynccontextmanager
async def make_client(**kw: Any) -> AsyncIterator[LastInfoSecClient]:
    async with new_client(**kw) as client:
        yield client


def requested(m: aioresponses) -> list[tuple[str, URL, dict[str, Any]]]:
    return [(meth, url, call.kwargs) for (meth, url), calls in m.requests.items() for call in calls]


def n_requests(m: aioresponses) -> int:
    return sum(len(calls) for calls in m.requests.values())


# ---------------------------------------------------------------------------------------------
# query_for
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hashes", "expected"),
    [
        ({"SHA_256": SHA256, "SHA_1": SHA1, "MD5": MD5, "SHA_512": "ab" * 64}, SHA256),
        ({"SHA_1": SHA1, "MD5": MD5}, SHA1),
        ({"MD5": MD5, "SHA_512": "ab" * 64}, MD5),
    ],
)
def test_hash_preference(hashes: dict[str, str], expected: str) -> None:
    client = new_client()
    assert client.query_for(obs("StixFile", "mal.exe", **hashes)) == ("search_hash", expected)
    post = new_client(endpoint_style="search")
    assert post.query_for(obs("StixFile", "mal.exe", **hashes)) == ("search", expected)


def test_no_usable_hash() -> None:
    client = new_client()
    with pytest.raises(NothingToLookUp):
        client.query_for(obs("StixFile", "mal.exe"))
    with pytest.raises(NothingToLookUp, match="SHA-512"):
        client.query_for(obs("StixFile", "mal.exe", SHA_512="ab" * 64))


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("http://bücher.example/x", "xn--bcher-kva.example"),
        ("https://user:pw@Example.COM:8443/p?q=1#frag", "example.com"),
        ("example.org/path/x?y", "example.org"),
        ("example.org:8080/x", "example.org"),
        ("  http://例え.テスト/  ", "xn--r8jz45g.xn--zckzah"),
        ("//cdn.example.net/lib.js", "cdn.example.net"),
        ("http://[2001:db8::1]:80/x", "2001:db8::1"),
        ("http://evil.example./x", "evil.example"),
        ("http://b%C3%BCcher.example/", "xn--bcher-kva.example"),
    ],
)
def test_url_host(value: str, host: str) -> None:
    client = new_client()
    assert client.query_for(obs("Url", value)) == ("search_host", host)


@pytest.mark.parametrize("value", ["", "   ", "http:///x", "http://[::1/", "http://a b.com/"])
def test_url_without_host(value: str) -> None:
    with pytest.raises(NothingToLookUp):
        new_client().query_for(obs("Url", value))


def test_query_for_hosts_and_unsupported() -> None:
    client = new_client()
    assert client.query_for(obs("Domain-Name", " evil.example ")) == ("search_host", "evil.example")
    assert client.query_for(obs("Hostname", "h1.evil.example")) == (
        "search_host",
        "h1.evil.example",
    )
    with pytest.raises(NothingToLookUp):
        client.query_for(obs("Domain-Name", None))
    with pytest.raises(NothingToLookUp, match="not supported"):
        client.query_for(obs("IPv4-Addr", "1.2.3.4"))
    post = new_client(endpoint_style="search")
    assert post.query_for(obs("Url", "http://bücher.example/x")) == (
        "search",
        "http://bücher.example/x",
    )
    assert post.query_for(obs("Hostname", "h.example")) == ("search", "h.example")


@pytest.mark.parametrize(
    ("algo", "digest"),
    [
        ("SHA_256", "a" * 200_000),  # the 200 KB "SHA-256" of issue #20
        ("SHA_256", "a" * 63),
        ("SHA_256", "g" * 64),
        ("SHA_1", SHA1 + "0"),
        ("MD5", MD5[:-1] + " "),
        ("MD5", MD5[:-1] + "/"),
    ],
)
def test_hashes_are_hex_of_their_length(algo: str, digest: str) -> None:
    for style in ("search_hash_host", "search"):
        with pytest.raises(NothingToLookUp) as caught:
            new_client(endpoint_style=style).query_for(obs("StixFile", "f.exe", **{algo: digest}))
        assert "is not" in str(caught.value) and "hex digits" in str(caught.value)
        assert len(str(caught.value)) < 400  # the value is cut where it is shown


def test_a_bad_hash_gives_way_to_a_good_one() -> None:
    client = new_client()
    assert client.query_for(obs("StixFile", "f.exe", SHA_256="nothex", MD5=MD5)) == (
        "search_hash",
        MD5,
    )


@pytest.mark.parametrize(
    "value",
    [
        "a" * 254,
        ".".join(["a" * 63] * 4) + "a",  # 256 characters
        "a" * 64 + ".example",
        "a..example",
        "bad example.com",
        "bad/example.com",
        "bad\u202eexample.com",
        "x" * 200_000,
    ],
)
def test_invalid_host_names_are_not_looked_up(value: str) -> None:
    for style in ("search_hash_host", "search"):
        for etype in ("Domain-Name", "Hostname"):
            with pytest.raises(NothingToLookUp, match=r": not looked up$") as caught:
                new_client(endpoint_style=style).query_for(obs(etype, value))
            assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    "value",
    [
        "a" * 63 + ".example",
        ".".join(["a" * 63] * 3) + "." + "a" * 61,  # 253 characters
        "_dmarc.example.com",
        "xn--bcher-kva.example",
        "bücher.example",
        "example.com.",
        "192.0.2.1",
        "2001:db8::1",
    ],
)
def test_valid_host_names_are_looked_up(value: str) -> None:
    assert new_client().query_for(obs("Domain-Name", value)) == ("search_host", value)


def test_url_credentials_never_leave() -> None:
    value = "https://alice:S3cret@intranet.example/login?token=abc"
    post = new_client(endpoint_style="search")
    assert post.query_for(obs("Url", value)) == (
        "search",
        "https://intranet.example/login?token=abc",
    )
    assert post.query_for(obs("Url", "alice:S3cret@intranet.example/x")) == (
        "search",
        "intranet.example/x",
    )
    assert new_client().query_for(obs("Url", value)) == ("search_host", "intranet.example")
    with pytest.raises(NothingToLookUp) as caught:
        post.query_for(obs("Url", "https://alice:S3cret@bad_host!/x"))
    assert "S3cret" not in str(caught.value) and "https://***@bad_host!/x" in str(caught.value)


def test_query_for_parsed_jobs() -> None:
    client = new_client()
    job = parse_job((JOBS / "manual_stixfile_amber_shared.json").read_bytes())
    assert job.observable is not None
    assert client.query_for(job.observable) == ("search_hash", SHA256)
    job = parse_job((JOBS / "manual_stixfile_no_hash.json").read_bytes())
    assert job.observable is not None
    with pytest.raises(NothingToLookUp):
        client.query_for(job.observable)
    job = parse_job((JOBS / "manual_url_stix_objects_string.json").read_bytes())
    assert job.observable is not None
    assert client.query_for(job.observable) == ("search_host", "bad.example.com")


def test_settings_validation_and_repr() -> None:
    client = new_client(proxy="http://user:proxypass@proxy.local:3128")
    assert KEY not in repr(settings())
    assert KEY not in repr(client)
    assert "proxypass" not in repr(client)
    with pytest.raises(ValueError):
        settings(concurrency=0)
    with pytest.raises(ValueError):
        settings(base_url="ftp://x/")
    with pytest.raises(ValueError):
        settings(endpoint_style="nope")


def test_redact() -> None:
    url = f"https://lis.test/v2/stix21/search_host/x?api_key={KEY}&platform=opencti"
    assert redact(url) == "https://lis.test/v2/stix21/search_host/x?api_key=***&platform=opencti"
    assert KEY not in redact(f"error near {KEY} here", [KEY])
    odd = "a/b+c&d=e"
    assert odd not in redact(f"x {odd} y", [odd])
    assert "a%2Fb%2Bc%26d%3De" not in redact("x?api_key=a%2Fb%2Bc%26d%3De&y=1", [odd])
    assert redact("http://u:pw@proxy:3128/") == "http://***@proxy:3128/"
    assert redact("nothing to hide") == "nothing to hide"


def test_retry_after_parsing() -> None:
    assert retry_after_s(None) is None
    assert retry_after_s("") is None
    assert retry_after_s("2") == 2.0
    assert retry_after_s("0.5") == 0.5
    assert retry_after_s("-3") == 0.0
    assert retry_after_s("soon") is None
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    got = retry_after_s(future)
    assert got is not None and 25 <= got <= 31
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert retry_after_s(past) == 0.0


# ---------------------------------------------------------------------------------------------
# answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "found", "n_bundles"),
    [
        ("search_hash_200", 200, True, 1),
        ("search_host_200_two_bundles", 200, True, 2),
        ("search_host_200_large", 200, True, 1),
        ("search_200_bare_list", 200, True, 1),
        ("search_200_empty_message", 200, False, 0),
        ("search_422_not_found", 422, False, 0),
        ("search_422_not_found", 404, False, 0),
    ],
)
async def test_fixture_answers(name: str, status: int, found: bool, n_bundles: int) -> None:
    body = fixture(name)
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=status, body=body)
            res = await client.lookup(domain("evil.example"))
    assert res == LookupResult(found, res.bundles, "evil.example", "search_host")
    assert len(res.bundles) == n_bundles
    if found:
        doc = orjson.loads(body)
        expected = doc["message"] if isinstance(doc, dict) else doc
        assert list(res.bundles) == expected
        assert all(isinstance(b["objects"], list) for b in res.bundles)
    assert client.stats.requests == 1
    assert client.stats.responses_by_status == {status: 1}


async def test_search_hash_request_shape() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HASH_RE, body=fixture("search_hash_200"))
            res = await client.lookup(obs("StixFile", "x.exe", SHA_256=SHA256, MD5=MD5))
        ((method, url, _kw),) = requested(m)
    assert method == "GET"
    assert url.raw_path == f"/v2/stix21/search_hash/{SHA256}"
    assert dict(url.query) == {"api_key": KEY, "platform": "opencti"}
    assert res.found and res.query == SHA256 and res.endpoint == "search_hash"


async def test_post_style_sends_value_body() -> None:
    value = "http://bücher.example/x?a=1"
    async with make_client(endpoint_style="search") as client:
        with aioresponses() as m:
            m.post(SEARCH_RE, body=fixture("search_200_bare_list"))
            res = await client.lookup(obs("Url", value))
        ((method, url, kw),) = requested(m)
    assert method == "POST"
    assert url.raw_path == "/v2/stix21/search/"
    assert dict(url.query) == {"api_key": KEY, "platform": "opencti"}
    assert orjson.loads(kw["data"]) == {"value": value}
    assert kw["headers"]["Content-Type"] == "application/json"
    assert res.found and res.endpoint == "search" and res.query == value


@pytest.mark.parametrize(
    ("name", "status"),
    [("search_200_invalid_key", 200), ("search_401", 401), ("search_401", 403)],
)
async def test_fatal_answers(name: str, status: int) -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=status, body=fixture(name), repeat=True)
            with pytest.raises(LisFatalError, match="rejected the API key") as info:
                await client.lookup(domain("evil.example"))
            assert n_requests(m) == 1  # never retried
    assert info.value.retriable is False
    assert info.value.status == status


async def test_other_4xx_is_not_retried() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=400, body=b'{"detail": "bad request"}', repeat=True)
            with pytest.raises(LisError, match="HTTP 400: bad request") as info:
                await client.lookup(domain("evil.example"))
            assert n_requests(m) == 1
    assert type(info.value) is LisError and not info.value.retriable


async def test_500_retried_for_the_budget_then_exhausted() -> None:
    async with make_client(retry_budget_s=0.3) as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=500, body=fixture("search_500"), repeat=True)
            t0 = time.monotonic()
            with pytest.raises(
                LisRetriesExhausted,
                match=r"gave up after 0 s \(budget 0.3 s, \d+ attempts\).*HTTP 500",
            ) as info:
                await client.lookup(domain("evil.example"))
            assert time.monotonic() - t0 >= 0.3
            sent = n_requests(m)
    assert sent >= 3 and info.value.attempts == sent and info.value.retriable
    assert client.stats.retries == sent - 1
    assert client.stats.responses_by_status == {500: sent}


async def test_503_then_200() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=503)
            m.get(HOST_RE, body=fixture("search_host_200_two_bundles"))
            res = await client.lookup(domain("evil.example"))
    assert res.found and len(res.bundles) == 2
    assert client.stats.retries == 1


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (b"<html>gateway</html>", "not valid JSON"),
        (fixture("search_hash_200")[:-40], "not valid JSON"),  # truncated
        (b"", "not valid JSON"),
        (b'{"foo": 1}', "unexpected shape"),
        (b'{"message": {"a": 1}}', "unexpected shape"),
        (b"42", "unexpected shape"),
        (b'[1, 2, "x"]', "no STIX bundle"),
        (b'[{"type": "bundle"}]', "no STIX bundle"),
        (b'{"message": "internal problem"}', "text instead of bundles"),
    ],
)
async def test_bad_answers(body: bytes, pattern: str) -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, body=body, repeat=True)
            with pytest.raises(LisBadAnswer, match=pattern) as info:
                await client.lookup(domain("evil.example"))
            assert n_requests(m) == 1
    assert not info.value.retriable
    assert info.value.__cause__ is None and info.value.__context__ is None


async def test_non_bundle_items_dropped() -> None:
    bundle = orjson.loads(fixture("search_200_bare_list"))[0]
    body = orjson.dumps({"message": ["junk", 3, bundle, {"no": "objects"}]})
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, body=body)
            res = await client.lookup(domain("evil.example"))
    assert res.found and res.bundles == (bundle,)


async def test_oversized_body() -> None:
    async with make_client(max_answer_bytes=2000) as client:
        with aioresponses() as m:
            m.get(HOST_RE, body=fixture("search_host_200_large"))
            with pytest.raises(LisBadAnswer, match="larger than 2000 bytes"):
                await client.lookup(domain("evil.example"))
            m.get(HOST_RE, body=b"[]" + b" " * 1998)  # exactly at the cap: accepted
            res = await client.lookup(domain("ok.example"))
    assert not res.found


# ---------------------------------------------------------------------------------------------
# the request path can never be changed by a value
# ---------------------------------------------------------------------------------------------

HOSTILE = [
    ("../../v2/admin?x=1#", "..%2F..%2Fv2%2Fadmin%3Fx%3D1%23"),
    ("a%2Fb", "a%252Fb"),
    ("a\x00b\x01c\nd e", "a%00b%01c%0Ad%20e"),
    ("..", "%2E%2E"),
    (".", "%2E"),
    ("/", "%2F"),
    ("x" * 5000, "x" * 5000),
    ("évil.example", "%C3%A9vil.example"),
]


@pytest.mark.parametrize(("value", "segment"), HOSTILE)
def test_a_value_is_one_path_segment(value: str, segment: str) -> None:
    """The path encoding, a second line behind the value checks (which refuse all of these
    but the IDN)."""
    assert path_segment(value) == segment


@pytest.mark.parametrize(("value", "_segment"), HOSTILE[:-1])
async def test_hostile_values_are_not_sent(value: str, _segment: str) -> None:
    async with make_client() as client:
        with aioresponses() as m:
            for style_obs in (domain(value), obs("StixFile", None, SHA_256=value)):
                with pytest.raises(NothingToLookUp, match="not"):
                    await client.lookup(style_obs)
            assert n_requests(m) == 0


async def test_an_idn_goes_as_given() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=422)
            res = await client.lookup(domain("évil.example"))
        ((_, url, _),) = requested(m)
    assert not res.found and res.query == "évil.example"
    assert url.raw_path == "/v2/stix21/search_host/%C3%A9vil.example"
    assert url.raw_query_string == f"api_key={KEY}&platform=opencti"


@asynccontextmanager
async def serve(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v2"
    finally:
        await runner.cleanup()


async def test_hostile_values_on_the_wire() -> None:
    seen: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.raw_path, request.method))
        return web.Response(status=422, body=fixture("search_422_not_found"))

    job = parse_job((JOBS / "hostile_value_path_traversal.json").read_bytes())
    assert job.observable is not None
    async with serve(handler) as base, make_client(base_url=base, api_key_cti="k/e?y#&=") as client:
        for hostile in (job.observable, domain("a%2Fb"), domain("..")):
            with pytest.raises(NothingToLookUp, match=": not looked up"):
                await client.lookup(hostile)
        res = await client.lookup(domain("évil.example"))
    assert not res.found
    qs = "?api_key=k%2Fe%3Fy%23%26%3D&platform=opencti"
    assert seen == [("/v2/stix21/search_host/%C3%A9vil.example" + qs, "GET")]


# ---------------------------------------------------------------------------------------------
# 429, timeouts, connection errors
# ---------------------------------------------------------------------------------------------


async def test_429_retry_after_is_honoured_and_pauses_the_client() -> None:
    times: dict[str, list[float]] = {}
    throttled = asyncio.Event()

    def record(url: URL, **_kw: Any) -> None:
        times.setdefault(url.raw_path.rsplit("/", 1)[1], []).append(time.monotonic())

    async def first_429(url: URL, **kw: Any) -> CallbackResult:
        record(url)
        throttled.set()
        return CallbackResult(status=429, headers={"Retry-After": "0.3"})

    async with make_client(backoff_max_s=5) as client:
        with aioresponses() as m:
            m.get(re.compile(r".*/search_host/a\.example\?.*"), callback=first_429)
            m.get(
                re.compile(r".*/search_host/a\.example\?.*"),
                callback=record,
                body=fixture("search_hash_200"),
            )
            m.get(
                re.compile(r".*/search_host/b\.example\?.*"),
                callback=record,
                body=fixture("search_hash_200"),
            )
            t0 = time.monotonic()
            task_a = asyncio.create_task(client.lookup(domain("a.example")))
            await throttled.wait()
            # another lookup started during the pause must wait for it too
            res_b = await client.lookup(domain("b.example"))
            res_a = await task_a
    assert res_a.found and res_b.found
    t_429 = times["a.example"][0]
    assert times["a.example"][1] - t_429 >= 0.28
    assert times["b.example"][0] - t_429 >= 0.28
    assert time.monotonic() - t0 < 2
    assert client.stats.throttled == 1 and client.stats.retries == 1


async def test_429_retry_after_capped_by_backoff_max() -> None:
    async with make_client(backoff_max_s=0.05) as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=429, headers={"Retry-After": "3600"})
            m.get(HOST_RE, body=fixture("search_hash_200"))
            t0 = time.monotonic()
            res = await client.lookup(domain("evil.example"))
    assert res.found and time.monotonic() - t0 < 1


async def test_429_without_retry_after() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=429)
            m.get(HOST_RE, status=429)
            m.get(HOST_RE, body=fixture("search_hash_200"))
            res = await client.lookup(domain("evil.example"))
    assert res.found
    assert client.stats.throttled == 2 and client.stats.retries == 2


async def test_429_exhausted() -> None:
    async with make_client(retry_budget_s=0.1) as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=429, repeat=True)
            with pytest.raises(LisRetriesExhausted, match=r"gave up after.*429") as info:
                await client.lookup(domain("evil.example"))
    assert info.value.retriable and info.value.status == 429


async def test_timeout_retried() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, exception=TimeoutError())
            m.get(HOST_RE, body=fixture("search_hash_200"))
            res = await client.lookup(domain("evil.example"))
            assert res.found
            m.get(HOST_RE, exception=TimeoutError(), repeat=True)
            with pytest.raises(LisRetriesExhausted, match=r"attempts.*; last cause: timeout"):
                await client.lookup(domain("other.example"))
    assert client.stats.timeouts >= 3


async def test_connection_errors_retried() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, exception=aiohttp.ClientConnectionError("reset"))
            m.get(HOST_RE, exception=aiohttp.ClientPayloadError("truncated"))
            m.get(HOST_RE, body=fixture("search_hash_200"))
            res = await client.lookup(domain("evil.example"))
    assert res.found
    assert client.stats.connection_errors == 2 and client.stats.retries == 2


async def test_real_timeout_retried() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.4)
        return web.Response(body=fixture("search_hash_200"), content_type="application/json")

    async with serve(handler) as base, make_client(base_url=base, timeout_s=0.1) as client:
        res = await client.lookup(domain("evil.example"))
    assert res.found and calls == 2 and client.stats.timeouts == 1


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_hit_and_ttl() -> None:
    clock = Clock()
    async with make_client(clock=clock, cache_ttl_s=60, cache_negative_ttl_s=10) as client:
        with aioresponses() as m:
            m.get(
                re.compile(r".*/found\.example\?.*"), body=fixture("search_hash_200"), repeat=True
            )
            m.get(re.compile(r".*/missing\.example\?.*"), status=422, repeat=True)
            first = await client.lookup(domain("found.example"))
            second = await client.lookup(domain("found.example"))
            assert not first.cached and second.cached
            assert second.bundles == first.bundles and second.found
            miss1 = await client.lookup(domain("missing.example"))
            miss2 = await client.lookup(domain("missing.example"))
            assert not miss1.found and miss2.cached and not miss2.found
            assert n_requests(m) == 2
            clock.now += 11  # negative entry expired, positive not
            assert not (await client.lookup(domain("missing.example"))).cached
            assert (await client.lookup(domain("found.example"))).cached
            assert n_requests(m) == 3
            clock.now += 50
            assert not (await client.lookup(domain("found.example"))).cached
            assert n_requests(m) == 4
    assert client.stats.cache_hits == 3


async def test_cache_lru_bound() -> None:
    async with make_client(cache_size=2) as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=422, repeat=True)
            for v in ("a.example", "b.example", "a.example", "c.example"):
                await client.lookup(domain(v))  # "a" refreshed, so "b" is evicted by "c"
            assert n_requests(m) == 3
            assert (await client.lookup(domain("a.example"))).cached
            assert (await client.lookup(domain("c.example"))).cached
            assert not (await client.lookup(domain("b.example"))).cached
            assert n_requests(m) == 4


async def test_cache_disabled_and_errors_not_cached() -> None:
    async with make_client(cache_size=0) as client:
        with aioresponses() as m:
            m.get(HOST_RE, status=422, repeat=True)
            await client.lookup(domain("a.example"))
            await client.lookup(domain("a.example"))
            assert n_requests(m) == 2
    async with make_client(retry_budget_s=0) as client:  # one attempt
        with aioresponses() as m:
            m.get(HOST_RE, status=500)
            m.get(HOST_RE, body=fixture("search_hash_200"))
            with pytest.raises(LisRetriesExhausted):
                await client.lookup(domain("a.example"))
            assert (await client.lookup(domain("a.example"))).found
            assert n_requests(m) == 2


# ---------------------------------------------------------------------------------------------
# coalescing
# ---------------------------------------------------------------------------------------------


async def slow_found(url: URL, **kw: Any) -> CallbackResult:
    await asyncio.sleep(0.1)
    return CallbackResult(body=fixture("search_hash_200"))


async def test_coalescing() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, callback=slow_found, repeat=True)
            results = await asyncio.gather(*(client.lookup(domain("a.example")) for _ in range(10)))
            assert n_requests(m) == 1
    assert all(r is results[0] for r in results) and results[0].found
    assert client.stats.coalesced == 9


async def test_coalesced_failure_reaches_every_waiter() -> None:
    async def slow_401(url: URL, **kw: Any) -> CallbackResult:
        await asyncio.sleep(0.05)
        return CallbackResult(status=401, body=fixture("search_401"))

    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, callback=slow_401, repeat=True)
            results = await asyncio.gather(
                *(client.lookup(domain("a.example")) for _ in range(5)), return_exceptions=True
            )
            assert n_requests(m) == 1
    assert all(isinstance(r, LisFatalError) for r in results)


async def test_cancelled_waiter_does_not_cancel_the_others() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, callback=slow_found, repeat=True)
            tasks = [asyncio.create_task(client.lookup(domain("a.example"))) for _ in range(3)]
            await asyncio.sleep(0.02)
            tasks[0].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert n_requests(m) == 1
    assert isinstance(done[0], asyncio.CancelledError)
    assert isinstance(done[1], LookupResult) and done[1].found
    assert done[2] is done[1]


async def test_all_waiters_cancelled_lookup_still_completes_into_cache() -> None:
    async with make_client() as client:
        with aioresponses() as m:
            m.get(HOST_RE, callback=slow_found, repeat=True)
            task = asyncio.create_task(client.lookup(domain("a.example")))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.15)
            assert (await client.lookup(domain("a.example"))).cached
            assert n_requests(m) == 1


async def test_close_during_lookup() -> None:
    client = new_client()
    await client.start()
    with aioresponses() as m:
        m.get(HOST_RE, callback=slow_found, repeat=True)
        task = asyncio.create_task(client.lookup(domain("a.example")))
        await asyncio.sleep(0.02)
        await client.close()
        with pytest.raises(LisError, match="closed"):
            await task
    await client.close()  # idempotent


async def test_lookup_starts_session_lazily() -> None:
    client = new_client()
    try:
        with aioresponses() as m:
            m.get(HOST_RE, status=422)
            assert not (await client.lookup(domain("a.example"))).found
    finally:
        await client.close()


# ---------------------------------------------------------------------------------------------
# the key never leaks
# ---------------------------------------------------------------------------------------------


def exception_texts(exc: BaseException | None) -> list[str]:
    texts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts += [str(exc), repr(exc), repr(exc.args)]
        exc = exc.__cause__ or exc.__context__
    return texts


async def test_key_never_leaks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    leak = f"failed GET https://lis.test/v2/x?api_key={KEY}&platform=opencti ({KEY})"
    errors: list[BaseException] = []
    async with make_client(retry_budget_s=0.05) as client:
        with aioresponses() as m:
            m.get(
                re.compile(r".*/conn\.example\?.*"),
                exception=aiohttp.ClientConnectionError(leak),
                repeat=True,
            )
            m.get(re.compile(r".*/weird\.example\?.*"), exception=aiohttp.InvalidURL(leak))
            m.get(re.compile(r".*/t\.example\?.*"), exception=TimeoutError(leak), repeat=True)
            m.get(re.compile(r".*/s500\.example\?.*"), status=500, body=leak, repeat=True)
            m.get(re.compile(r".*/s429\.example\?.*"), status=429, repeat=True)
            m.get(
                re.compile(r".*/s401\.example\?.*"),
                status=401,
                body=orjson.dumps({"detail": {"details": [{"error": leak}]}}),
            )
            m.get(re.compile(r".*/s400\.example\?.*"), status=400, body=leak)
            m.get(re.compile(r".*/key200\.example\?.*"), body=orjson.dumps({"message": leak}))
            m.get(re.compile(r".*/ok\.example\?.*"), body=fixture("search_hash_200"))
            names = [
                "conn",
                "weird",
                "t",
                "s500",
                "s429",
                "s401",
                "s400",
                "key200",
                "ok",
                "unmatched",
            ]  # unmatched: aioresponses raises an error naming the full URL
            for name in names:
                try:
                    res = await client.lookup(domain(f"{name}.example"))
                except LisError as exc:
                    errors.append(exc)
                else:
                    assert KEY not in repr(res)
    assert len(errors) == 9
    assert any("api_key=***" in str(e) for e in errors)
    for err in errors:
        for text in exception_texts(err):
            assert KEY not in text, text
    assert caplog.records
    for rec in caplog.records:
        text = rec.getMessage() + str(rec.args) + (rec.exc_text or "") + str(rec.exc_info)
        assert KEY not in text, text
    assert any("api_key=***" in rec.getMessage() for rec in caplog.records)
    assert KEY not in repr(client.stats)


# ---------------------------------------------------------------------------------------------
# a real server: rate limiter, semaphore, 429 pause
# ---------------------------------------------------------------------------------------------


async def test_rate_limit_and_concurrency_against_a_real_server() -> None:
    state = {"now": 0, "max": 0, "calls": 0}

    async def handler(request: web.Request) -> web.Response:
        state["calls"] += 1
        if state["calls"] <= 2:
            return web.Response(status=429, headers={"Retry-After": "0.1"})
        state["now"] += 1
        state["max"] = max(state["max"], state["now"])
        try:
            await asyncio.sleep(0.03)
        finally:
            state["now"] -= 1
        return web.Response(body=fixture("search_hash_200"), content_type="application/json")

    latencies: list[float] = []
    async with (
        serve(handler) as base,
        make_client(
            base_url=base,
            rate_per_s=40,
            rate_burst=5,
            concurrency=3,
            retry_budget_s=10,
            backoff_max_s=1,
        ) as client,
    ):
        client.stats.latency_observer = latencies.append
        grants = _record_grants(client)
        t0 = time.monotonic()
        results = await asyncio.gather(*(client.lookup(domain(f"h{i}.example")) for i in range(30)))
        elapsed = time.monotonic() - t0
    assert all(r.found for r in results)
    assert state["max"] <= 3
    # 32 requests through a bucket of 5 refilled at 40/s: at least (32 - 5) / 40 s
    assert elapsed >= (32 - 5) / 40 - 0.05
    assert client.stats.throttled == 2
    assert client.stats.requests == 32
    assert client.stats.responses_by_status == {429: 2, 200: 30}
    assert len(latencies) == 32
    # Smoothing: no 0.25 s window holds much more than the burst and 0.25 * 40 requests. Read
    # where the rate limiter lets requests go: when they reach the server also depends on how
    # busy the machine is (a stalled event loop delivers requests granted apart together).
    assert len(grants) == 32
    for i, t in enumerate(grants):
        in_window = sum(1 for u in grants[i:] if u - t < 0.25)
        assert in_window <= 5 + 0.25 * 40 + 1, grants


def _record_grants(client: LastInfoSecClient) -> list[float]:
    """The times the client's own rate limiter grants requests (event-loop clock), recorded by
    wrapping it."""
    grants: list[float] = []
    inner = client._limiter
    loop = asyncio.get_running_loop()

    class Recording:
        async def acquire(self, urgent: bool = False) -> None:
            await inner.acquire(urgent)
            grants.append(loop.time())

        async def pause(self, delay_s: float) -> None:
            await inner.pause(delay_s)

    client._limiter = Recording()
    return grants


async def test_content_length_over_cap_against_a_real_server() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=fixture("search_host_200_large"), content_type="application/json")

    async with serve(handler) as base:
        async with make_client(base_url=base, max_answer_bytes=10_000) as client:
            with pytest.raises(LisBadAnswer, match="larger than"):
                await client.lookup(domain("a.example"))
        async with make_client(base_url=base) as client:
            res = await client.lookup(domain("a.example"))
            assert res.found and len(res.bundles[0]["objects"]) == 192


async def test_environment_proxy_is_resolved_once_and_no_proxy_honoured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = new_client(api_key_cti="k", base_url="https://api.example/v2", trust_env=True)
    await client.start()
    try:
        assert client.proxy == "http://proxy.internal:3128"
    finally:
        await client.close()
    monkeypatch.setenv("NO_PROXY", "api.example")
    client = new_client(api_key_cti="k", base_url="https://api.example/v2", trust_env=True)
    await client.start()
    try:
        assert client.proxy is None
    finally:
        await client.close()
    # An explicit proxy (PROXY_HTTPS) wins over the environment.
    client = new_client(
        api_key_cti="k", base_url="https://api.example/v2", proxy="http://p:1", trust_env=True
    )
    await client.start()
    try:
        assert client.proxy == "http://p:1"
    finally:
        await client.close()


async def test_paced_limiter_spreads_grants_evenly() -> None:
    """One grant per interval, never a burst: grant k comes no sooner than k intervals after the
    first (less the quarter-interval catch-up), where a sliding window would hand out a whole
    window's worth at once. With a burst allowance, that many come at once, then pacing."""
    from lis_async.lastinfosec import PacedLimiter
    from lis_async.lastinfosec.limiter import CATCH_UP

    loop = asyncio.get_running_loop()

    async def grants(limiter: PacedLimiter, n: int) -> list[float]:
        times: list[float] = []

        async def one() -> None:
            await limiter.acquire()
            times.append(loop.time())

        await asyncio.gather(*(one() for _ in range(n)))
        return sorted(times)

    # Stamps are taken just after each grant: a busy machine may delay one by a few ms.
    interval, noise = 0.05, 0.005
    times = await grants(PacedLimiter(1 / interval), 12)
    for k, t in enumerate(times):
        assert t - times[0] >= k * interval - CATCH_UP * interval - noise, k
    assert times[-1] - times[0] < 12 * interval * 3  # paced, not serialised behind sleeps

    times = await grants(PacedLimiter(1 / interval, burst=5), 10)
    assert times[4] - times[0] < interval  # the burst allowance: five at once
    for k in range(5, 10):
        assert times[k] - times[0] >= (k - 4) * interval - CATCH_UP * interval - noise, k


async def test_urgent_acquisitions_overtake_the_waiting_ones() -> None:
    """An analyst's lookup waits for one grant at most, not for the auto-enrichment requests
    queued before it; the others keep their arrival order."""
    from lis_async.lastinfosec import PacedLimiter

    limiter = PacedLimiter(20)
    order: list[str] = []

    async def one(name: str, urgent: bool = False) -> None:
        await limiter.acquire(urgent)
        order.append(name)

    normal = [asyncio.create_task(one(f"n{i}")) for i in range(8)]
    await asyncio.sleep(0.01)  # n0 granted, n1 watches the window, n2..n7 queue
    granted = len(order)  # 1, or more if this machine was too busy to wake us in time
    assert 1 <= granted < 7
    urgent = [asyncio.create_task(one("u0", True)), asyncio.create_task(one("u1", True))]
    await asyncio.gather(*normal, *urgent)
    # The one already watching the window when they came goes first; then both urgent ones,
    # ahead of every normal one still waiting; the normal ones in their arrival order.
    first = granted + 1
    assert order[first : first + 2] == ["u0", "u1"], order
    assert [n for n in order if n.startswith("n")] == [f"n{i}" for i in range(8)]


async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    from lis_async.lastinfosec.limiter import PriorityGate

    gate = PriorityGate()
    await gate.acquire()
    waiting = asyncio.create_task(gate.acquire(urgent=True))
    after = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiting.cancel()
    gate.release()  # hands the gate to the cancelled waiter, which passes it on
    await asyncio.wait_for(after, 1)
    gate.release()
    await asyncio.wait_for(gate.acquire(), 1)  # free again


async def test_outage_gate_lets_one_probe_through_per_interval() -> None:
    """While LastInfoSec is down, ten lookups retrying send one probe per interval between
    them, not ten; the first answer releases every waiter at once."""
    from lis_async.lastinfosec.outage import OutageGate

    gate = OutageGate(probe_interval_s=0.2, outage_after_s=0.0)
    sent: list[tuple[float, bool]] = []
    up = asyncio.Event()
    t0 = time.monotonic()

    async def lookup() -> float:
        while True:
            probe = await gate.admit()
            sent.append((time.monotonic() - t0, probe))
            await asyncio.sleep(0.01)  # the request
            if up.is_set():
                await gate.answered(probe)
                return time.monotonic()
            await gate.failed("HTTP 503", probe)

    tasks = [asyncio.create_task(lookup()) for _ in range(10)]
    await asyncio.sleep(1.0)
    up.set()
    up_at = time.monotonic() - t0
    done = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    before = [(t, probe) for t, probe in sent if t < up_at]
    assert sum(1 for _, probe in before if not probe) == 10  # the first round, before it was seen
    probes = [t for t, probe in before if probe]
    assert 3 <= len(probes) <= 6  # ~1 s / 0.2 s, one at a time
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(probes))
    assert max(done) - min(done) < 0.5  # everyone goes on together once it answers
    assert not gate.down and gate.outages == 1


# ---------------------------------------------------------------------------------------------
# bounded answers and cache; redirects (issue #15)
# ---------------------------------------------------------------------------------------------


def many_objects(n: int) -> bytes:
    item = {
        "type": "indicator",
        "spec_version": "2.1",
        "id": "indicator--0c7b5b88-8ff7-4a4d-aa9d-feb398cd0061",
        "pattern": "[domain-name:value = 'a.example']",
    }
    return orjson.dumps({"message": [{"type": "bundle", "id": "bundle--1", "objects": [item] * n}]})


async def test_answer_over_the_object_cap_fails_and_is_not_cached() -> None:
    hits = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(body=many_objects(101), content_type="application/json")

    async with serve(handler) as base, make_client(base_url=base, max_answer_objects=100) as client:
        for _ in range(2):
            with pytest.raises(LisBadAnswer) as info:
                await client.lookup(domain("a.example"))
            assert str(info.value) == (
                "LastInfoSec search_host answer holds 101 objects, more than "
                "LASTINFOSEC_MAX_ANSWER_OBJECTS (100): nothing imported"
            )
        assert hits == 2 and client.stats.bad_answers == 2
    async with serve(handler) as base, make_client(base_url=base, max_answer_objects=101) as client:
        assert (await client.lookup(domain("a.example"))).found


@pytest.mark.parametrize("depth", [65, 300, 1000])
async def test_deeply_nested_answer_is_a_bad_answer(depth: int) -> None:
    """255-1023 levels parse, then broke the cache's orjson.dumps with a TypeError that nothing
    caught; now the answer is refused as it comes in, with the cache on."""
    deep = b"[" * depth + b"]" * depth
    body = b'{"message":[{"type":"bundle","objects":[{"type":"malware","x":' + deep + b"}]}]}"
    with aioresponses() as m:
        m.get(HOST_RE, body=body, content_type="application/json")
        async with make_client() as client:
            with pytest.raises(LisBadAnswer, match="nests deeper than 64 levels"):
                await client.lookup(domain("a.example"))


async def test_redirect_is_an_error_never_followed_with_the_key() -> None:
    elsewhere: list[str] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.path_qs)
        return web.Response(body=fixture("search_hash_200"), content_type="application/json")

    async with serve(other) as target:

        async def handler(request: web.Request) -> web.Response:
            raise web.HTTPFound(target + "/stix21/search_host/a.example?" + request.query_string)

        async with serve(handler) as base, make_client(base_url=base) as client:
            with pytest.raises(LisError) as info:
                await client.lookup(domain("a.example"))
    text = str(info.value)
    assert text == (
        "LastInfoSec search_host answered HTTP 302, a redirect to http://127.0.0.1: not followed "
        "(it would carry the API key); check LASTINFOSEC_BASE_URL"
    )
    assert elsewhere == [] and KEY not in text
    assert not isinstance(info.value, LisRetriesExhausted)  # not retried either


async def test_answer_cache_is_bounded_in_bytes() -> None:
    from lis_async.lastinfosec.cache import AnswerCache, CachedAnswer

    def answer(n: int) -> CachedAnswer:
        bundles = (
            {"type": "bundle", "objects": [{"n": i, "pad": os_random(64)} for i in range(n)]},
        )
        return CachedAnswer.of(LookupResult(True, bundles, f"v{n}", "search_host"))

    small, big = answer(10), answer(400)
    cache = AnswerCache(1000, time.monotonic, max_bytes=3 * small.nbytes + 10)
    for i in range(5):
        cache.put(("search_host", f"v{i}"), small, 60)
    assert len(cache) == 3 and cache.nbytes <= 3 * small.nbytes + 10
    assert cache.get(("search_host", "v0")) is None and cache.get(("search_host", "v4")) is small
    cache.put(("search_host", "big"), big, 60)  # larger than the whole cache: not kept
    assert cache.get(("search_host", "big")) is None and len(cache) == 3
    cache.put(("search_host", "v4"), small, 60)  # replacing an entry does not count it twice
    assert cache.nbytes == 3 * small.nbytes


def os_random(n: int) -> str:
    import os

    return os.urandom(n).hex()


async def test_client_cache_keeps_only_what_fits_in_its_bytes() -> None:
    async with make_client(cache_max_bytes=2000) as client:
        with aioresponses() as m:
            m.get(HOST_RE, body=fixture("search_host_200_large"), repeat=True)  # ~10 KB packed
            m.get(HASH_RE, body=fixture("search_hash_200"), repeat=True)  # ~1.3 KB packed
            for _ in range(2):
                await client.lookup(domain("a.example"))
                await client.lookup(obs("StixFile", SHA_256=SHA256))
            assert n_requests(m) == 3  # the small answer was served from the cache once
