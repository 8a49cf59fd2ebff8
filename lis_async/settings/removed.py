"""Settings lis-async no longer reads: each one that is set is named in one start-up WARNING.

They were lis-async's own knobs (internal intervals, retry details) that no operator needs to
turn; each is now a constant where it is used. Environment files and ``config.yml`` files are
copied from one deployment to the next, so a removed setting never stops the start: it is
ignored, and said to be (:attr:`lis_async.settings.model.Settings.ignored`, logged by the app).
docs/configuration.md lists them (generated from :data:`REMOVED`).

Values are looked up the way the loader reads settings: the environment variable ``SECTION_KEY``
or the ``config.yml`` key ``section.key``; an empty value is "not set".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["REMOVED", "Removed", "ignored"]


@dataclass(frozen=True, slots=True)
class Removed:
    """One setting lis-async used to read."""

    section: str
    key: str
    #: what lis-async does instead, for the warning and the reference
    now: str

    @property
    def env(self) -> str:
        return f"{self.section}_{self.key}".upper()

    @property
    def where(self) -> str:
        return f"{self.env} ({self.section}.{self.key})"


REMOVED: Final[tuple[Removed, ...]] = (
    Removed(
        "connector",
        "platform_probe_s",
        "while OpenCTI is down, its health is probed at a fixed interval",
    ),
    Removed(
        "connector",
        "lanes_expire_s",
        "the priority lane deletes itself after a fixed week without a consumer",
    ),
    Removed(
        "lastinfosec",
        "retries",
        "transient failures are retried by time, for LASTINFOSEC_RETRY_BUDGET_S",
    ),
    Removed(
        "lastinfosec",
        "outage_probe_s",
        "while LastInfoSec is down, it is probed at a fixed interval",
    ),
    Removed(
        "redis",
        "connect_timeout_s",
        "a Redis connection attempt has a fixed timeout",
    ),
    Removed(
        "redis",
        "probe_interval_s",
        "while Redis is down, it is probed at a fixed interval",
    ),
    Removed(
        "redis",
        "lease_s",
        "a replica's lookup holds the value for the others for a fixed time",
    ),
    Removed(
        "redis",
        "coalesce_wait_s",
        "a replica waits for another replica's answer for a fixed time",
    ),
)


def ignored(
    yaml_data: Mapping[str, Any], env: Mapping[str, str], is_set: Callable[[Any], bool]
) -> list[str]:
    """One line per removed setting that is set (in either source); never its value."""
    out: list[str] = []
    for entry in REMOVED:
        block = yaml_data.get(entry.section)
        in_yaml = isinstance(block, Mapping) and is_set(block.get(entry.key))
        if is_set(env.get(entry.env)) or in_yaml:
            out.append(f"{entry.where} is no longer a setting and is ignored: {entry.now}")
    return out
