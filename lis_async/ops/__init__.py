"""Operations: what the operator sees.

- ``telemetry``: logging set-up, Prometheus metrics, the ``/healthz`` and ``/readyz`` server.
"""
