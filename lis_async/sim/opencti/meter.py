"""``connector_queue_details`` of the simulated platform: real figures of the connector's push
queue, asked of the broker.

The platform fills the field from RabbitMQ's own counters of the connector's push queue
(``messages``: ready plus unacknowledged; ``message_bytes``: the sum of their bodies, headers
and properties not counted), see docs/protocol.md §2.3. The double asks the same broker for the
same counters, without RabbitMQ's management plugin:

* a passive declare of the push queue first (cheap): no message ready is answered ``{0, 0}`` at
  once. That leaves out the messages a consumer holds unacknowledged (the emulated workers'
  prefetch, at most 64 here) while nothing waits behind them: a listing per check would cost
  the end-to-end tests a CPU core while the emulated workers keep up;
* otherwise ``rabbitmqctl list_queues -p <vhost> name messages message_bytes``, the counters the
  management API serves (unacknowledged messages included). It costs about a second of CPU (an
  Erlang VM starts), so one listing serves every connector for ``queue_details_ttl_s`` and
  concurrent requests share it.

``rabbitmqctl`` talks to the local node only: the meter uses it when it is on ``PATH`` and the
broker is on loopback (``PlatformSimConfig.queue_details = "auto"``, the default), or always
(``"rabbitmqctl"``). Otherwise (``"off"``, no broker, no ``rabbitmqctl``) and when a listing
fails, the answer is ``{0, 0}``: the threshold then never holds. A queue absent from the broker
is ``{0, 0}`` too.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from urllib.parse import urlsplit

from lis_async.sim.opencti.config import ConnectorRecord, PlatformSimConfig
from lis_async.sim.opencti.queues import BrokerQueues

__all__ = ["QueueMeter"]

log = logging.getLogger(__name__)

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_EMPTY = {"messages_number": 0, "messages_size": 0}


class QueueMeter:
    """The push queue's ``{messages_number, messages_size}`` (see the module docstring)."""

    def __init__(self, config: PlatformSimConfig, broker: BrokerQueues) -> None:
        self._config = config
        self._broker = broker
        self._lock = asyncio.Lock()
        self._listing: dict[str, dict[str, int]] = {}
        self._listed_at = -float("inf")
        #: ``rabbitmqctl`` runs so far (tests check the cost stays bounded)
        self.listings = 0

    @property
    def uses_rabbitmqctl(self) -> bool:
        mode, url = self._config.queue_details, self._config.amqp_url
        if mode == "off" or url is None or shutil.which("rabbitmqctl") is None:
            return False
        return mode == "rabbitmqctl" or urlsplit(url).hostname in _LOOPBACK

    async def details(self, rec: ConnectorRecord) -> dict[str, int]:
        """``connector_queue_details`` of that connector."""
        if not self.uses_rabbitmqctl:
            return dict(_EMPTY)
        push = rec.names.get("push", "")
        counts = await self._broker.counts(push)
        if counts is None or counts[0] == 0:  # absent, or nothing ready (see above)
            return dict(_EMPTY)
        listing = await self._list()
        return dict(listing.get(push, _EMPTY))

    async def _list(self) -> dict[str, dict[str, int]]:
        async with self._lock:
            if time.monotonic() - self._listed_at >= self._config.queue_details_ttl_s:
                self._listing = await self._rabbitmqctl()
                self._listed_at = time.monotonic()
            return self._listing

    async def _rabbitmqctl(self) -> dict[str, dict[str, int]]:
        """Every queue of the vhost: name -> details; ``{}`` when the listing fails."""
        self.listings += 1
        args = ["-q", "list_queues", "-p", self._config.rabbit_vhost]
        args += ["name", "messages", "message_bytes", "--no-table-headers"]
        try:
            proc = await asyncio.create_subprocess_exec(
                "rabbitmqctl",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            log.warning("rabbitmqctl list_queues failed: %s", exc)
            return {}
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.warning("rabbitmqctl list_queues did not answer within 30 s")
            return {}
        if proc.returncode != 0:
            log.warning("rabbitmqctl list_queues failed: %s", err.decode(errors="replace")[:300])
            return {}
        listing: dict[str, dict[str, int]] = {}
        for line in out.decode(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                listing[parts[0]] = {
                    "messages_number": int(parts[1]),
                    "messages_size": int(parts[2]),
                }
        return listing
