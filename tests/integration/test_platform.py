"""The platform adapter (pycti-configured GraphQL) against the platform double."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from lis_async.enrichment.markings import MarkingDef
from lis_async.errors import PlatformAuthError, PlatformError, WorkNotAlive
from lis_async.platform.client import Platform, QueueDetails
from lis_async.settings.model import load_settings
from lis_async.sim.opencti import PlatformSim, PlatformSimConfig
from lis_async.sim.world import DEFAULT_AMQP_URL
from tests.helpers import FIELDS_MISSING_6_8_9, INPUT_FIELDS_6_8_9

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def sim() -> AsyncIterator[PlatformSim]:
    async with PlatformSim(PlatformSimConfig(token="octi-token-secret-1")) as platform:
        yield platform


def _env(
    sim: PlatformSim, token: str = "octi-token-secret-1", connector_id: str | None = None
) -> dict[str, str]:
    return {
        "OPENCTI_URL": sim.base_url,
        "OPENCTI_TOKEN": token,
        "CONNECTOR_ID": connector_id or str(uuid.uuid4()),
        "CONNECTOR_SCOPE": "Domain-Name,Url",
        "CONNECTOR_AUTO": "true",
        "CONFIG_LIS_APIKEY_CTI": "k",
    }


def settings_for(
    sim: PlatformSim,
    token: str = "octi-token-secret-1",
    connector_id: str | None = None,
    **env: str,
):  # type: ignore[no-untyped-def]
    return load_settings(env=_env(sim, token, connector_id) | env)


async def test_register_ping_and_work_lifecycle_as_pycti_sends_them(sim: PlatformSim) -> None:
    settings = settings_for(sim)
    platform = Platform(settings)
    await platform.start()
    try:
        reg = await platform.register()
        names = sim.registration(settings.connector.id)
        assert (reg.listen, reg.push, reg.push_exchange, reg.push_routing) == (
            names["listen"],
            names["push"],
            names["push_exchange"],
            names["push_routing"],
        )
        assert reg.connector_user_id == sim.config.connector_user_id
        record = sim.connectors[settings.connector.id]
        assert record.type == "INTERNAL_ENRICHMENT" and record.playbook_compatible is True
        assert list(record.scope) == ["Domain-Name", "Url"] and record.auto is True
        await platform.ping_connector()
        assert platform.last_heartbeat is not None

        work = sim.create_work(settings.connector.id)
        await platform.work_received(work, "draft-1")
        await platform.add_expectations(work, 2, "draft-1")
        await platform.work_processed(work, "Sent 2 object(s) in 2 bundle(s)", False, "draft-1")
        for _ in range(2):
            sim.report_expectation(work)
        assert sim.works[work].status == "complete"
        assert sim.works[work].messages[-1] == "Sent 2 object(s) in 2 bundle(s)"
        ops = [
            r
            for r in sim.requests
            if r.operation in ("workToReceived", "addExpectations", "workToProcessed")
        ]
        assert [r.operation for r in ops] == [
            "workToReceived",
            "addExpectations",
            "workToProcessed",
        ]
        assert {r.draft_id for r in ops} == {"draft-1"}  # per request, never global
        assert all(r.user_agent and r.user_agent.startswith("pycti/") for r in ops)
        # No draft header leaks into a later call without a draft.
        await platform.ping_connector()
        assert sim.requests[-1].draft_id is None
    finally:
        await platform.close()


async def test_errors_are_typed(sim: PlatformSim) -> None:
    settings = settings_for(sim)
    platform = Platform(settings)
    await platform.start()
    try:
        await platform.register()
        work = sim.create_work(settings.connector.id)
        sim.kill_work(work)
        with pytest.raises(WorkNotAlive):
            await platform.work_processed(work, "x", False, None)
        sim.config.outage = True
        with pytest.raises(PlatformError) as info:
            await platform.work_received(sim.create_work(settings.connector.id), None)
        assert info.value.retriable and not isinstance(info.value, WorkNotAlive)
        with pytest.raises(PlatformError):
            await platform.ping_connector()
    finally:
        sim.config.outage = False
        await platform.close()


async def test_queue_details_are_the_push_queues_real_figures(sim: PlatformSim) -> None:
    """``connector_queue_details`` as pycti's check_connector_buffering reads it (the double
    answers the push queue's messages and body bytes from the broker); a connector the
    platform does not know is an error, not an empty queue."""
    settings = settings_for(sim)
    platform = Platform(settings)
    await platform.start()
    try:
        with pytest.raises(PlatformError, match="no connector_queue_details"):
            await platform.queue_details()  # a connector the platform does not know: null
        reg = await platform.register()
        assert await platform.queue_details() == QueueDetails(0, 0)
        connection = await aio_pika.connect(DEFAULT_AMQP_URL)
        async with connection:
            exchange = await (await connection.channel()).get_exchange(
                reg.push_exchange, ensure=False
            )
            for size in (1_000, 2_500, 40):
                await exchange.publish(aio_pika.Message(b"x" * size), reg.push_routing)
        assert await platform.queue_details() == QueueDetails(3, 3_540)
    finally:
        await sim.delete_connector_queues(settings.connector.id)
        await platform.close()


async def test_queue_details_on_a_schema_without_them_is_a_schema_error() -> None:
    config = PlatformSimConfig(
        token="octi-token-secret-1",
        missing_fields=frozenset({"Connector.connector_queue_details"}),
    )
    async with PlatformSim(config) as sim:
        platform = Platform(settings_for(sim))
        await platform.start()
        try:
            await platform.register()
            with pytest.raises(PlatformError) as info:
                await platform.queue_details()
            assert info.value.code == "GRAPHQL_VALIDATION_FAILED"
        finally:
            await platform.close()


async def test_refused_token_is_an_auth_error_that_does_not_echo_the_token(
    sim: PlatformSim,
) -> None:
    platform = Platform(settings_for(sim, token="wrong-token-secret-2"))
    await platform.start()
    try:
        with pytest.raises(PlatformAuthError) as info:
            await platform.register()
        assert "wrong-token-secret-2" not in str(info.value)
        with pytest.raises(PlatformAuthError):
            await platform.work_received("work_x", None)
    finally:
        await platform.close()


async def test_deferred_entity_read(sim: PlatformSim) -> None:
    from lis_async.enrichment.bundle import observable_from_platform
    from lis_async.enrichment.job import parse_observable

    platform = Platform(settings_for(sim))
    await platform.start()
    try:
        entity: dict[str, Any] = {
            "id": "domain-name--3e9b2c71-4f0a-5d6e-8c1b-9a7f6e5d4c3b",
            "spec_version": "2.1",
            "type": "domain-name",
            "value": "bad.example.com",
            "object_marking_refs": ["marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"],
            "extensions": {
                "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba": {
                    "extension_type": "property-extension",
                    "id": str(uuid.uuid4()),
                    "type": "Domain-Name",
                    "granted_refs": ["identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e"],
                }
            },
        }
        sim.put_entity(entity)
        read = await platform.read_observable(entity["id"], None)
        assert read is not None
        obs = parse_observable(observable_from_platform(read, entity["id"]))
        assert (obs.value, obs.entity_type) == ("bad.example.com", "Domain-Name")
        red = "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"
        assert obs.marking_refs == (red,)
        assert obs.marking_defs[red] == MarkingDef("TLP", "TLP:RED")  # read with the entity
        assert obs.granted_refs == ("identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e",)
        assert (
            await platform.read_observable(
                "domain-name--00000000-0000-5000-8000-000000000000", None
            )
            is None
        )
    finally:
        await platform.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A throw-away self-signed certificate for 127.0.0.1 (no CA trusts it)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_settings_reach_both_transports(tmp_path: Path) -> None:
    """OPENCTI_SSL_VERIFY governs both transports: with verification on, an OpenCTI behind an
    untrusted certificate is refused by pycti's session (``about``) and by the aiohttp work
    reports alike; with it off, both go through."""
    import ssl

    from aiohttp import web

    async def graphql(request: web.Request) -> web.Response:
        await request.read()
        data = {"about": {"version": "6.4.0"}, "workEdit": {"toReceived": "ok"}}
        return web.json_response({"data": data})

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_post("/graphql", graphql)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        for verify in ("true", "false"):
            settings = load_settings(
                env={
                    "OPENCTI_URL": f"https://127.0.0.1:{port}",
                    "OPENCTI_TOKEN": "octi-token-secret-1",
                    "CONNECTOR_ID": str(uuid.uuid4()),
                    "CONFIG_LIS_APIKEY_CTI": "k",
                    "OPENCTI_SSL_VERIFY": verify,
                }
            )
            platform = Platform(settings)
            await platform.start()
            try:
                if verify == "true":
                    with pytest.raises(PlatformError):
                        await platform.about()
                    with pytest.raises(PlatformError):
                        await platform.work_received("work_1", None)
                else:
                    assert await platform.about() == "6.4.0"
                    await platform.work_received("work_1", None)
            finally:
                await platform.close()
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------------------- older schemas


async def test_registers_on_a_platform_without_the_newer_fields() -> None:
    """A 6.x schema: no ``Connector.jwks`` (7.x), no ``version``/``slug``/``xtm_one_intent``
    input fields. Registration goes through and the queue names are the platform's."""
    config = PlatformSimConfig(
        token="octi-token-secret-1",
        missing_fields=FIELDS_MISSING_6_8_9,
        register_input_fields=INPUT_FIELDS_6_8_9,
    )
    async with PlatformSim(config) as sim:
        settings = settings_for(sim)
        platform = Platform(settings)
        await platform.start()
        try:
            reg = await platform.register()
            assert reg.listen == sim.registration(settings.connector.id)["listen"]
            assert sim.requests[-1].outcome == "ok"
            assert set(sim.connectors[settings.connector.id].input) <= INPUT_FIELDS_6_8_9
        finally:
            await platform.close()


