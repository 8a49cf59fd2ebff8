"""Connectors of the simulated platform: registration, heartbeat, state, deletion.

``registerConnector`` validates the input like the platform's schema (optionally an older one,
``PlatformSimConfig.register_input_fields``), creates or updates the
:class:`~lis_async.sim.opencti.config.ConnectorRecord`, declares the queue topology on the
broker and answers the ``Connector`` with its ``config`` block (broker credentials, S3, queue
names). ``pingConnector`` re-declares the queues, records the heartbeat and stores the state
(or answers ``""`` once after an admin "reset state"). ``jwks`` is computed only when the
document selects it, since it needs the optional ``cryptography`` package;
``connector_queue_details`` is measured on the broker (:mod:`lis_async.sim.opencti.meter`) only
when the document selects it, and is zeros otherwise.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from lis_async.sim.opencti.changes import ChangeNotifier
from lis_async.sim.opencti.config import ConnectorRecord, PlatformSimConfig
from lis_async.sim.opencti.errors import SimGraphQLError
from lis_async.sim.opencti.formats import as_str_list, iso
from lis_async.sim.opencti.graphql import Handler, RequestContext
from lis_async.sim.opencti.meter import QueueMeter
from lis_async.sim.opencti.queues import BrokerQueues, connector_queue_names
from lis_async.sim.opencti.signing import jwks_json

__all__ = ["ConnectorRegistry"]


class ConnectorRegistry:
    """All connectors by id, and the connector GraphQL operations."""

    def __init__(
        self, config: PlatformSimConfig, broker: BrokerQueues, changes: ChangeNotifier
    ) -> None:
        self.connectors: dict[str, ConnectorRecord] = {}
        self._config = config
        self._broker = broker
        self._changes = changes
        self.meter = QueueMeter(config, broker)

    # ---------------------------------------------------------------- in-process API

    def names(self, connector_id: str) -> dict[str, str]:
        """Queue names for that connector, with the current ``queue_prefix``."""
        return connector_queue_names(self._config.queue_prefix, connector_id)

    def known_names(self, connector_id: str) -> dict[str, str]:
        """The names the connector was registered with, else the current ones."""
        rec = self.connectors.get(connector_id)
        return rec.names if rec is not None and rec.names else self.names(connector_id)

    def registration(self, connector_id: str) -> dict[str, Any]:
        """The ``config`` block of the registration answer for that connector."""
        rec = self.connectors.get(connector_id)
        names = self.known_names(connector_id)
        c = self._config
        return {
            "connection": {
                "host": c.rabbit_host,
                "vhost": c.rabbit_vhost,
                "use_ssl": c.rabbit_use_ssl,
                "port": c.rabbit_port,
                "user": c.rabbit_user,
                "pass": c.rabbit_pass,
            },
            "s3": {
                "endpoint": "127.0.0.1",
                "port": 9000,
                "use_ssl": False,
                "bucket_name": "opencti-bucket",
                "bucket_region": "us-east-1",
                "access_key": "sim-access-key",
                "secret_key": "sim-secret-key",
            },
            "listen": names["listen"],
            "listen_routing": names["listen_routing"],
            "listen_exchange": names["listen_exchange"],
            "listen_callback_uri": rec.listen_callback_uri if rec is not None else None,
            "push": names["push"],
            "push_routing": names["push_routing"],
            "push_exchange": names["push_exchange"],
            "dead_letter_routing": names["dead_letter_routing"],
        }

    def reset_state(self, connector_id: str) -> None:
        """Admin "reset state": the next ping stores and returns ``connector_state: ""``."""
        rec = self.connectors.get(connector_id)
        if rec is None:
            raise KeyError(connector_id)
        rec.state_reset_pending = True

    def answer(self, rec: ConnectorRecord, jwks: str | None) -> dict[str, Any]:
        """The platform's ``Connector`` object (``jwks`` left out when not selected)."""
        out: dict[str, Any] = {
            "id": rec.id,
            "name": rec.name,
            "active": rec.active,
            "auto": rec.auto,
            "only_contextual": rec.only_contextual,
            "connector_type": rec.type,
            "connector_scope": rec.scope,
            "connector_state": rec.state,
            "connector_queue_details": {"messages_number": 0, "messages_size": 0},
            "connector_info": rec.connector_info,
            "connector_user_id": self._config.connector_user_id,
            "connector_user": {"api_tokens": []},
            "connector_priority_group": None,
        }
        if jwks is not None:
            out["jwks"] = jwks
        out.update(
            config=self.registration(rec.id),
            built_in=False,
            created_at=iso(rec.registered_time),
            updated_at=iso(rec.last_seen),
        )
        return out

    # ---------------------------------------------------------------- GraphQL operations

    def handlers(self) -> dict[str, Handler]:
        return {
            "RegisterConnector": self._op_register,
            "PingConnector": self._op_ping,
            "ConnectorDeletionMutation": self._op_delete_connector,
            "GetConnector": self._op_get_connector,
            "GetConnectors": self._op_connectors_for_worker,
        }

    @staticmethod
    def _jwks_if_selected(ctx: RequestContext) -> str | None:
        return jwks_json() if ctx.selects("jwks") else None

    def _checked_register_input(self, v: dict[str, Any]) -> dict[str, Any]:
        inp = v.get("input")
        if not isinstance(inp, dict):
            raise SimGraphQLError("BAD_USER_INPUT", "Variable $input is required", 400, "BUSINESS")
        allowed = self._config.register_input_fields
        if allowed is not None:
            unknown = sorted(set(inp) - allowed)
            if unknown:
                raise SimGraphQLError(
                    "BAD_USER_INPUT",
                    f'Variable "$input" got invalid value; Field "{unknown[0]}" is not defined '
                    'by type "RegisterConnectorInput".',
                    400,
                    "BUSINESS",
                )
        cid, name, ctype = (str(inp.get(k) or "") for k in ("id", "name", "type"))
        if not cid or not name.strip() or not ctype:
            raise SimGraphQLError(
                "VALIDATION_ERROR", "Invalid connector registration input", 400, "BUSINESS"
            )
        return inp

    def _upsert(self, inp: dict[str, Any], now: float) -> ConnectorRecord:
        """Create (or re-create, when deleted) the record and copy the registration input."""
        cid = str(inp.get("id") or "")
        rec = self.connectors.get(cid)
        if rec is None or rec.deleted:
            rec = ConnectorRecord(
                id=cid,
                name=str(inp.get("name") or ""),
                type=str(inp.get("type") or ""),
                scope=as_str_list(inp.get("scope")),
                registered_time=now,
                names=self.names(cid),
                push_queue_max_length=self._config.push_queue_max_length,
            )
            self.connectors[cid] = rec
        rec.name = str(inp.get("name") or "")
        rec.type = str(inp.get("type") or "")
        rec.scope = as_str_list(inp.get("scope"))
        rec.auto = bool(inp.get("auto") or False)
        rec.auto_update = bool(inp.get("auto_update") or False)
        rec.playbook_compatible = bool(inp.get("playbook_compatible") or False)
        rec.enrichment_resolution = inp.get("enrichment_resolution")
        rec.only_contextual = bool(inp.get("only_contextual") or False)
        rec.listen_callback_uri = inp.get("listen_callback_uri")
        rec.version = inp.get("version")
        rec.slug = inp.get("slug")
        rec.input = dict(inp)
        rec.register_count += 1
        rec.last_seen = now
        return rec

    async def _op_register(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        inp = self._checked_register_input(v)
        jwks = self._jwks_if_selected(ctx)  # before any change: it may fail (no cryptography)
        rec = self._upsert(inp, time.time())
        try:
            await self._broker.declare(rec)
        except Exception as exc:
            raise SimGraphQLError(
                "UNKNOWN_ERROR", f"Cannot register connector queues: {exc}", 500
            ) from exc
        self._changes.notify()
        return {"registerConnector": self.answer(rec, jwks)}

    async def _op_ping(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        cid = str(v.get("id") or "")
        rec = self.connectors.get(cid)
        if rec is None or rec.deleted:
            raise SimGraphQLError(
                "FUNCTIONAL_ERROR",
                "No connector found with the specified ID",
                400,
                "BUSINESS",
                {"id": cid},
            )
        with contextlib.suppress(Exception):  # logged in amqp_errors; the ping still succeeds
            await self._broker.declare(rec)
        now = time.time()
        rec.pings.append(now)
        rec.last_seen = now
        if rec.state_reset_pending:
            rec.state_reset_pending = False
            rec.state = ""
        else:
            rec.state = v.get("state")
        info = v.get("connectorInfo")
        if isinstance(info, dict):
            rec.connector_info = info
        self._changes.notify()
        return {
            "pingConnector": {
                "id": rec.id,
                "connector_state": rec.state,
                "connector_info": rec.connector_info,
            }
        }

    async def _op_delete_connector(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        cid = str(v.get("id") or "")
        rec = self.connectors.get(cid)
        if rec is not None:
            rec.deleted = True
        self._changes.notify()
        return {"deleteConnector": cid}

    async def _measured(self, ctx: RequestContext, rec: ConnectorRecord, jwks: str | None) -> Any:
        """The answer, with the queue measured when the document selects it."""
        out = self.answer(rec, jwks)
        if ctx.selects("connector_queue_details"):
            out["connector_queue_details"] = await self.meter.details(rec)
        return out

    async def _op_get_connector(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        rec = self.connectors.get(str(v.get("id") or ""))
        if rec is None or rec.deleted:
            return {"connector": None}
        return {"connector": await self._measured(ctx, rec, self._jwks_if_selected(ctx))}

    async def _op_connectors_for_worker(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        jwks = self._jwks_if_selected(ctx)
        live = [r for r in self.connectors.values() if not r.deleted]
        return {"connectorsForWorker": [await self._measured(ctx, r, jwks) for r in live]}
