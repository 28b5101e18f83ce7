"""PNG plots of `bench/load.py`'s results: the service and the baseline at a glance.

Kept apart from the load generator so the plots can be redrawn from a results file
without running anything again:

    .venv/bin/python -m bench.plots bench/results/load.json

Each plot puts the service (solid lines) next to the buffered baseline (dashed), one
colour per format, so the difference in shape, flat against growing, is what shows.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt

from .common import RESULTS_DIR, MiB

STYLE = {"service": "-", "baseline": "--"}
MARKERS = {"service": "o", "baseline": "s"}
COLOURS = {"lpcm-caf": "tab:blue", "aac-caf": "tab:orange", "m4a": "tab:green"}


def _series(rows: Sequence[dict[str, Any]], pace: str, fmt: str) -> list[dict[str, Any]]:
    return sorted(
        (row for row in rows if row["pace"] == pace and row["fmt"] == fmt),
        key=lambda row: row["size_mb"],
    )


def _size_axis(axes: Any, rows: Sequence[dict[str, Any]]) -> None:
    """A log axis labelled with the sizes measured, not with powers of ten."""
    sizes = sorted({row["size_mb"] for row in rows})
    axes.set_xscale("log")
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.minorticks_off()
    axes.set_xlabel("upload size, MB (log scale)")


def _save(figure: Any, stem: str, name: str) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{stem}-{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def memory_vs_size(rows: Sequence[dict[str, Any]], stem: str) -> Path:
    """Peak memory above rest against the upload's size, unthrottled, one request at a time."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for fmt, colour in COLOURS.items():
        series = _series(rows, "unthrottled", fmt)
        for name in STYLE:
            axes.plot(
                [row["size_mb"] for row in series],
                [row[name]["peak_above_idle"] / MiB for row in series],
                STYLE[name],
                marker=MARKERS[name],
                color=colour,
                label=f"{name} {fmt}",
            )
    _size_axis(axes, rows)
    axes.set_ylabel("peak RSS of the process tree above idle, MiB")
    axes.set_title("Peak memory vs input size (unthrottled)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, stem, "memory-vs-size")


def after_last_byte_vs_size(rows: Sequence[dict[str, Any]], stem: str) -> Path:
    """What the client waits after its last byte, at 2 MB/s, against the upload's size."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for fmt, colour in COLOURS.items():
        series = _series(rows, "2 MB/s", fmt)
        for name in STYLE:
            points = [
                (row["size_mb"], row[name]["after_last_byte_seconds"])
                for row in series
                if row[name]["after_last_byte_seconds"] == row[name]["after_last_byte_seconds"]
            ]
            if points:
                axes.plot(
                    *zip(*points, strict=True),
                    STYLE[name],
                    marker=MARKERS[name],
                    color=colour,
                    label=f"{name} {fmt}",
                )
    _size_axis(axes, [row for row in rows if row["pace"] == "2 MB/s"])
    axes.set_yscale("log")
    axes.set_ylabel("time after the last byte, s (log)")
    axes.set_title("Time after the last byte vs input size (2 MB/s)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, stem, "after-last-byte-vs-size")


def throughput_vs_concurrency(levels: Sequence[dict[str, Any]], stem: str) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    x = [row["level"] for row in levels]
    for name in STYLE:
        axes.plot(
            x,
            [row[name]["throughput"] for row in levels],
            STYLE[name],
            marker=MARKERS[name],
            label=name,
        )
    axes.plot(
        x, [row["raw_ffmpeg_throughput"] for row in levels], ":", marker="^", label="raw ffmpeg"
    )
    axes.set_xscale("log", base=2)
    axes.set_xticks(x, [str(level) for level in x])
    axes.set_xlabel("concurrent uploads")
    axes.set_ylabel("completed requests (or ffmpeg runs) per second")
    axes.set_title("Throughput vs concurrency (unthrottled)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, stem, "throughput-vs-concurrency")


def latency_vs_concurrency(levels: Sequence[dict[str, Any]], stem: str) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    x = [row["level"] for row in levels]
    for name in STYLE:
        for key, marker in (("p50_seconds", MARKERS[name]), ("p95_seconds", "x")):
            axes.plot(
                x,
                [row[name][key] for row in levels],
                STYLE[name],
                marker=marker,
                label=f"{name} {key.split('_')[0]}",
            )
    axes.set_xscale("log", base=2)
    axes.set_xticks(x, [str(level) for level in x])
    axes.set_xlabel("concurrent uploads")
    axes.set_ylabel("latency, s")
    axes.set_title("p50 / p95 latency vs concurrency (unthrottled)")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, stem, "latency-vs-concurrency")


def stages(e2e: dict[str, Any], stem: str) -> Path:
    """Where an end-to-end request's time goes, per server (server-side timings)."""
    figure, axes = plt.subplots(figsize=(7, 3))
    names = [name for name in STYLE if name in e2e]
    for index, name in enumerate(names):
        timings = e2e[name]["server_timings_median"]
        # The service's transcode overlaps its receive: show what follows the last byte.
        left = 0.0
        for stage, colour in (("receive", "tab:gray"), ("afterLastByte", "tab:red")):
            width = timings.get(stage, 0.0)
            axes.barh(index, width, left=left, color=colour, label=stage if index == 0 else None)
            left += width
        axes.text(left, index, f" transcode {timings['transcode']:.2f} s, "
                  f"transcribe {timings['transcribe']:.2f} s", va="center", fontsize=8)  # fmt: skip
    axes.set_yticks(range(len(names)), names)
    axes.set_xlabel("seconds from the start of the request")
    axes.set_title("End to end at 2 MB/s: receiving, then what is left after the last byte")
    axes.legend(fontsize=8, loc="lower right")
    return _save(figure, stem, "stages")


def capacity_plot(
    steps: Sequence[dict[str, Any]], wait_limit: float, plan_bytes: int, path: Path
) -> Path:
    """`bench/capacity.py`: p95 (and p50) wait after the last byte and peak memory against
    the phones at once, with the two limits the ramp stops at, so where it bent shows.

    Each ramp (as deployed, then admission lifted) is its own line: their steps share N.
    """
    figure, waits = plt.subplots(figsize=(7.5, 4.8))
    memory = waits.twinx()
    for name, style in (("fly", "-"), ("open", "--")):
        series = sorted((s for s in steps if s["ramp"] == name), key=lambda s: s["phones"])
        if not series:
            continue
        x = [s["phones"] for s in series]
        label = "as deployed" if name == "fly" else "admission lifted"
        waits.plot(x, [s["p95_wait"] for s in series], style, marker="o", color="tab:red",
                   label=f"p95 wait, {label}")  # fmt: skip
        waits.plot(x, [s["p50_wait"] for s in series], style, marker=".", color="tab:orange",
                   label=f"p50 wait, {label}")  # fmt: skip
        memory.plot(x, [s["peak_tree_pss"] / MiB for s in series], style, marker="s",
                    color="tab:blue", label=f"peak tree PSS, {label}")  # fmt: skip
        memory.plot(x, [s["peak_tree_rss"] / MiB for s in series], style, marker="^",
                    color="tab:cyan", label=f"peak tree RSS, {label}")  # fmt: skip
    waits.axhline(wait_limit, color="tab:red", linewidth=0.8, linestyle=":")
    memory.axhline(plan_bytes / MiB, color="tab:blue", linewidth=0.8, linestyle=":")
    every = sorted({s["phones"] for s in steps})
    waits.set_xscale("log", base=2)
    waits.set_xticks(every, [str(n) for n in every])
    waits.minorticks_off()
    waits.set_xlabel("phones uploading at once (log scale)")
    waits.set_ylabel(f"wait after the last byte, s (limit {wait_limit:.2f} s dotted)")
    memory.set_ylabel(f"peak memory of the server's tree, MiB (plan {plan_bytes / MiB:.0f} dotted)")
    # Both limits stay in view, however far below them the points are.
    waits.set_ylim(0, max([wait_limit, *(s["p95_wait"] for s in steps)]) * 1.15)
    memory.set_ylim(0, max([plan_bytes, *(s["peak_tree_rss"] for s in steps)]) / MiB * 1.1)
    waits.set_title("Phones at once: wait after the last byte and memory")
    waits.grid(True, alpha=0.3)
    handles = [h for axes in (waits, memory) for h in axes.get_legend_handles_labels()[0]]
    waits.legend(handles=handles, fontsize=7, loc="upper left")
    figure.tight_layout()
    RESULTS_DIR.mkdir(exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_all(summary: dict[str, Any], stem: str) -> list[Path]:
    """Every plot the summary has data for; returns the files written."""
    paths = []
    if summary.get("sizes"):
        paths += [memory_vs_size(summary["sizes"], stem)]
        if any(row["pace"] == "2 MB/s" for row in summary["sizes"]):
            paths += [after_last_byte_vs_size(summary["sizes"], stem)]
    if summary.get("concurrency"):
        paths += [
            throughput_vs_concurrency(summary["concurrency"], stem),
            latency_vs_concurrency(summary["concurrency"], stem),
        ]
    if summary.get("e2e"):
        paths += [stages(summary["e2e"], stem)]
    return paths


def main(argv: Sequence[str]) -> int:
    source = Path(argv[0]) if argv else RESULTS_DIR / "load.json"
    for path in plot_all(json.loads(source.read_text()), source.stem):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
