"""Value formats shared by the parts of the simulated platform.

Platform timestamps (``2025-05-02T10:00:02.415Z``), internal ids derived from standard ids
(stable per value, so answers are reproducible) and the platform's reading of list inputs.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

__all__ = ["NAMESPACE", "as_str_list", "derived_id", "iso"]

#: namespace of the internal ids (and key ids) the simulator derives
NAMESPACE = uuid.UUID("0b0d8f6e-6a53-4c42-9f1e-2f6b5e0c7a11")


def iso(ts: float) -> str:
    """Epoch seconds as the platform writes dates: UTC, milliseconds, ``Z``."""
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def derived_id(value: str) -> str:
    """A stable internal id (UUID v5) for ``value``."""
    return str(uuid.uuid5(NAMESPACE, value))


def as_str_list(value: Any) -> list[str]:
    """A list input as the platform reads it: a list, or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [str(v) for v in value]
