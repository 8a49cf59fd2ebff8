"""Enrichment: one job from its listen-queue body to the push messages, with no I/O library.

- ``job``: a listen-queue body parsed into an immutable ``WorkJob`` or ``PlaybookJob`` (and its
  ``Observable``).
- ``markings``: the standard TLP and PAP marking ids, where an entity carries markings.
- ``nesting``: how deeply untrusted JSON may nest; copying it.
- ``gate``: the max-TLP / max-PAP gate (fails closed).
- ``vetting``: what of a LastInfoSec answer may reach OpenCTI.
- ``ids``: pycti's deterministic STIX ids.
- ``bundle``: the bundle built for a job (pure).
- ``delivery``: a bundle turned into push messages (pycti's splitter and envelope).
- ``ports``: the Protocols the pipeline depends on; the adapters implement them.
- ``pipeline``: one job from received to processed, against the ports only.
"""