@pytest.mark.parametrize(
    ("config", "code"),
    [
        # a selected output field the schema lacks
        (
            {"missing_fields": frozenset({"Connector.connector_user_id"})},
            "GRAPHQL_VALIDATION_FAILED",
        ),
        # an input field the schema lacks (RegisterConnectorInput before 6.8.9)
        ({"register_input_fields": INPUT_FIELDS_6_8_9 - {"auto_update"}}, "BAD_USER_INPUT"),
        # Apollo Server alone answers validation errors with HTTP 400
        (
            {
                "missing_fields": frozenset({"Connector.connector_user_id"}),
                "validation_error_status": 400,
            },
            "GRAPHQL_VALIDATION_FAILED",
        ),
    ],
)
async def test_a_schema_mismatch_fails_registration_at_once(
    config: dict[str, object], code: str
) -> None:
    from lis_async.app import EXIT_STARTUP, App

    async with PlatformSim(PlatformSimConfig(token="octi-token-secret-1", **config)) as sim:  # type: ignore[arg-type]
        platform = Platform(settings_for(sim))
        await platform.start()
        try:
            with pytest.raises(PlatformError) as info:
                await platform.register()
        finally:
            await platform.close()
        assert info.value.code == code and not info.value.retriable
        assert "supported platforms are OpenCTI 6.8.9 and newer" in str(info.value)
        # The worker gives up on the first answer instead of retrying for a minute.
        app = App(settings_for(sim))
        assert await asyncio.wait_for(app.run(install_signals=False), 20) == EXIT_STARTUP
        assert sim.calls["RegisterConnector"] == 2


