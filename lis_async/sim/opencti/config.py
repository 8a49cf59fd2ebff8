"""Configuration and data records of the simulated OpenCTI platform.

:class:`PlatformSimConfig` holds the knobs (runtime-mutable: the parts read them on every
request); :class:`Work` (with its :class:`WorkState` history), :class:`ConnectorRecord` and
:class:`RecordedRequest` are what the simulator stores and what tests assert on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = ["ConnectorRecord", "PlatformSimConfig", "RecordedRequest", "Work", "WorkState"]


@dataclass
class PlatformSimConfig:
    """Runtime-mutable knobs of the simulated platform."""

    token: str = "sim-token-0c1d2e3f"
    connector_user_id: str = "1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1b"
    platform_version: str = "6.8.12"
    #: ``rabbitmq:queue_prefix``: names become ``<prefix>_amqp.connector.exchange`` etc.
    queue_prefix: str = ""
    queue_type: str = "classic"
    #: adds ``x-max-length`` + ``x-overflow: reject-publish`` to push queues declared from now on
    push_queue_max_length: int | None = None
    #: seconds added to every GraphQL answer
    latency_s: float = 0.0
    #: share of calls answered with ``error_code`` (``error_scope``: work mutations or all calls)
    error_rate: float = 0.0
    error_scope: Literal["work", "all"] = "work"
    error_code: str = "DATABASE_ERROR"
    #: while true every GraphQL call gets HTTP 503 with a non-JSON body
    outage: bool = False
    #: where the sim declares queues; ``None`` disables all broker interaction
    amqp_url: str | None = "amqp://guest:guest@127.0.0.1:5672/"
    # RabbitMQ settings handed out in the registration answer
    rabbit_host: str = "127.0.0.1"
    rabbit_port: int = 5672
    rabbit_user: str = "guest"
    rabbit_pass: str = "guest"
    rabbit_vhost: str = "/"
    rabbit_use_ssl: bool = False
    #: reject ``playbookStepExecution`` whose bundle is not valid STIX / lacks the instance
    strict_playbook: bool = True
    #: when set, ``registerConnector`` input keys outside this set are rejected (older schema)
    register_input_fields: frozenset[str] | None = None
    #: output fields an older platform's schema lacks, as schema coordinates ``"Type.field"``
    #: (e.g. ``"Connector.jwks"``). A query selecting a field of that name (anywhere in its
    #: selection sets) fails GraphQL validation: nothing runs, the answer is
    #: ``GRAPHQL_VALIDATION_FAILED`` with ``Cannot query field "jwks" on type "Connector".``
    missing_fields: frozenset[str] = frozenset()
    #: HTTP status of a validation failure. OpenCTI 5.x/6.x answer 200: the platform's Apollo
    #: ``httpResponsePlugin`` sets 200 on every answer carrying errors, validation included.
    #: Apollo Server alone answers 400, as did the OpenCTI 3.x releases.
    validation_error_status: int = 200
    #: where ``connector_queue_details`` comes from (sim/opencti/meter.py): ``"auto"``
    #: (``rabbitmqctl`` when on PATH and the broker is on loopback), ``"rabbitmqctl"``, or
    #: ``"off"`` (always zeros)
    queue_details: Literal["auto", "rabbitmqctl", "off"] = "auto"
    #: one ``rabbitmqctl`` listing serves every connector for this long, seconds
    queue_details_ttl_s: float = 1.0
    #: ``close()`` deletes the listen/push queues this sim declared
    delete_queues_on_close: bool = False
    max_recorded_requests: int = 100_000
    seed: int | None = None

    def __post_init__(self) -> None:
        bad = sorted(c for c in self.missing_fields if not _is_field_coordinate(c))
        if bad:
            raise ValueError(f"missing_fields entries must read 'Type.field', got {bad}")


def _is_field_coordinate(text: str) -> bool:
    type_name, dot, field_name = text.partition(".")
    return bool(dot and type_name.isidentifier() and field_name.isidentifier())


class WorkState(NamedTuple):
    """One entry of :attr:`Work.history`: the work's status and counts from ``time`` on."""

    time: float
    status: str
    expected: int
    processed: int


@dataclass
class Work:
    """A work (job) as the platform tracks it, plus extras for assertions."""

    id: str
    connector_id: str
    name: str
    status: str = "wait"
    #: ``import_expected_number``: the sum of every ``addExpectations``
    expected: int = 0
    #: ``import_processed_number``: one per ``reportExpectation``
    processed: int = 0
    in_error: bool = False
    messages: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    received_time: float | None = None
    processed_time: float | None = None
    #: when the work first became complete
    completed_time: float | None = None
    created_time: float = field(default_factory=time.time)
    #: ``workAdd(isMultiPartWork: true)``: reports alone never complete it, ``toProcessed`` must
    #: have come first
    multipart: bool = False
    # extras (not in the platform's Work type, useful for assertions)
    updated_time: float | None = None
    pings: int = 0
    draft_context: str | None = None
    killed: bool = False
    #: ``addExpectations`` calls (the worker's splits included)
    expectation_calls: int = 0
    #: time of the last ``reportExpectation``
    last_report_time: float | None = None
    #: when each entry of ``messages`` was added
    message_times: list[float] = field(default_factory=list)
    #: every change of status, expected or processed count, oldest first (the first entry is
    #: the work's creation)
    history: list[WorkState] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def record_state(self, now: float) -> None:
        """Append the current state to :attr:`history` if it differs from the last entry."""
        state = WorkState(now, self.status, self.expected, self.processed)
        if not self.history or self.history[-1][1:] != state[1:]:
            self.history.append(state)


@dataclass
class ConnectorRecord:
    """A registered connector: its registration input, heartbeats, state and queue names."""

    id: str
    name: str
    type: str
    scope: list[str]
    auto: bool = False
    auto_update: bool = False
    playbook_compatible: bool = False
    enrichment_resolution: str | None = None
    only_contextual: bool = False
    listen_callback_uri: str | None = None
    version: str | None = None
    slug: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    state: str | None = None
    state_reset_pending: bool = False
    connector_info: dict[str, Any] | None = None
    register_count: int = 0
    registered_time: float = 0.0
    #: epoch timestamps of every ``pingConnector``
    pings: list[float] = field(default_factory=list)
    #: last heartbeat (registration or ping), epoch seconds
    last_seen: float = 0.0
    deleted: bool = False
    names: dict[str, str] = field(default_factory=dict)
    push_queue_max_length: int | None = None

    @property
    def active(self) -> bool:
        """Platform liveness rule: heartbeat younger than 5 minutes."""
        return not self.deleted and time.time() - self.last_seen < 300


@dataclass(slots=True)
class RecordedRequest:
    """One GraphQL request as received (the Authorization value is never kept)."""

    time: float
    #: canonical operation (pycti's name), e.g. ``workToProcessed``
    operation: str
    #: operation name as sent by the client (None if anonymous)
    operation_name: str | None
    variables: dict[str, Any]
    draft_id: str | None
    applicant_id: str | None
    user_agent: str | None
    work_id_header: str | None
    #: "ok", an error code ("AUTH_REQUIRED", "DATABASE_ERROR", "GRAPHQL_VALIDATION_FAILED", …)
    #: or "http_503"
    outcome: str = "ok"
