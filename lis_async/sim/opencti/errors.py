"""Errors the simulated platform answers, in the platform's shapes.

* :class:`SimGraphQLError`: an execution error, answered HTTP 200 with
  ``errors[0].name`` and ``errors[0].extensions.code`` (what OpenCTI's own error classes send).
* :class:`WorkNotAlive`: the ``WORK_NOT_ALIVE`` execution error of a deleted or unknown work.
* :class:`GraphQLValidationFailed`: the document does not validate against the (emulated)
  schema; Apollo's shape, without ``name`` nor ``data``.
* :class:`SimDependencyError`: an optional package a simulator feature needs is missing (a
  problem of the test set-up, not an answer of the platform).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "WORK_NOT_ALIVE_MESSAGE",
    "GraphQLValidationFailed",
    "SimDependencyError",
    "SimGraphQLError",
    "WorkNotAlive",
]

WORK_NOT_ALIVE_MESSAGE = (
    "Work is no longer alive, no request can be done within the context of this work"
)


class SimGraphQLError(Exception):
    """An error answered the platform way: HTTP 200 + ``errors[0].extensions.code``."""

    def __init__(
        self,
        code: str,
        message: str,
        http_status: int = 500,
        genre: str = "TECHNICAL",
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status
        self.genre = genre
        self.data = data or {}

    def payload(self) -> dict[str, Any]:
        return {
            "errors": [
                {
                    "message": self.message,
                    "name": self.code,
                    "extensions": {
                        "code": self.code,
                        "data": {"http_status": self.http_status, "genre": self.genre, **self.data},
                    },
                }
            ],
            "data": None,
        }


class WorkNotAlive(SimGraphQLError):
    """``WORK_NOT_ALIVE``: a work call (or a request with its work id) for a dead work."""

    def __init__(self, work_id: str) -> None:
        super().__init__(
            "WORK_NOT_ALIVE", WORK_NOT_ALIVE_MESSAGE, 400, "TECHNICAL", {"work_id": work_id}
        )
        self.work_id = work_id


class GraphQLValidationFailed(Exception):
    """The query does not validate: ``GRAPHQL_VALIDATION_FAILED``, one error per offence.

    ``errors`` are graphql-js formatted errors (``message``, ``locations``, ``extensions``).
    """

    code = "GRAPHQL_VALIDATION_FAILED"

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(str(e["message"]) for e in errors))
        self.errors = errors

    def payload(self) -> dict[str, Any]:
        return {"errors": self.errors}


class SimDependencyError(RuntimeError):
    """An optional package a simulator feature needs is not installed."""
