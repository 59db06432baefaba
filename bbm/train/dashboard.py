"""PNG dashboard of a run: ``python -m bbm.train.dashboard RUN_DIR`` writes RUN_DIR/dashboard.png."""
import argparse
import os
from pathlib import Path

from bbm._checks import fail
from bbm.train.sink import METRICS_FILE, read_metrics

DASHBOARD_FILE = "dashboard.png"
# (title, [(metric key, label)], y label); a title with "(right)" puts its second series on a right axis
PANELS = [
    ("loss", [("loss", "train loss")], "nats / token"),
    ("throughput", [("tokens_per_s", "tokens/s (all ranks)")], "tokens / s"),
    ("MFU", [("mfu", "allowed pairs"), ("mfu_dense_convention", "dense convention (N^2 pairs)")], "fraction of peak"),
    ("attention gain vs dense causal SDPA", [("gain_vs_dense", "dense time / chosen time")], "x"),
    ("peak memory", [("peak_mem_gib", "peak memory per rank")], "GiB"),
    ("learning rate | grad norm (right)", [("lr", "lr"), ("grad_norm", "grad norm")], "lr"),
]


def write_dashboard(run_dir) -> Path:
    """Plots the run's metrics.jsonl into dashboard.png (written to a temp name, then renamed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        fail("run_dir", f"a run directory with a non-empty {METRICS_FILE}", str(run_dir), FileNotFoundError)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, series, ylabel) in zip(axes.flat, PANELS):
        lines = []
        for i, (key, label) in enumerate(series):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            target = ax.twinx() if i and "(right)" in title else ax  # a second scale on the right
            if points:
                lines += target.plot(*zip(*points), marker="." if len(points) < 30 else None, label=label,
                                     color=f"C{i}")
        if len(lines) > 1:
            ax.legend(handles=lines, fontsize=8)
        if not lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif series[0][0] == "gain_vs_dense":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")  # break-even with dense causal SDPA
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    last = records[-1]
    fig.suptitle(f"{run_dir.name}: step {last.get('step')}, attention {last.get('attention', '?')}")
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
    args = parser.parse_args(argv)
    print(write_dashboard(args.run_dir))


if __name__ == "__main__":
    main()
