"""A job's bundle turned into push messages: pycti's splitter and pycti's envelope. Pure.

OpenCTI's workers import one STIX object per message (docs/protocol.md §6), so a bundle is split
with pycti's own splitter (dependencies first) and each piece is wrapped in pycti's push envelope
(docs/protocol.md §5.1). Publishing them is the publisher's job.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Delivery:
    """The push messages of one job, ready to publish (bodies in ``action_sequence`` order)."""

    bodies: tuple[bytes, ...]
    incompatible: int  # objects the splitter dropped (types OpenCTI cannot import)
    work_id: str | None = None  # for log lines only

    @property
    def objects(self) -> int:
        """STIX objects delivered: pycti's splitter puts one object in each message."""
        return len(self.bodies)


def split_bundle(bundle: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """pycti's splitter: one bundle per object, dependencies first. Returns (bundles, dropped)."""
    from pycti.utils.opencti_stix2_splitter import OpenCTIStix2Splitter

    _, incompatible, bundles = OpenCTIStix2Splitter().split_bundle_with_expectations(
        bundle, use_json=False
    )
    return bundles, len(incompatible)


def envelope(
    content: bytes,
    *,
    sequence: int,
    applicant_id: str | None,
    draft_id: str | None,
    work_id: str | None,
) -> bytes:
    """pycti's push message, keys in pycti's order (docs/protocol.md §5.1)."""
    message: dict[str, Any] = {
        "bundle_type": "QUEUE_BUNDLE",
        "applicant_id": applicant_id,
        "action_sequence": sequence,
        "entities_types": [],
        "content": base64.b64encode(content).decode("ascii"),
        "update": False,
        "draft_id": draft_id,
        "no_split": False,
    }
    if work_id is not None:
        message["work_id"] = work_id
    return orjson.dumps(message)


def prepare(
    bundle: dict[str, Any], *, applicant_id: str | None, draft_id: str | None, work_id: str | None
) -> Delivery:
    """Split ``bundle`` and wrap every piece in its envelope."""
    bundles, incompatible = split_bundle(bundle)
    bodies = tuple(
        envelope(
            orjson.dumps(b),
            sequence=i,
            applicant_id=applicant_id,
            draft_id=draft_id,
            work_id=work_id,
        )
        for i, b in enumerate(bundles, start=1)
    )
    return Delivery(bodies=bodies, incompatible=incompatible, work_id=work_id)
