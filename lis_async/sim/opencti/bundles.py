"""Bundles connectors send back to the simulated platform over GraphQL.

* ``playbookStepExecution``: a playbook-triggered enrichment hands its output bundle back.
  Every call is recorded in ``playbook_calls`` with its variables, the parsed bundle and the
  problems found (missing variables, invalid JSON, bundle without the data instance, bundle
  ``stix2`` cannot parse); with ``strict_playbook`` a call with problems is refused.
* ``stixBundlePush`` (pycti's "api" queue protocol): the bundle is recorded in
  ``bundle_pushes`` and forwarded to the connector's push queue as the platform does, in a
  work of its own when the caller gave none.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from lis_async.sim.opencti.changes import ChangeNotifier
from lis_async.sim.opencti.config import PlatformSimConfig
from lis_async.sim.opencti.connectors import ConnectorRegistry
from lis_async.sim.opencti.errors import SimGraphQLError
from lis_async.sim.opencti.graphql import Handler, RequestContext
from lis_async.sim.opencti.queues import BrokerQueues
from lis_async.sim.opencti.works import WorkTracker

__all__ = ["BundleIntake", "check_stix_bundle"]

_PLAYBOOK_VARIABLES = (
    "execution_id",
    "event_id",
    "execution_start",
    "data_instance_id",
    "playbook_id",
    "previous_step_id",
    "step_id",
    "previous_bundle",
    "bundle",
)


def check_stix_bundle(bundle: Any, instance_id: Any) -> list[str]:
    """Problems of a playbook output bundle (empty list when fine)."""
    problems: list[str] = []
    if not isinstance(bundle, dict) or bundle.get("type") != "bundle":
        return ["bundle is not a STIX bundle object"]
    objects = bundle.get("objects") or []
    if not any(isinstance(o, dict) and o.get("id") == instance_id for o in objects):
        problems.append(f"bundle lacks the data instance {instance_id}")
    try:
        import stix2

        stix2.parse(bundle, allow_custom=True, version="2.1")
    except Exception as exc:
        problems.append(f"stix2 cannot parse the bundle: {type(exc).__name__}: {exc}")
    return problems


class BundleIntake:
    """Records playbook step results and forwards pushed bundles to the push queues."""

    def __init__(
        self,
        config: PlatformSimConfig,
        connectors: ConnectorRegistry,
        works: WorkTracker,
        broker: BrokerQueues,
        changes: ChangeNotifier,
    ) -> None:
        self.playbook_calls: list[dict[str, Any]] = []
        self.bundle_pushes: list[dict[str, Any]] = []
        self._config = config
        self._connectors = connectors
        self._works = works
        self._broker = broker
        self._changes = changes

    def handlers(self) -> dict[str, Handler]:
        return {
            "PlaybookStepExecution": self._op_playbook_step,
            "StixBundlePush": self._op_bundle_push,
        }

    def _record_playbook_call(self, call: dict[str, Any], ctx: RequestContext) -> None:
        call["applicant_id"], call["time"] = ctx.applicant_id, time.time()
        self.playbook_calls.append(call)
        self._changes.notify()

    async def _op_playbook_step(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        call: dict[str, Any] = {k: v.get(k) for k in _PLAYBOOK_VARIABLES}
        problems = [f"missing variable {k}" for k in _PLAYBOOK_VARIABLES if not v.get(k)]
        parsed: Any = None
        try:
            parsed = orjson.loads(v.get("bundle") or "")
            orjson.loads(v.get("previous_bundle") or "")
        except orjson.JSONDecodeError as exc:
            call.update(valid=False, problems=[*problems, f"invalid JSON: {exc}"], parsed=None)
            self._record_playbook_call(call, ctx)
            raise SimGraphQLError("FUNCTIONAL_ERROR", f"Invalid bundle JSON: {exc}", 400) from exc
        problems.extend(check_stix_bundle(parsed, v.get("data_instance_id")))
        call.update(valid=not problems, problems=problems, parsed=parsed)
        self._record_playbook_call(call, ctx)
        if problems and self._config.strict_playbook:
            raise SimGraphQLError(
                "VALIDATION_ERROR",
                "Invalid playbook bundle: " + "; ".join(problems),
                400,
                "BUSINESS",
            )
        return {"playbookStepExecution": True}

    async def _op_bundle_push(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        """``stixBundlePush`` (pycti "api" queue protocol): forward the bundle to the push queue."""
        cid = str(v.get("connectorId") or "")
        raw = v.get("bundle")
        try:
            bundle = orjson.loads(raw or "")
            if bundle.get("type") != "bundle" or not bundle.get("objects"):
                raise ValueError("not a bundle")
        except Exception as exc:
            raise SimGraphQLError("UNSUPPORTED_ERROR", "Invalid bundle", 500) from exc
        rec = self._connectors.connectors.get(cid)
        if rec is None:
            raise SimGraphQLError("FUNCTIONAL_ERROR", "No connector found", 400, "BUSINESS")
        work_id = v.get("work_id")
        if not work_id:
            work_id = self._works.create(cid, "Bundle push")
            if len(bundle["objects"]) == 1:
                self._works.add_expectations(work_id, 1)
        message = {
            "type": "bundle",
            "applicant_id": self._config.connector_user_id,
            "content": base64.b64encode(str(raw).encode()).decode(),
            "work_id": work_id,
            "update": True,
        }
        self.bundle_pushes.append({"connector_id": cid, "work_id": work_id, "bundle": bundle})
        await self._broker.publish(
            rec.names["push_exchange"], rec.names["push_routing"], orjson.dumps(message)
        )
        self._changes.notify()
        return {"stixBundlePush": True}
