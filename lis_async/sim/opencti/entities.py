"""Entity store of the simulated platform and the read operations over it.

Tests and the job producer store platform-style STIX entities (``put_entity``, live or in a
draft); the store renders each one once (:class:`~lis_async.sim.opencti.nodes.NodeRenderer`)
and indexes the node by standard id and internal id. ``stixCyberObservable`` /
``stixCoreObject`` read the draft store first (``opencti-draft-id`` header), then the live
one; ``stixNestedRefRelationships`` answers an empty page; ``markingDefinition`` answers the
built-in TLP and PAP markings and the custom ones stored with ``put_marking``. File contents
served at ``GET /storage/get/<id>`` are kept here too.
"""

from __future__ import annotations

from typing import Any

from lis_async.sim.opencti.graphql import Handler, RequestContext
from lis_async.sim.opencti.nodes import NodeRenderer

__all__ = ["EntityStore"]


class EntityStore:
    """STIX entities and their GraphQL nodes, keyed by (draft id or None, id)."""

    def __init__(self) -> None:
        #: raw bytes served at ``GET /storage/get/<id>``
        self.files: dict[str, bytes] = {}
        self._entities: dict[tuple[str | None, str], dict[str, Any]] = {}
        self._nodes: dict[tuple[str | None, str], dict[str, Any]] = {}
        self._renderer = NodeRenderer(self._entities, self.files)

    def put_entity(self, stix_entity: dict[str, Any], draft_id: str | None = None) -> None:
        """Store a platform-style STIX entity, readable by standard and internal id.

        Entity shape: docs/protocol.md §3.3.
        """
        sid = stix_entity["id"]
        key_draft = draft_id or None
        self._entities[(key_draft, sid)] = stix_entity
        node = self._renderer.node(stix_entity)
        self._nodes[(key_draft, sid)] = node
        self._nodes[(key_draft, node["id"])] = node

    def put_file(self, file_id: str, content: bytes) -> None:
        self.files[file_id] = content

    def put_marking(
        self, standard_id: str, definition_type: str, definition: str, order: int = 0
    ) -> None:
        """A custom marking definition (an organisation's own "TLP:RED", a statement...)."""
        self.put_entity(
            {
                "type": "marking-definition",
                "spec_version": "2.1",
                "id": standard_id,
                "created": "2024-01-01T00:00:00.000Z",
                "definition_type": definition_type,
                "name": definition,
                "x_opencti_order": order,
            }
        )

    def get_entity(self, entity_id: str, draft_id: str | None = None) -> dict[str, Any] | None:
        """The GraphQL node for an entity (draft store first, then live), or None."""
        if draft_id:
            node = self._nodes.get((draft_id, entity_id))
            if node is not None:
                return node
        return self._nodes.get((None, entity_id))

    # ---------------------------------------------------------------- GraphQL operations

    def handlers(self) -> dict[str, Handler]:
        return {
            "StixCyberObservable": self._op_read,
            "StixCoreObject": self._op_read,
            "StixNestedRefRelationships": self._op_nested_refs,
            "MarkingDefinition": self._op_marking,
        }

    async def _op_marking(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        return {"markingDefinition": self._renderer.known_marking(str(v.get("id") or ""))}

    async def _op_read(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        entity_id = str(v.get("id") or "")
        node = self.get_entity(entity_id, ctx.draft_id)
        if (
            node is not None
            and ctx.root == "stixCyberObservable"
            and "Stix-Cyber-Observable" not in node["parent_types"]
        ):
            node = None
        # one handler for both root fields: answer under the field that was asked
        return {ctx.root: node}

    async def _op_nested_refs(self, ctx: RequestContext, v: dict[str, Any]) -> Any:
        return {
            "stixNestedRefRelationships": {
                "edges": [],
                "pageInfo": {
                    "startCursor": "",
                    "endCursor": "",
                    "hasNextPage": False,
                    "hasPreviousPage": False,
                    "globalCount": 0,
                },
            }
        }
