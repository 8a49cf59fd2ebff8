"""The OpenCTI platform: its GraphQL API (through pycti's client) and the shared view of its health.

- ``client``: registration, heartbeat, work reports, playbook answers, reads.
- ``health``: "OpenCTI is down": jobs wait on it, intake pauses, one probe.
"""
