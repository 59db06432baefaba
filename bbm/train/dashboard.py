"""PNG dashboard of a run: ``python -m bbm.train.dashboard RUN_DIR [--x time]`` writes RUN_DIR/dashboard.png.

Panels: train and held-out loss, throughput, MFU, peak memory, learning rate with the gradient norm, and the
attention's speed against dense causal SDPA. Noisy series are drawn faint with a light moving average over them;
a narrow y-range is widened (a few MB of memory do not look like a cliff); a dotted line marks where the run
resumed from a checkpoint; a panel without data says why."""
import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bbm._checks import fail
from bbm.train.sink import METRICS_FILE, read_metrics

DASHBOARD_FILE = "dashboard.png"
X_AXES = ("step", "time")
SMOOTHING = 0.6  # weight of the past in the moving average (TensorBoard's convention)
MIN_RELATIVE_SPAN = 0.1  # a y-range narrower than this fraction of its values' magnitude is widened to it


@dataclass
class Panel:
    title: str
    series: list  # (metric key, legend label)
    ylabel: str
    empty: str  # why a panel may have no data ({steps}: the run's last step)
    smooth: bool = False
    right: Optional[tuple] = None  # (metric key, label) on a second y axis, labelled with its label


PANELS = [
    Panel("loss", [("loss", "train"), ("eval_loss", "held-out documents")], "loss (nats / token)", "no records",
          smooth=True),
    Panel("throughput", [("tokens_per_s", "all ranks")], "tokens / s", "no records", smooth=True),
    Panel("MFU", [("mfu", "allowed pairs"), ("mfu_dense_convention", "dense convention (N^2 pairs)")],
          "fraction of peak", "not reported: no peak FLOP/s is known for this device\n(set metrics.peak_tflops)",
          smooth=True),
    Panel("peak memory", [("peak_mem_gib", "per rank")], "GiB", "no records"),
    Panel("learning rate | gradient norm", [("lr", "learning rate")], "learning rate", "no records",
          right=("grad_norm", "gradient norm")),
    Panel("attention vs dense causal SDPA", [("gain_vs_dense", "dense time / chosen time")], "speed-up (x)",
          "not measured: timed every metrics.gain_every steps (0: never),\nnone among the {steps} steps of this run"),
]


def smoothed(values: list) -> list:
    """Exponential moving average with bias correction (the first points are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = SMOOTHING * avg + (1 - SMOOTHING) * v
        out.append(avg / (1 - SMOOTHING ** i))
    return out


def padded_range(values: list):
    """(low, high) of a y axis that shows ``values``: at least MIN_RELATIVE_SPAN of their magnitude wide, with a
    margin."""
    low, high = min(values), max(values)
    span = max(high - low, MIN_RELATIVE_SPAN * max(abs(low), abs(high)), 1e-12)
    center = (low + high) / 2 if high - low < span else None
    if center is not None:
        low, high = center - span / 2, center + span / 2
    return low - 0.05 * span, high + 0.05 * span


def x_values(records: list, x: str):
    """The x coordinate of each record (None where a record lacks it), the axis label, and the resume markers."""
    if x == "step":
        xs = [r["step"] for r in records]
        return xs, "optimizer step", [r["resumed_at"] for r in records if r.get("resumed_at")]
    seconds = [r.get("elapsed_s") for r in records]
    known = [s for s in seconds if s is not None]
    scale, unit = (3600, "h") if known and max(known) > 3 * 3600 else (60, "min")
    xs = [None if s is None else s / scale for s in seconds]
    marks = [xs[i - 1] if i else 0.0 for i, r in enumerate(records) if r.get("resumed_at")]
    return xs, f"training wall-clock ({unit})", [m for m in marks if m is not None]


def _plot(ax, records, xs, key, label, color, smooth):
    points = [(x, r[key]) for x, r in zip(xs, records) if x is not None and r.get(key) is not None]
    if not points:
        return [], []
    px, py = zip(*points)
    marker = "o" if len(points) < 30 or key == "eval_loss" else None
    if smooth and len(points) >= 10:
        ax.plot(px, py, color=color, alpha=0.3, lw=0.8)
        line = ax.plot(px, smoothed(list(py)), color=color, label=f"{label} (smoothed)")
    else:
        line = ax.plot(px, py, color=color, marker=marker, ms=3, label=label)
    return line, list(py)


def draw_panel(ax, panel: Panel, records: list, xs: list, xlabel: str, marks: list):
    ax.set_title(panel.title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    lines, values = [], []
    for i, (key, label) in enumerate(panel.series):
        line, ys = _plot(ax, records, xs, key, label, f"C{i}", panel.smooth)
        lines, values = lines + line, values + ys
    if not lines:
        ax.text(0.5, 0.5, panel.empty.format(steps=records[-1]["step"]), ha="center", va="center",
                transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    gain = panel.series[0][0] == "gain_vs_dense"
    ax.set_ylim(*padded_range(values + [1.0] if gain else values))  # the gain panel shows its break-even line
    if panel.right:
        twin = ax.twinx()
        line, ys = _plot(twin, records, xs, *panel.right, "C1", True)
        if line:
            twin.set_ylim(*padded_range(ys))
            twin.set_ylabel(panel.right[1])
            lines += line
    if gain:
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")  # break-even with dense causal SDPA
        if records[-1].get("device") == "cpu":
            ax.text(0.5, 0.92, "CPU: bbm takes its exact reference path here;\nthe speed-up is a GPU figure",
                    ha="center", va="top", transform=ax.transAxes, fontsize=8, color="grey")
    for i, m in enumerate(marks):
        lines += [ax.axvline(m, color="grey", ls=":", lw=1.2, label="resumed" if i == 0 else None)]
    if len(lines) > 1:  # under the axis, never over the data
        ax.legend(handles=lines, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def write_dashboard(run_dir, x: str = "step") -> Path:
    """Plots the run's metrics.jsonl into dashboard.png (written to a temp name, then renamed). ``x``: 'step' or
    'time' (the training wall-clock, which continues across resumes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        fail("x", f"one of {X_AXES}", repr(x))
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        fail("run_dir", f"a run directory with a non-empty {METRICS_FILE}", str(run_dir), FileNotFoundError)
    xs, xlabel, marks = x_values(records, x)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, panel in zip(axes.flat, PANELS):
        draw_panel(ax, panel, records, xs, xlabel, marks)
    last = records[-1]
    held_out = [r for r in records if r.get("eval_loss") is not None]
    title = f"{run_dir.name}: step {last.get('step')}, attention {last.get('attention', '?')}"
    if held_out:
        title += f", held-out loss {held_out[-1]['eval_loss']:.3f} (perplexity {held_out[-1]['eval_ppl']:.2f})"
    fig.suptitle(title)
    fig.tight_layout()
    out = run_dir / DASHBOARD_FILE
    tmp = run_dir / f".{DASHBOARD_FILE}.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write RUN_DIR/dashboard.png from RUN_DIR/metrics.jsonl")
    parser.add_argument("run_dir")
    parser.add_argument("--x", choices=X_AXES, default="step", help="x axis: optimizer step or training wall-clock")
    args = parser.parse_args(argv)
    print(write_dashboard(args.run_dir, args.x))


if __name__ == "__main__":
    main()
