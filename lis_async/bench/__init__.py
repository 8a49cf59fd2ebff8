"""``lis-async bench``: the worker against the classic pycti-helper connector, in one run.

``classic`` is the reference connector (built like the upstream one), ``runner`` drives the
simulated world, the two connectors as subprocesses and the measurements; ``measure`` holds the
process sampling and the figures.
"""
