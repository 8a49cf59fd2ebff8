"""The platform adapter (pycti-configured GraphQL) against the platform double."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from lis_async.config import load_settings
from lis_async.errors import PlatformAuthError, PlatformError, WorkNotAlive
from lis_async.platform import Platform
from lis_async.sim.opencti import PlatformSim, PlatformSimConfig

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def sim() -> AsyncIterator[PlatformSim]:
    async with PlatformSim(PlatformSimConfig(token="octi-token-secret-1")) as platform:
        yield platform


def settings_for(
    sim: PlatformSim, token: str = "octi-token-secret-1", connector_id: str | None = None
):  # type: ignore[no-untyped-def]
    return load_settings(
        env={
            "OPENCTI_URL": sim.base_url,
            "OPENCTI_TOKEN": token,
            "CONNECTOR_ID": connector_id or str(uuid.uuid4()),
            "CONNECTOR_SCOPE": "Domain-Name,Url",
            "CONNECTOR_AUTO": "true",
            "CONFIG_LIS_APIKEY_CTI": "k",
        }
    )


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
    from lis_async.job import parse_observable
    from lis_async.stix import observable_from_platform

    platform = Platform(settings_for(sim))
    await platform.start()
    try:
        entity = {
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
        assert (obs.value, obs.tlp, obs.entity_type) == (
            "bad.example.com",
            "TLP:RED",
            "Domain-Name",
        )
        assert obs.granted_refs == ("identity--7b1c2d3e-4f5a-5b6c-9d7e-8f9a0b1c2d3e",)
        assert (
            await platform.read_observable(
                "domain-name--00000000-0000-5000-8000-000000000000", None
            )
            is None
        )
    finally:
        await platform.close()


async def test_tls_settings_reach_both_transports(sim: PlatformSim) -> None:
    import ssl

    for verify, expected in (("true", ssl.CERT_REQUIRED), ("false", None)):
        settings = load_settings(
            env={
                "OPENCTI_URL": sim.base_url,
                "OPENCTI_TOKEN": "octi-token-secret-1",
                "CONNECTOR_ID": str(uuid.uuid4()),
                "CONFIG_LIS_APIKEY_CTI": "k",
                "OPENCTI_SSL_VERIFY": verify,
            }
        )
        platform = Platform(settings)
        await platform.start()
        try:
            # pycti's requests session: True, or a CA bundle path (REQUESTS_CA_BUNDLE), or False
            assert (platform._api.ssl_verify is not False) is (verify == "true")
            connector_ssl = platform._http.connector._ssl  # type: ignore[union-attr]
            if expected is None:
                assert connector_ssl is False
            else:
                assert connector_ssl.verify_mode == expected and connector_ssl.check_hostname
        finally:
            await platform.close()
