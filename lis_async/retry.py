"""The one back-off policy: exponential growth with jitter, capped.

Used for LastInfoSec retries, the client-wide 429 pause, platform reports, publishes and
registration. Written here rather than taken from tenacity or backoff: every caller owns its
retry loop (each logs, counts metrics and decides what is final in its own way), and all they
need from a library is this one formula; wrapping the loops in a retry decorator would hide the
data path without removing code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry number ``attempt`` (1 for the first retry): at most
    ``min(max_s, base_s * 2 ** (attempt - 1))``.

    ``floor`` is the share of that ceiling that jitter cannot take away: 0 is "full jitter"
    (uniform in ``[0, ceiling]``, the spread that keeps independent retries from synchronising);
    0.5 keeps at least half of it, for pauses that must not collapse to nothing by chance.
    """

    base_s: float = 0.5
    max_s: float = 60.0
    floor: float = 0.0

    def ceiling(self, attempt: int) -> float:
        exponent = min(max(attempt - 1, 0), 62)  # 2**62 s is already past any cap
        return min(self.max_s, self.base_s * (2.0**exponent))

    def delay(self, attempt: int) -> float:
        top = self.ceiling(attempt)
        return top * self.floor + random.uniform(0.0, top * (1.0 - self.floor))
