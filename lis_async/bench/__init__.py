"""``lis-async bench``: the worker against the classic pycti-helper connector, in one run.

Needs the ``bench`` extra (psutil; matplotlib for ``--sweep``); the connector itself never
imports this package. Its modules, from the command line down:

* ``cli``: the options and the entry point (standard library only until the run starts);
* ``config``: :class:`~lis_async.bench.config.BenchConfig`, the options checked;
* ``orchestrate``: the phases in order, then the record and the report;
* ``phase``: one phase (world, connector, jobs, figures);
* ``replicas``: the ``--replicas N`` phases (N workers on one connector id, with and without
  Redis) and their figures;
* ``backlog``: the ``--backlog N`` phases (manual jobs queued behind N auto jobs, with priority
  lanes and FIFO) and their figures; ``backlog_table``: their rows and notes in the report;
* ``feed``: the world of a phase and how its jobs reach the queue (queued, paced, burst);
* ``processes``: the connector subprocess (argv, environment) and py-spy;
* ``results``: what a phase measured (:class:`~lis_async.bench.results.PhaseResult`);
* ``record``, ``table``, ``plot``: the JSON record, the printed table, the sweep's PNG;
* ``measure``: process sampling and statistics; ``progress``: the status line on stderr;
* ``classic``: the reference connector, built like the upstream one; ``profile``: the py-spy
  profile summary;
* ``dashboard``: a picture of the Grafana dashboard's queries over a demo run
  (``python -m lis_async.bench.dashboard``; a real Prometheus evaluates them, matplotlib draws).
"""
