"""``POST /graphql`` of the simulated platform: one request through the platform's stages.

1. Read the body (JSON, or the ``operations`` part of a multipart upload); a body that is not
   a GraphQL request gets HTTP 400.
2. Classify the document and record the request (``requests``, ``calls`` by canonical name).
3. Outage: HTTP 503 with a non-JSON body. Then the configured latency.
4. Validation against the emulated schema (``missing_fields``): ``GRAPHQL_VALIDATION_FAILED``.
5. Bearer token (``AUTH_REQUIRED``), the ``opencti-work-id`` header's work must be alive
   (``WORK_NOT_ALIVE``), injected errors.
6. The operation handler; a :class:`SimGraphQLError` is answered HTTP 200 the platform way,
   any other exception (a handler bug, bad variables) as ``UNKNOWN_ERROR``.

Arguments must be passed as variables: handlers read ``variables`` only.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from lis_async.sim.opencti.config import PlatformSimConfig, RecordedRequest
from lis_async.sim.opencti.errors import GraphQLValidationFailed, SimGraphQLError
from lis_async.sim.opencti.faults import FaultInjector
from lis_async.sim.opencti.graphql import (
    Handler,
    RequestContext,
    classify_query,
    missing_field_errors,
)
from lis_async.sim.opencti.works import WorkTracker

__all__ = ["GraphQLEndpoint", "json_response"]

log = logging.getLogger(__name__)


def json_response(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


async def _read_body(request: web.Request) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
    """(body, query, variables), or None when the body is not a GraphQL request."""
    try:
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            body = orjson.loads(str(form.get("operations") or "{}"))
        else:
            body = orjson.loads(await request.read())
        query = body["query"]
        variables = body.get("variables") or {}
        if not isinstance(query, str) or not isinstance(variables, dict):
            raise TypeError("bad body")
    except Exception:
        return None
    return body, query, variables


class GraphQLEndpoint:
    """Records, filters and dispatches GraphQL requests to the operation handlers."""

    def __init__(
        self,
        config: PlatformSimConfig,
        faults: FaultInjector,
        works: WorkTracker,
        handlers: Mapping[str, Handler],
    ) -> None:
        self._config = config
        self._faults = faults
        self._works = works
        self._handlers = dict(handlers)
        #: requests by canonical operation name
        self.calls: collections.Counter[str] = collections.Counter()
        self.requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=config.max_recorded_requests
        )

    def authorized(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        return auth == "Bearer " + self._config.token

    def _record(
        self,
        request: web.Request,
        body: dict[str, Any],
        variables: dict[str, Any],
        canonical: str,
        doc_op_name: str | None,
    ) -> RecordedRequest:
        headers = request.headers
        rec = RecordedRequest(
            time=time.time(),
            operation=canonical,
            operation_name=body.get("operationName") or doc_op_name,
            variables=variables,
            draft_id=headers.get("opencti-draft-id"),
            applicant_id=headers.get("opencti-applicant-id"),
            user_agent=headers.get("User-Agent"),
            work_id_header=headers.get("opencti-work-id"),
        )
        self.requests.append(rec)
        self.calls[canonical] += 1
        return rec

    async def handle(self, request: web.Request) -> web.StreamResponse:
        parsed = await _read_body(request)
        if parsed is None:
            return json_response({"errors": [{"message": "Invalid GraphQL request body"}]}, 400)
        body, query, variables = parsed
        canonical, doc_op_name, root = classify_query(query)
        rec = self._record(request, body, variables, canonical, doc_op_name)
        if self._faults.in_outage:
            rec.outcome = "http_503"
            return web.Response(status=503, text="503 Service Unavailable: platform outage (sim)")
        await self._faults.delay()
        try:
            ctx = RequestContext(root, query, rec.draft_id, rec.applicant_id, rec.work_id_header)
            data = await self._execute(request, rec, ctx, variables)
        except GraphQLValidationFailed as err:
            rec.outcome = err.code
            return json_response(err.payload(), self._config.validation_error_status)
        except SimGraphQLError as err:
            rec.outcome = err.code
            return json_response(err.payload())
        except Exception as exc:  # a bug in a handler or bad variables: UNKNOWN_ERROR
            log.exception("PlatformSim handler %s failed", rec.operation)
            unknown = SimGraphQLError("UNKNOWN_ERROR", f"{type(exc).__name__}: {exc}", 500)
            rec.outcome = unknown.code
            return json_response(unknown.payload())
        return json_response({"data": data})

    async def _execute(
        self,
        request: web.Request,
        rec: RecordedRequest,
        ctx: RequestContext,
        variables: dict[str, Any],
    ) -> Any:
        """Validate, check the caller, run the handler; return the answer's ``data``."""
        if self._config.missing_fields:
            errors = missing_field_errors(ctx.query, self._config.missing_fields)
            if errors:
                raise GraphQLValidationFailed(errors)
        if not self.authorized(request):
            raise SimGraphQLError(
                "AUTH_REQUIRED", "You must be logged in to do this.", 401, "TECHNICAL"
            )
        if rec.work_id_header:
            self._works.alive(rec.work_id_header)
        self._faults.maybe_fail(rec.operation)
        handler = self._handlers.get(rec.operation)
        if handler is None:
            raise SimGraphQLError(
                "UNSUPPORTED_ERROR",
                f"PlatformSim does not implement operation {rec.operation!r}",
                500,
            )
        return await handler(ctx, variables)
