"""`grove plot`: one PNG dashboard from one or more runs' `metrics.jsonl`.

    write_dashboard([Path("runs/a")], Path("runs/a/dashboard.png"))
    write_dashboard([Path("runs/a"), Path("runs/b")], Path("compare.png"))   # same axes, one colour per run

Panels: reward and held-out accuracy by step and by wall time; staleness (token and group
age); rollout and train tokens/s; idle ratios; weight-sync time; the reward failure rate
and failures by kind; and, only when a run logged them, the prompt sampler's `sampling/*`
and the tree rollouts' `tree/*` statistics. A metric no run logged leaves its panel saying
"no data"; a run directory without a `metrics.jsonl`, or with an empty one, is an error
naming the path (`DashboardError`).

With one run each metric of a panel has a colour of its own; with several, each run has
a colour (the legend at the top) and each metric a line style (the legend in the panel).
Matplotlib's Agg canvas only: no pyplot state, no display, no engine imports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DashboardError", "Run", "dashboard_figure", "load_run", "write_dashboard", "write_run_dashboard"]

METRICS_FILE = "metrics.jsonl"
LINESTYLES = ("-", "--", ":", "-.")
MAX_LINES = 10  # most metrics one dynamic panel (sampling/*, tree/*, failures by kind) draws
SPARSE = 12  # a series with at most this many points is drawn with markers (e.g. held-out accuracy)
SMOOTH_MIN = 30  # a series with more points than this is drawn faint, under its moving average


class DashboardError(ValueError):
    """A run directory the dashboard cannot be drawn from; the message names the path."""


@dataclass
class Run:
    """One run's records, as `MetricsLogger` wrote them (non-finite values are null)."""

    label: str
    path: Path
    records: list[dict[str, Any]]
    skipped: int = 0  # a torn last line (a run killed mid-write)

    def keys(self) -> set[str]:
        return {k for r in self.records for k, v in r.items() if _number(v)}

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x, value) of every record with a finite number under `key`, ordered by x."""
        points = sorted((float(r[x]), float(r[key])) for r in self.records
                        if _number(r.get(key)) and _number(r.get(x)))
        return [p[0] for p in points], [p[1] for p in points]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise DashboardError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise DashboardError(f"{path}: no such file ({run_dir} is not a run directory, or its run logged nothing)")
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records, skipped = [], 0
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):  # a run killed while writing its last line
                skipped += 1
                continue
            raise DashboardError(f"{path}, line {n}: not JSON ({err})") from err
        if not isinstance(record, dict):
            raise DashboardError(f"{path}, line {n}: a JSON object per line is expected, got {type(record).__name__}")
        if _number(record.get("step")):
            records.append(record)
    if not records:
        raise DashboardError(f"{path} is empty: the run logged no step" if not lines
                             else f"{path} holds no record with a 'step'")
    return Run(run_dir.name, run_dir, records, skipped)


def _labels(paths: Sequence[Path]) -> list[str]:
    """Each run's directory name; as many trailing path parts as it takes to tell them apart."""
    resolved = [Path(p).resolve() for p in paths]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} ({i})" for i, label in enumerate(labels, 1)]  # the same directory given twice


# -- panels ------------------------------------------------------------------------------------

@dataclass
class Panel:
    title: str
    metrics: list[tuple[str, str]]  # (metric key, legend label)
    ylabel: str = ""
    x: str = "step"
    scale: float = 1.0  # e.g. 1000 for seconds shown as ms
    note: str = ""  # said in the panel when every series is all zero (e.g. "no reward failures")
    log: bool = False  # symlog y: counters of very different sizes
    more: int = 0  # metrics left off (MAX_LINES)
    smooth: bool = True  # per-step noise: a moving average over the faint per-step line (not for *_max)


