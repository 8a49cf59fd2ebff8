"""Simulated OpenCTI platform: an aiohttp GraphQL endpoint plus real RabbitMQ declarations.

Used by end-to-end tests, the demo and the benchmark. It implements the subset of the platform
that an internal-enrichment connector (pycti's ``OpenCTIConnectorHelper`` or ``lis_async``) talks
to (see docs/protocol.md §10):

* ``POST /graphql`` dispatched on the root field (and the ``workEdit`` sub-field) found with a
  precompiled regex; the dispatch decision is cached per query text, so a request costs one
  ``orjson.loads``, a dict lookup and one ``orjson.dumps``. No GraphQL library: the answers are
  fixed super-sets of what pycti selects, and arguments must be passed as *variables*.
* Bearer token check (``AUTH_REQUIRED`` as HTTP 200 GraphQL error, like the platform).
* Connector registration / heartbeat, with the platform's queue topology really declared on
  RabbitMQ (aio-pika) on every ``registerConnector`` and ``pingConnector``; the connector's
  ``connector_queue_details`` measured on the broker.
* Works (jobs) with the platform's expectation accounting and ``WORK_NOT_ALIVE``, the ``work``
  query, and a history of every work's states (``Work.history``,
  ``PlatformSim.early_completions``).
* An entity store answering ``stixCyberObservable`` / ``stixCoreObject`` in pycti's shape.
* ``playbookStepExecution`` recording and validation, ``stixBundlePush`` forwarding.
* Fault knobs: latency, error rate, outage (HTTP 503), refused connections, and an older
  schema (``missing_fields``: ``GRAPHQL_VALIDATION_FAILED``).

Call counters (``PlatformSim.calls``) use *canonical* operation names, i.e. the operation names
pycti uses (``healthCheck``, ``RegisterConnector``, ``PingConnector``, ``StixCyberObservable``,
``workToReceived``, ``addExpectations``, ``reportExpectation``, ``workToProcessed``, ``pingWork``,
``WorkQuery``, ``PlaybookStepExecution`` …) whatever name the client gave its operation, so that
pycti and lis_async runs can be compared. The name the client sent is kept in
``RecordedRequest.operation_name``.

Dependencies: aiohttp, aio-pika and orjson always; ``stix2`` when a playbook bundle is checked;
``cryptography`` when an answer selects ``jwks``; PyJWT (and cryptography) for
``PlatformSim.connector_jwt()``. The optional ones are imported on first use.

Modules:

* ``config``: :class:`PlatformSimConfig` (the knobs) and the records :class:`Work`,
  :class:`ConnectorRecord`, :class:`RecordedRequest`;
* ``errors``: the error answers (:class:`SimGraphQLError`, :class:`WorkNotAlive`,
  ``GraphQLValidationFailed``) and ``SimDependencyError``;
* ``graphql``: query classification, selected fields, the emulated-schema check, handler types;
* ``endpoint``: the ``POST /graphql`` pipeline (record, outage, latency, validation, auth,
  injected errors, dispatch);
* ``works``: work lifecycle, expectations, the ``work`` query, ``wait_works``, early completions;
* ``connectors``: registration, heartbeat, state, the ``Connector`` answer;
* ``queues``: queue names and the RabbitMQ declarations with the platform's arguments;
* ``meter``: ``connector_queue_details``, the push queue's messages and bytes asked of the broker;
* ``entities`` / ``nodes``: the entity store and reads / how a STIX entity renders as a node;
* ``bundles``: ``playbookStepExecution`` and ``stixBundlePush``;
* ``faults``: outage, latency, injected errors;
* ``signing``: the lazily made Ed25519 key behind ``jwks`` and ``connector_jwt``;
* ``changes``: change notification behind the ``wait_*`` helpers;
* ``formats``: timestamps and derived ids;
* ``server``: the aiohttp app and :class:`PlatformSim`, which composes the parts.
"""

from __future__ import annotations

from lis_async.sim.opencti.config import (
    ConnectorRecord,
    PlatformSimConfig,
    RecordedRequest,
    Work,
    WorkState,
)
from lis_async.sim.opencti.errors import (
    WORK_NOT_ALIVE_MESSAGE,
    GraphQLValidationFailed,
    SimDependencyError,
    SimGraphQLError,
    WorkNotAlive,
)
from lis_async.sim.opencti.graphql import WORK_MUTATIONS, classify_query
from lis_async.sim.opencti.nodes import STIX_EXT_OCTI, STIX_EXT_OCTI_SCO, TLP_MARKINGS
from lis_async.sim.opencti.server import PlatformSim
from lis_async.sim.opencti.works import EarlyCompletion

__all__ = [
    "STIX_EXT_OCTI",
    "STIX_EXT_OCTI_SCO",
    "TLP_MARKINGS",
    "WORK_MUTATIONS",
    "WORK_NOT_ALIVE_MESSAGE",
    "ConnectorRecord",
    "EarlyCompletion",
    "GraphQLValidationFailed",
    "PlatformSim",
    "PlatformSimConfig",
    "RecordedRequest",
    "SimDependencyError",
    "SimGraphQLError",
    "Work",
    "WorkNotAlive",
    "WorkState",
    "classify_query",
]
