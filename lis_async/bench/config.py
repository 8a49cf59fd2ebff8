"""What one ``lis-async bench`` run is asked to do: :class:`BenchConfig`, built from the options.

Standard library only: the command line validates a configuration before anything of the
benchmark (simulator, psutil) is imported.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass(frozen=True)
class BenchConfig:
    """Every option of ``lis-async bench``; field names are the options' ``dest``."""

    jobs: int = 2000
    classic_jobs: int = 60
    latency: float = 0.15
    jitter: float = 0.0
    bundle_size: int = 12
    platform_latency: float = 0.0
    in_flight: int = 64
    lis_concurrency: int | None = None
    rate: float | None = None
    latency_seconds: float = 10.0
    skip_classic: bool = False
    rss_jobs: int = 0
    sweep: bool = False
    plot: str = "bench-sweep.png"
    json_path: str | None = None
    profile: str | None = None
    amqp_url: str = DEFAULT_AMQP_URL
    seed: int = 0
    worker_env: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        names = cls.__dataclass_fields__
        values = {k: v for k, v in vars(args).items() if k in names}
        values["worker_env"] = tuple(values.get("worker_env") or ())
        return cls(**values)

    def extra_env(self) -> dict[str, str]:
        """The ``--worker-env NAME=VALUE`` settings, as a mapping."""
        return dict(item.split("=", 1) for item in self.worker_env if "=" in item)

    def problems(self) -> list[str]:
        """What is wrong with the options, one message per problem (empty: nothing)."""
        out: list[str] = []
        if self.jobs < 1:
            out.append("--jobs must be at least 1")
        if self.classic_jobs < 1 and not self.skip_classic:
            out.append("--classic-jobs must be at least 1 (or use --skip-classic)")
        if self.in_flight < 1:
            out.append("--in-flight must be at least 1")
        if self.lis_concurrency is not None and self.lis_concurrency < 1:
            out.append("--lis-concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            out.append("--rate must be positive")
        if self.latency < 0 or self.jitter < 0 or self.platform_latency < 0:
            out.append("latencies must not be negative")
        if self.bundle_size < 5:
            out.append("--bundle-size must be at least 5")
        if self.latency_seconds < 0 or self.rss_jobs < 0:
            out.append("--latency-seconds and --rss-jobs must not be negative")
        out.extend(
            f"--worker-env {item!r}: expected NAME=VALUE"
            for item in self.worker_env
            if "=" not in item or not item.split("=", 1)[0]
        )
        return out
