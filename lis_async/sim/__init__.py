"""The simulators: the systems the worker talks to, on loopback, for the demo, the tests and
``lis-async bench``. Needs the ``demo`` extra; ``lis-async run`` and ``check`` never import it.

- ``opencti``: the platform double (registration, GraphQL, works, queues).
- ``lastinfosec``: the LastInfoSec API double (answers, latency, faults, 429s).
- ``worker``: OpenCTI's worker on the push queue, decoding as the platform does.
- ``producer``: publishes listen-queue jobs as the platform does.
- ``world``: all of them together for one connector.
- ``demo``: ``lis-async demo``.
"""