def _panels(runs: list[Run]) -> list[Panel]:
    keys = set().union(*(run.keys() for run in runs))
    reward = [("train/reward_mean", "reward (train batch mean)"), ("eval/accuracy", "held-out accuracy")]
    panels = [
        Panel("Reward and held-out accuracy by step", reward, "reward / accuracy"),
        Panel("Reward and held-out accuracy by wall time", reward, "reward / accuracy", x="time_s"),
        Panel("Staleness (policy versions behind)",
              [("staleness/token_age_mean", "token age, mean"), ("staleness/token_age_max", "token age, max"),
               ("staleness/group_age_mean", "group age, mean"), ("staleness/group_age_max", "group age, max")],
              "versions"),
        Panel("Throughput", [("rollout/tokens_per_s", "rollout tokens/s"), ("train/tokens_per_s", "train tokens/s")],
              "tokens / s"),
        Panel("Idle ratios", [("rollout/idle_ratio", "rollout idle"), ("trainer/idle_ratio", "trainer idle"),
                              ("trainer/straggler_wait_ratio", "trainer waiting for stragglers")],
              "fraction of wall time"),
        Panel("Weight sync time per step",
              [("weight_sync/total_s", "total (train step end to weights loaded)"),
               ("weight_sync/apply_s", "apply on the rollout worker"),
               ("weight_sync/load_s", "load into the engine")], "ms", scale=1000.0),
        Panel("Reward failure rate (since the previous step)", [("reward/failure_rate", "failed samples / scored")],
              "fraction of samples", note="no reward failures"),
    ]
    kinds = sorted(k for k in keys if k.startswith("reward/failures/") and k != "reward/failures/total")
    failing = [k for k in kinds if any(max(run.series(k)[1], default=0.0) > 0 for run in runs)]
    shown = failing or (["reward/failures/total"] if "reward/failures/total" in keys else kinds[:1])
    panels.append(_dynamic("Reward failures by kind (cumulative)", shown, "reward/failures/", "samples",
                           note="no reward failures"))
    for prefix, title in (("sampling/", "Prompt sampler (sampling/*)"), ("tree/", "Tree rollouts (tree/*)")):
        found = sorted(k for k in keys if k.startswith(prefix))
        if found:
            panels.append(_dynamic(title, found, prefix, "value", log=_wide(runs, found)))
    return panels


def _dynamic(title: str, found: list[str], prefix: str, ylabel: str, note: str = "", log: bool = False) -> Panel:
    return Panel(title, [(k, k[len(prefix):]) for k in found[:MAX_LINES]], ylabel, note=note, log=log,
                 more=max(0, len(found) - MAX_LINES), smooth=False)


def _wide(runs: list[Run], found: list[str]) -> bool:
    """Whether these metrics span such different sizes that a linear axis flattens some."""
    peaks = [max(abs(v) for v in ys) for run in runs for k in found if (ys := run.series(k)[1]) and any(ys)]
    return len(peaks) > 1 and max(peaks) / min(peaks) > 50


# -- drawing -----------------------------------------------------------------------------------

def dashboard_figure(run_dirs: Sequence[Path]):
    """The dashboard as a matplotlib Figure (on an Agg canvas); raises DashboardError."""
    if not run_dirs:
        raise DashboardError("no run directory given")
    runs = [load_run(Path(d)) for d in run_dirs]
    for run, label in zip(runs, _labels([r.path for r in runs])):
        run.label = label
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = _panels(runs)
    longest = max(len(run.series("train/reward_mean")[0]) for run in runs)
    window = max(3, round(longest / 15)) if longest > SMOOTH_MIN else 0
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(8 * ncols, 4.2 * nrows + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        _draw(ax, panel, runs, Line2D, window)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    steps = [max(run.series("step")[0], default=0) for run in runs]
    how = f"solid: moving average over {window} steps; faint: each step" if window else ""
    if len(runs) == 1:
        run = runs[0]
        fig.suptitle(f"Grove run {run.label}: {len(run.records)} records, last step {steps[0]:.0f} "
                     f"({run.path.resolve()})" + (f"\n{how}" if how else ""), fontsize=13)
    else:  # the runs' legend is the title (a suptitle would overlap it)
        handles = [Line2D([], [], color=f"C{i}", lw=2.5, label=f"{run.label} (last step {s:.0f})")
                   for i, (run, s) in enumerate(zip(runs, steps))]
        fig.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4), fontsize=11,
                   title="Grove runs compared: colour = run, line style = metric" + (f"; {how}" if how else ""),
                   title_fontsize=12, frameon=False)
    return fig


