"""The LastInfoSec (Gatewatcher) client.

* :mod:`~lis_async.lastinfosec.client`: the HTTP client and the order of a lookup;
* :mod:`~lis_async.lastinfosec.wire`: queries, URL pieces and answer parsing (pure);
* :mod:`~lis_async.lastinfosec.limiter`: the client-wide rate limit;
* :mod:`~lis_async.lastinfosec.budget`: the daily budget (requests per UTC day), its state file;
* :mod:`~lis_async.lastinfosec.cache`: the answer cache;
* :mod:`~lis_async.lastinfosec.outage`: the outage gate (LastInfoSec down: jobs wait).

Errors are in :mod:`lis_async.errors`; the result type in :mod:`lis_async.enrichment.ports`.
"""

from lis_async.lastinfosec.client import LastInfoSecClient, LisStats
from lis_async.lastinfosec.limiter import PacedLimiter

__all__ = ["LastInfoSecClient", "LisStats", "PacedLimiter"]
