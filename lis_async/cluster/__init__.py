"""Cluster mode: the state replicas on one connector id share through Redis.

* :mod:`~lis_async.cluster.link`: the Redis connection, its health (shared / fallback) and
  the replica registry;
* :mod:`~lis_async.cluster.limiter`: the cluster-wide LastInfoSec rate limit and 429 pause;
* :mod:`~lis_async.cluster.cache`: the shared answer cache and cross-replica coalescing;
* :mod:`~lis_async.cluster.budget`: the daily LastInfoSec budget's blocks, reserved in Redis.

Redis is an optimisation, never a dependency of a job: every operation is bounded by a short
timeout, and while Redis is unreachable each replica falls back to its local limiter (at a share
of the rate) and its local cache. See docs/architecture.md, "Cluster mode".
"""