@pytest.mark.parametrize(("value", "sent"), [(None, "none"), (" Deferred", "deferred")])
async def test_enrichment_resolution_goes_into_the_registration(
    sim: PlatformSim, value: str | None, sent: str
) -> None:
    env = {"CONNECTOR_ENRICHMENT_RESOLUTION": value} if value else {}
    settings = settings_for(sim, **env)
    platform = Platform(settings)
    await platform.start()
    try:
        await platform.register()
        assert sim.connectors[settings.connector.id].input["enrichment_resolution"] == sent
    finally:
        await platform.close()


async def test_custom_headers_reach_both_transports() -> None:
    """OPENCTI_CUSTOM_HEADERS (pycti's format) goes on pycti's session (``about``,
    registration, ...) and on the aiohttp work reports alike, with pycti's own headers."""
    from aiohttp import web

    seen: list[dict[str, str]] = []

    async def graphql(request: web.Request) -> web.Response:
        await request.read()
        seen.append(dict(request.headers))
        data = {"about": {"version": "6.8.9"}, "workEdit": {"toReceived": "ok"}}
        return web.json_response({"data": data})

    app = web.Application()
    app.router.add_post("/graphql", graphql)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        settings = load_settings(
            env={
                "OPENCTI_URL": f"http://127.0.0.1:{port}",
                "OPENCTI_TOKEN": "octi-token-secret-1",
                "CONNECTOR_ID": str(uuid.uuid4()),
                "CONFIG_LIS_APIKEY_CTI": "k",
                "OPENCTI_CUSTOM_HEADERS": "X-Tenant: blue;X-Proxy-Key:k1:k2;",
            }
        )
        platform = Platform(settings)
        await platform.start()
        try:
            assert await platform.about() == "6.8.9"  # pycti's requests session
            await platform.work_received("work_1", "draft-1")  # aiohttp
        finally:
            await platform.close()
    finally:
        await runner.cleanup()
    assert len(seen) == 2
    for headers in seen:
        assert headers["X-Tenant"] == "blue" and headers["X-Proxy-Key"] == "k1:k2"
        assert headers["Authorization"] == "Bearer octi-token-secret-1"
        assert headers["User-Agent"].startswith("pycti/")
    assert seen[1]["opencti-draft-id"] == "draft-1"


async def test_marking_definitions_are_read_by_id(sim: PlatformSim) -> None:
    """The gate's platform read (markingDefinition, docs/protocol.md §8.6): built-in TLP and PAP,
    an organisation's own marking, and null for an id the platform does not know."""
    custom = "marking-definition--c0c0c0c0-1111-4222-8333-444455556666"
    sim.put_marking(custom, "TLP", "TLP:RED", order=4)
    platform = Platform(settings_for(sim))
    await platform.start()
    try:
        node = await platform.read_marking(custom)
        assert node is not None
        assert (node["standard_id"], node["definition_type"], node["definition"]) == (
            custom,
            "TLP",
            "TLP:RED",
        )
        pap = await platform.read_marking(
            "marking-definition--4e4e3b84-de45-53df-9d9b-b21207699fd8"
        )
        assert pap is not None and (pap["definition_type"], pap["definition"]) == ("PAP", "PAP:RED")
        unknown = "marking-definition--deadbeef-0000-4000-8000-000000000000"
        assert await platform.read_marking(unknown) is None
        assert sim.calls["MarkingDefinition"] == 3
    finally:
        await platform.close()
