"""PNG plots for the README (the `plots` extra: matplotlib). Without matplotlib, say so and skip.

Each function takes plain numbers (what the scenario also writes to JSON) and writes one small PNG
under docs/.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sluicegate.loadtest.common import DOCS_DIR, ROOT, progress
from sluicegate.loadtest.targets import DECISION_P99_MS


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed (pip install 'sluicegate[plots]'): no plot written")
        return None
    return plt


def _save(plt: Any, fig: Any, name: str) -> Path:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    path = DOCS_DIR / name
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def decision_cost(rows: Sequence[Mapping[str, Any]], name: str = "decision_cost.png", *, tenants: int,
                  groups: int) -> Path | None:
    """p50/p99 decision time (ms) against queued requests, log x axis; the axis names the run's own tenants and
    groups (the bench's settings, which change what a decision sees)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sizes = [r["queued"] for r in rows]
    for key, style in (("p50_ms", "o-"), ("p99_ms", "s-")):
        ax.plot(sizes, [r[key] for r in rows], style, label=f"{key[:3]} server-side")
    if rows and "rtt_p50_ms" in rows[0]:
        ax.plot(sizes, [r["rtt_p50_ms"] for r in rows], "^--", alpha=0.6, label="p50 round trip - PING")
    ax.axhline(DECISION_P99_MS, color="grey", linestyle=":", label=f"target p99 ({DECISION_P99_MS:g} ms)")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"queued requests ({tenants:,} tenants, {groups} group{'s' if groups != 1 else ''})")
    ax.set_ylabel("dispatch decision (ms)")
    ax.set_title("Scheduling decision cost against queue size")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(plt, fig, name)


def priority_wait(series: Mapping[str, Sequence[tuple[float, float]]], name: str = "priority_wait.png",
                  title: str = "Wait by priority over time",
                  marks: Sequence[tuple[float, str]] = ()) -> Path | None:
    """Scatter of wait (ms) against submit time (s) per priority label; `marks` label phase starts."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    top = max((p[1] for points in series.values() for p in points), default=10.0)
    for label, points in series.items():
        if points:
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=6, alpha=0.6, label=label)
    for x, text in marks:
        ax.axvline(x, color="grey", linestyle=":")
        ax.annotate(text, (x, 1), textcoords="offset points", xytext=(3, -3), fontsize=8, color="grey",
                    xycoords=("data", "axes fraction"), va="top")
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(0, top * 3)
    ax.set_xlabel("submitted at (s since the first phase started)")
    ax.set_ylabel("wait to start (ms)")
    ax.set_title(title)
    ax.legend(fontsize=8, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1), title="priority")
    ax.grid(alpha=0.3)
    return _save(plt, fig, name)


def fairness_share(panels: Sequence[tuple[str, Sequence[float], Mapping[str, Sequence[float]]]],
                   targets: Mapping[str, float], name: str = "fairness_share.png",
                   title: str = "Token share by tenant over time") -> Path | None:
    """One panel per run (label, times, {tenant: shares}): each tenant's share per window (lines)
    against its weight share (dashed)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.2 + 2.4 * len(panels)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (label, times, shares) in zip(axes[:, 0], panels, strict=True):
        for i, (tenant, values) in enumerate(shares.items()):
            color = colors[i % len(colors)]
            ax.plot(times, values, "-", color=color, label=tenant)
            ax.axhline(targets[tenant], color=color, linestyle="--", alpha=0.5)
        ax.set_ylim(0, max([*targets.values(), 0.1]) * 1.3)
        ax.set_ylabel("token share")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=len(targets), loc="upper left")
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, name)
