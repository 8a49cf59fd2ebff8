"""Intake holds: the reasons the worker stops taking new jobs for a while.

- ``hold``: one reason to hold intake, its state and listeners.
- ``backpressure``: the push-queue watermarks.
- ``threshold``: pycti's ``CONNECTOR_QUEUE_THRESHOLD`` rule.
"""
