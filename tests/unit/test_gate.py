"""The max-TLP / max-PAP gate (lis_async.enrichment.gate) fails closed: standard, custom and upper-case
marking ids, unknown ids, markings only in the extension or in objectMarking, draft and playbook
jobs, and the optional PAP gate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lis_async.enrichment.gate import MarkingCache, MarkingGate
from lis_async.enrichment.job import Job, parse_job
from lis_async.enrichment.markings import STANDARD_MARKINGS
from tests.fakes import FakePlatform
from tests.helpers import job_body

CLEAR = "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9"
GREEN = "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da"
AMBER = "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82"
STRICT = "marking-definition--826578e1-40ad-459f-bc73-ede076f81f37"
RED = "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed"
PAP_GREEN = "marking-definition--89484dde-e3d2-547f-a6c6-d14824429eb1"
PAP_RED = "marking-definition--4e4e3b84-de45-53df-9d9b-b21207699fd8"
CUSTOM_RED = "marking-definition--c0c0c0c0-1111-4222-8333-444455556666"  # an org's own "TLP:RED"
CUSTOM_PAP = "marking-definition--c0c0c0c0-1111-4222-8333-777788889999"
STATEMENT = "marking-definition--c0c0c0c0-1111-4222-8333-aaaabbbbcccc"
UNKNOWN = "marking-definition--deadbeef-0000-4000-8000-000000000000"
EXT = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"

# What the platform answers to markingDefinition(id) (docs/protocol.md §8.6).
PLATFORM = {
    CUSTOM_RED: {"standard_id": CUSTOM_RED, "definition_type": "TLP", "definition": "TLP:RED"},
    CUSTOM_PAP: {"standard_id": CUSTOM_PAP, "definition_type": "PAP", "definition": "PAP:RED"},
    STATEMENT: {"standard_id": STATEMENT, "definition_type": "statement", "definition": "(c) X"},
}


def platform_knowing(known: dict[str, dict[str, Any]] | None = None) -> FakePlatform:
    """markingDefinition(id) answers ``known`` (default: PLATFORM)."""
    return FakePlatform(markings=PLATFORM if known is None else known)


def asked(platform: FakePlatform) -> list[str]:
    """The marking ids read from the platform, in order."""
    return [call[1] for call in platform.calls if call[0] == "marking"]


def domain_job(entity_changes: dict[str, Any], name: str = "auto_create_domain_green") -> Job:
    body = json.loads(job_body(f"{name}.json"))
    entity = json.loads(body["event"]["stix_entity"])
    entity.update(entity_changes)
    body["event"]["stix_entity"] = json.dumps(entity)
    return parse_job(json.dumps(body).encode())


async def refusal(
    job: Job,
    max_tlp: str = "TLP:AMBER",
    max_pap: str | None = None,
    platform: FakePlatform | None = None,
) -> str | None:
    assert job.observable is not None
    gate = MarkingGate(max_tlp, max_pap)
    return await gate.refusal(job, job.observable, (platform or platform_knowing()).read_marking)


# --------------------------------------------------------------------------------------------------
# TLP


@pytest.mark.parametrize(
    ("refs", "refused"),
    [
        ([], False),
        ([CLEAR], False),
        ([GREEN], False),
        ([AMBER], False),
        ([STRICT], True),
        ([RED], True),
        ([GREEN, RED, AMBER], True),  # the most restrictive wins
        ([RED.upper()], True),  # ids compare case-insensitively
        ([STRICT.replace("marking", "MARKING")], True),
    ],
)
async def test_standard_tlp_ids(refs: list[str], refused: bool) -> None:
    reason = await refusal(domain_job({"object_marking_refs": refs}))
    assert (reason is not None) is refused, reason
    if refused:
        assert reason is not None and reason.endswith(
            "is above the max TLP TLP:AMBER: not sent to LastInfoSec"
        )


async def test_custom_tlp_marking_is_resolved_on_the_platform_once() -> None:
    platform = platform_knowing()
    gate = MarkingGate("TLP:AMBER")
    job = domain_job({"object_marking_refs": [GREEN, CUSTOM_RED]})
    assert job.observable is not None
    for _ in range(3):
        reason = await gate.refusal(job, job.observable, platform.read_marking)
        assert reason == "TLP:RED is above the max TLP TLP:AMBER: not sent to LastInfoSec"
    assert asked(platform) == [CUSTOM_RED]  # cached in the worker; standard ids never asked


async def test_marking_nobody_can_resolve_is_above_the_max() -> None:
    platform = platform_knowing()
    reason = await refusal(domain_job({"object_marking_refs": [GREEN, UNKNOWN]}), platform=platform)
    assert reason == (
        f"marking {UNKNOWN} cannot be resolved (it may be a TLP or a PAP): treated as above "
        "the max TLP TLP:AMBER, not sent to LastInfoSec"
    )
    assert asked(platform) == [UNKNOWN]


async def test_unresolved_markings_are_not_cached() -> None:
    cache = MarkingCache()
    gate = MarkingGate("TLP:AMBER", cache=cache)
    platform = platform_knowing(known={})
    job = domain_job({"object_marking_refs": [CUSTOM_RED]})
    assert job.observable is not None
    assert await gate.refusal(job, job.observable, platform.read_marking) is not None
    platform.markings = dict(PLATFORM)  # the marking shows up on the platform
    assert await gate.refusal(job, job.observable, platform.read_marking) == (
        "TLP:RED is above the max TLP TLP:AMBER: not sent to LastInfoSec"
    )
    assert len(cache) == 1


async def test_unknown_tlp_level_is_above_the_max() -> None:
    orange = {
        UNKNOWN: {"standard_id": UNKNOWN, "definition_type": "TLP", "definition": "TLP:ORANGE"}
    }
    reason = await refusal(
        domain_job({"object_marking_refs": [UNKNOWN]}), platform=platform_knowing(orange)
    )
    assert reason == (
        "TLP:ORANGE is not a known TLP level: treated as above the max TLP TLP:AMBER, not sent "
        "to LastInfoSec"
    )


async def test_statement_markings_are_not_the_gates_business() -> None:
    assert await refusal(domain_job({"object_marking_refs": [GREEN, STATEMENT]})) is None


async def test_a_statement_named_like_a_tlp_counts_as_that_tlp() -> None:
    named = {
        UNKNOWN: {"standard_id": UNKNOWN, "definition_type": "statement", "definition": "tlp:red"}
    }
    reason = await refusal(
        domain_job({"object_marking_refs": [UNKNOWN]}), platform=platform_knowing(named)
    )
    assert reason is not None and reason.startswith("TLP:RED is above the max TLP")


async def test_red_only_in_the_opencti_extension() -> None:
    job = domain_job(
        {"object_marking_refs": [GREEN], "extensions": {EXT: {"object_marking_refs": [RED]}}}
    )
    assert (await refusal(job) or "").startswith("TLP:RED is above the max TLP")


async def test_red_only_in_object_marking_nodes() -> None:
    """pycti's flat entity and GraphQL records carry objectMarking nodes that say what the
    marking is: no platform read needed, even for a custom id."""
    platform = platform_knowing(known={})
    node = {"standard_id": CUSTOM_RED, "definition_type": "TLP", "definition": "TLP:RED"}
    job = domain_job({"object_marking_refs": [], "objectMarking": [node]})
    assert (await refusal(job, platform=platform) or "").startswith("TLP:RED is above")
    assert asked(platform) == []


async def test_unreadable_marking_entries_are_above_the_max() -> None:
    job = domain_job({"object_marking_refs": [GREEN, {"id": RED}]})
    assert (await refusal(job) or "").startswith(
        "1 marking entry(ies) of the entity cannot be read"
    )


async def test_draft_job_is_judged_the_same() -> None:
    job = parse_job(job_body("auto_update_hostname_red_draft.json"))
    assert job.draft_id is not None
    assert (await refusal(job) or "").startswith("TLP:RED is above the max TLP")


def playbook_marking_custom_red_as(level: str) -> dict[str, Any]:
    """The playbook job's body, its entity marked CUSTOM_RED and its bundle defining CUSTOM_RED
    as the TLP ``level`` (``"red"``, ``"clear"``)."""
    body: dict[str, Any] = json.loads(job_body("playbook_url.json"))
    bundle = body["event"]["bundle"]
    bundle["objects"][0]["object_marking_refs"] = [CUSTOM_RED]
    bundle["objects"].append(
        {
            "type": "marking-definition",
            "spec_version": "2.1",
            "id": CUSTOM_RED,
            "created": "2024-01-01T00:00:00.000Z",
            "definition_type": "TLP",
            "name": f"TLP:{level.upper()}",
            "definition": {"tlp": level},
        }
    )
    return body


async def test_playbook_bundle_marking_objects_resolve_custom_ids() -> None:
    body = playbook_marking_custom_red_as("red")
    bundle = body["event"]["bundle"]
    platform = platform_knowing(known={})
    job = parse_job(json.dumps(body).encode())
    assert (await refusal(job, platform=platform) or "").startswith("TLP:RED is above the max TLP")
    assert asked(platform) == []
    # Without the marking object, the platform is asked; it does not know it: refused too.
    del bundle["objects"][-1]
    assert (
        await refusal(parse_job(json.dumps(body).encode()), platform=platform) or ""
    ).startswith(f"marking {CUSTOM_RED} cannot be resolved")


async def test_open_gate_reads_nothing() -> None:
    platform = platform_knowing()
    job = domain_job({"object_marking_refs": [RED, UNKNOWN, CUSTOM_PAP]})
    assert await refusal(job, max_tlp="TLP:RED", platform=platform) is None
    assert asked(platform) == []


# --------------------------------------------------------------------------------------------------
# PAP


@pytest.mark.parametrize(
    ("max_pap", "refs", "refused"),
    [
        (None, [PAP_RED], False),  # no PAP gate by default
        ("PAP:AMBER", [PAP_GREEN], False),
        ("PAP:AMBER", [PAP_RED], True),
        ("PAP:AMBER", [PAP_RED.upper()], True),
        ("PAP:AMBER", [CUSTOM_PAP], True),  # resolved on the platform: PAP:RED
        ("PAP:RED", [PAP_RED], False),
    ],
)
async def test_pap_gate(max_pap: str | None, refs: list[str], refused: bool) -> None:
    reason = await refusal(domain_job({"object_marking_refs": [GREEN, *refs]}), max_pap=max_pap)
    assert (reason is not None) is refused, reason
    if refused:
        assert reason == f"PAP:RED is above the max PAP {max_pap}: not sent to LastInfoSec"


async def test_pap_gate_alone_refuses_unresolvable_markings() -> None:
    reason = await refusal(
        domain_job({"object_marking_refs": [UNKNOWN]}), max_tlp="TLP:RED", max_pap="PAP:GREEN"
    )
    assert reason is not None and reason.endswith(
        "treated as above the max PAP PAP:GREEN, not sent to LastInfoSec"
    )


def test_standard_pap_ids_are_opencti_s() -> None:
    from pycti import MarkingDefinition

    for ident, marking in STANDARD_MARKINGS.items():
        assert MarkingDefinition.generate_id(marking.definition_type, marking.definition) == ident


# --------------------------------------------------------------------------------------------------
# What the job says about a marking can only make the verdict stricter (issue #20, finding 5)

CLEAR_NODE = {"standard_id": CUSTOM_RED, "definition_type": "TLP", "definition": "TLP:CLEAR"}


async def test_an_object_marking_node_cannot_lower_a_custom_red() -> None:
    platform = platform_knowing()  # the platform says CUSTOM_RED is TLP:RED
    job = domain_job({"object_marking_refs": [CUSTOM_RED], "objectMarking": [CLEAR_NODE]})
    reason = await refusal(job, platform=platform)
    assert reason == "TLP:RED is above the max TLP TLP:AMBER: not sent to LastInfoSec"
    assert asked(platform) == [CUSTOM_RED]


async def test_a_playbook_bundle_cannot_lower_a_custom_red() -> None:
    body = playbook_marking_custom_red_as("clear")
    reason = await refusal(parse_job(json.dumps(body).encode()))
    assert reason == "TLP:RED is above the max TLP TLP:AMBER: not sent to LastInfoSec"


async def test_a_lenient_claim_about_a_marking_the_platform_lacks_is_refused() -> None:
    job = domain_job({"object_marking_refs": [CUSTOM_RED], "objectMarking": [CLEAR_NODE]})
    reason = await refusal(job, platform=platform_knowing(known={}))
    assert reason is not None and reason.startswith(f"marking {CUSTOM_RED} cannot be resolved")


async def test_a_stricter_claim_wins_over_the_platform() -> None:
    lenient = {
        CUSTOM_RED: {"standard_id": CUSTOM_RED, "definition_type": "TLP", "definition": "TLP:CLEAR"}
    }
    platform = platform_knowing(lenient)
    red = {"standard_id": CUSTOM_RED, "definition_type": "TLP", "definition": "TLP:RED"}
    pap = {"standard_id": CUSTOM_RED, "definition_type": "PAP", "definition": "PAP:RED"}
    job = domain_job({"object_marking_refs": [CUSTOM_RED], "objectMarking": [red]})
    assert await refusal(job, platform=platform) == (
        "TLP:RED is above the max TLP TLP:AMBER: not sent to LastInfoSec"
    )
    assert asked(platform) == []  # refused on the job's word: nothing to ask
    # A claim that does not refuse by itself (a PAP without a PAP gate) still asks the platform,
    # and with both lenient the observable goes.
    job = domain_job({"object_marking_refs": [CUSTOM_RED], "objectMarking": [pap]})
    assert await refusal(job, platform=platform) is None
    assert asked(platform) == [CUSTOM_RED]
    assert await refusal(job, max_pap="PAP:AMBER", platform=platform) == (
        "PAP:RED is above the max PAP PAP:AMBER: not sent to LastInfoSec"
    )
