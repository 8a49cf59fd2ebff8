"""Operations: what the operator sees.

- ``logs``: logging set-up (plain or JSON lines).
- ``metrics``: the Prometheus registry and the collectors read at scrape time.
- ``gauges``: the worker's ``lis_*`` gauges and the ``/readyz`` body, read through Protocols.
- ``health``: the ``/healthz``, ``/readyz`` and ``/metrics`` server.
"""