def _moving_average(ys: list[float], window: int) -> list[float]:
    """Centred; the ends average over what there is."""
    half = window // 2
    out = []
    for i in range(len(ys)):
        part = ys[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def _draw(ax, panel: Panel, runs: list[Run], Line2D, window: int = 0) -> None:
    many = len(runs) > 1
    drawn: list[tuple[str, str]] = []  # (metric label, line style) of the metrics with data
    all_zero = True
    for j, (key, label) in enumerate(panel.metrics):
        style = LINESTYLES[j % len(LINESTYLES)]
        found = False
        for i, run in enumerate(runs):
            xs, ys = run.series(key, panel.x)
            if not xs:
                continue
            found = True
            all_zero = all_zero and not any(ys)
            ys = [y * panel.scale for y in ys]
            color, line = (f"C{i}", style) if many else (f"C{j}", "-")
            label_here = None if many else label
            if window and panel.smooth and len(xs) > SMOOTH_MIN and not key.endswith("_max"):
                ax.plot(xs, ys, color=color, linestyle=line, linewidth=0.8, alpha=0.3)
                ys = _moving_average(ys, window)
            ax.plot(xs, ys, color=color, linestyle=line, marker="o" if len(xs) <= SPARSE else None,
                    markersize=4, linewidth=1.8, label=label_here)
        if found:
            drawn.append((label, style))
    title = panel.title + (f" (+{panel.more} more not shown)" if panel.more else "")
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("wall time since the run started (s)" if panel.x == "time_s" else "step (policy version)")
    if panel.x == "step":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if not drawn:
        keys = ", ".join(k for k, _ in panel.metrics) or "(none)"
        ax.text(0.5, 0.5, f"no data\n({keys})", transform=ax.transAxes, ha="center", va="center",
                fontsize=10, color="0.45", wrap=True)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if panel.log:
        ax.set_yscale("symlog", linthresh=1.0)
    if all_zero:
        ax.set_ylim(-0.05, 1.0)  # not matplotlib's +-0.05 around a flat zero
        if panel.note:
            ax.text(0.5, 0.6, panel.note, transform=ax.transAxes, ha="center", va="center", fontsize=10,
                    color="0.35")
    if many:
        handles = [Line2D([], [], color="0.25", linestyle=style, label=label) for label, style in drawn]
        ax.legend(handles=handles, fontsize=8, loc="best")
    else:
        ax.legend(fontsize=8, loc="best")


def write_dashboard(run_dirs: list[Path], out: Path) -> Path:
    """Draw the runs' dashboard into the PNG `out` (its folder is made); returns `out`."""
    fig = dashboard_figure(run_dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def write_run_dashboard(run_dir: Path, say: Callable[[str], None]) -> Path | None:
    """The end of a run: `run_dir/dashboard.png`, said on the progress line. The model and
    metrics are saved by then, so a failure here is reported, never raised."""
    try:
        out = write_dashboard([Path(run_dir)], Path(run_dir) / "dashboard.png")
    except Exception as err:  # noqa: BLE001 - a plot must not lose a finished run
        say(f"dashboard not written: {type(err).__name__}: {err}")
        return None
    say(f"dashboard: {out}")
    return out


def main(argv: list[str]) -> None:
    """`grove plot RUN_DIR [RUN_DIR ...] [--out PATH]`."""
    import argparse

    from trainer.cli import usage_error

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # as every grove usage error: one line, exit 2
            usage_error("error", f"{self.prog}: {message}")

    parser = Parser(prog="grove plot", description="Draw a PNG dashboard from runs' metrics.jsonl; several runs "
                    "go on the same axes, one colour each.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory (runs/<name>)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.png",
                        help="the PNG to write (default: RUN_DIR/dashboard.png for one run, "
                             "./dashboard.png for several)")
    args = parser.parse_intermixed_args(argv)
    out = args.out or (args.run_dirs[0] / "dashboard.png" if len(args.run_dirs) == 1 else Path("dashboard.png"))
    try:
        written = write_dashboard(args.run_dirs, out)
    except DashboardError as err:
        usage_error("error", err)
    print(f"grove: dashboard={written.resolve()}", flush=True)
