"""The ``--sweep`` plot: lis_async's throughput against jobs in flight, as a PNG.

matplotlib (the ``bench`` extra) is imported only when a plot is drawn.
"""

from __future__ import annotations

import math

from lis_async.bench.config import BenchConfig
from lis_async.bench.results import PhaseResult


def plot_sweep(
    path: str, sweep: list[PhaseResult], cfg: BenchConfig, classic: float | None
) -> None:
    """Draw the sweep to ``path``, with the classic connector's jobs/s as a line if measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s.in_flight for s in sweep]
    ys = [s.jobs_per_s for s in sweep]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, ys, marker="o", label="lis_async")
    for x, y in zip(xs, ys, strict=True):
        ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center")
    if classic is not None and not math.isnan(classic):
        ax.axhline(classic, color="grey", linestyle="--", label=f"classic ({classic:.1f} jobs/s)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("jobs in flight")
    ax.set_ylabel("jobs/s")
    ax.set_title(
        f"lis_async throughput vs jobs in flight "
        f"(LastInfoSec {cfg.latency * 1000:.0f} ms, {cfg.bundle_size}-object bundles)"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
