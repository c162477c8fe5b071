"""What a run shows on the console (stderr; stdout is left to `grove train`'s last line).

On a terminal: a live status under the scrolling messages, redrawn a few times a second:

    ⠹ training  ━━━━━━━━━━━━━━━━╸━━━━━━━━━━━━━━━━━━━  12/40  30%  0:01:05  ETA 2m32s
      policy v12 (data v11..12)  reward 0.412  held-out 0.380 (before 0.210)  loss +0.0031
      rollout 2310 tok/s  rollout idle 14%  trainer idle 38%  token age 0.42 (groups ≤1)  reward failures 0%

and the same kind of bar, or a spinner with the elapsed time, while the default model warms
up, the engines start, the held-out set is scored and final_model is written. Without a
terminal (CI, a log file) there is nothing to redraw: one plain line per `every` steps (and
the first and the last), never wrapped, so a log stays one line per event:

       61.2s step 10/40 (25%)  reward=0.388  heldout=0.330  loss=+0.0042  tok/s=2290  age=0.40/1
       idle=r14%/t38%  reward_fail=0%  sync=12ms  versions=9..10  eta=2m41s

(one line; folded here). Both end with a short summary table. `RunConsole.disabled()` shows
nothing (`logger.console=false`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def duration(seconds: float | None) -> str:
    """45s, 12m34s, 2h05m; '?' when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(metrics: dict, key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and value == value else None


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


@dataclass
class StepStatus:
    """What the console knows of the loop: the last step's metrics and the held-out accuracy."""

    step: int = 0
    total: int | None = None
    metrics: dict = field(default_factory=dict)
    accuracy: float | None = None  # the latest held-out accuracy
    accuracy_before: float | None = None  # the first one (before RL)
    started: float | None = None  # clock when training started (the ETA's origin)

    def eta(self, now: float) -> float | None:
        if self.started is None or not self.total or self.step <= 0:
            return None
        return (now - self.started) / self.step * max(self.total - self.step, 0)


def status_line(s: StepStatus, now: float) -> str:
    """The plain one-line status of a step (no markup, no wrapping)."""
    m = s.metrics
    total = f"/{s.total}" if s.total else ""
    share = f" ({s.step / s.total:.0%})" if s.total else ""
    sync = _num(m, "weight_sync/total_s")
    vmin, vmax = _num(m, "batch/version_min"), _num(m, "batch/version_max")
    age_max = _num(m, "staleness/group_age_max")
    parts = [
        f"step {s.step}{total}{share}",
        f"reward={_fmt(_num(m, 'train/reward_mean'), '.3f')}",
        f"heldout={_fmt(s.accuracy, '.3f')}",
        f"loss={_fmt(_num(m, 'train/loss'), '+.4f')}",
        f"tok/s={_fmt(_num(m, 'rollout/tokens_per_s'), '.0f')}",
        f"age={_fmt(_num(m, 'staleness/token_age_mean'), '.2f')}/{_fmt(age_max, '.0f')}",
        f"idle=r{_fmt(_num(m, 'rollout/idle_ratio'), '.0%')}/t{_fmt(_num(m, 'trainer/idle_ratio'), '.0%')}",
        f"reward_fail={_fmt(_num(m, 'reward/failure_rate') or 0.0, '.0%')}",
        f"sync={_fmt(None if sync is None else sync * 1000, '.0f')}ms",
        f"versions={_fmt(vmin, '.0f')}..{_fmt(vmax, '.0f')}",
        f"eta={duration(s.eta(now))}",
    ]
    return "  ".join(parts)


def status_renderables(s: StepStatus) -> list[Text]:
    """The two lines under the live training bar."""
    m = s.metrics
    before = f" (before {s.accuracy_before:.3f})" if s.accuracy_before is not None else ""
    vmin, vmax = _num(m, "batch/version_min"), _num(m, "batch/version_max")
    age_max = _num(m, "staleness/group_age_max")
    first = Text.assemble(
        "  policy ", (f"v{s.step}", "bold"), f" (data v{_fmt(vmin, '.0f')}..{_fmt(vmax, '.0f')})",
        "  reward ", (_fmt(_num(m, "train/reward_mean"), ".3f"), "bold cyan"),
        "  held-out ", (_fmt(s.accuracy, ".3f"), "bold green"), before,
        "  loss ", _fmt(_num(m, "train/loss"), "+.4f"), no_wrap=True, overflow="ellipsis")
    failures = _num(m, "reward/failure_rate") or 0.0
    second = Text.assemble(
        "  rollout ", _fmt(_num(m, "rollout/tokens_per_s"), ".0f"), " tok/s",
        "  rollout idle ", _fmt(_num(m, "rollout/idle_ratio"), ".0%"),
        "  trainer idle ", _fmt(_num(m, "trainer/idle_ratio"), ".0%"),
        "  token age ", _fmt(_num(m, "staleness/token_age_mean"), ".2f"), f" (groups ≤{_fmt(age_max, '.0f')})",
        "  reward failures ", (f"{failures:.0%}", "bold red" if failures > 0 else ""),
        no_wrap=True, overflow="ellipsis")
    return [first, second]


class Activity:
    """One bar or spinner of the live view (or a start and an end line without a terminal)."""

    def __init__(self, owner: "RunConsole", description: str, total: float | None) -> None:
        self.owner, self.description = owner, description
        self.started = owner.clock()
        self.task: TaskID | None = None
        self.completed, self.total = 0.0, total
        self.closed = False
        if owner.live:
            with owner.lock:
                self.task = owner.tasks.add_task(description, total=total, count="", detail="")
            owner.refresh()
        else:
            owner.message(f"{description} ...")

    def update(self, completed: float | None = None, total: float | None = None, detail: str | None = None) -> None:
        if self.task is None or self.closed:
            return
        self.completed = self.completed if completed is None else completed
        self.total = self.total if total is None else total
        fields = {} if detail is None else {"detail": detail}
        count = f"{int(self.completed)}/{int(self.total)}" if self.total else ""
        with self.owner.lock:
            self.owner.tasks.update(self.task, completed=self.completed, total=self.total, count=count, **fields)
        self.owner.refresh()

    def done(self, note: str = "", ok: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if self.task is not None:
            with self.owner.lock:
                self.owner.tasks.remove_task(self.task)
        if ok:
            extra = f", {note}" if note else ""
            self.owner.message(f"{self.description}: done in {duration(self.owner.clock() - self.started)}{extra}",
                               style="green", mark="✓ " if self.owner.live else "")
        self.owner.refresh()


class RunConsole:
    """The run's console: `message` lines, `step` status, activities, the final summary.

    `console`: where to draw (default stderr); `live`: draw the live view (default: when
    `console` is a terminal); `every`: without the live view, a status line every this many
    steps (and the first and last; the live view prints them too, as a trace above it)."""

    def __init__(self, console: Console | None = None, every: int = 10, total_steps: int | None = None,
                 live: bool | None = None, auto_refresh: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.enabled = True
        self.real = console is None  # the process's stderr: the live view redirects stray prints above it
        self.console = console if console is not None else Console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.every = every
        self.auto_refresh = auto_refresh
        self.clock = clock
        self.start = clock()
        self.status = StepStatus(total=total_steps)
        self.lock = threading.RLock()
        self.tasks = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=32),
                              TextColumn("{task.fields[count]}"), TaskProgressColumn(), TimeElapsedColumn(),
                              TextColumn("{task.fields[detail]}"), console=self.console, auto_refresh=False)
        self.training: TaskID | None = None
        self._live: Live | None = None
        self._warmup: Activity | None = None

    @classmethod
    def disabled(cls) -> "RunConsole":
        """A console that shows nothing (`logger.console=false`)."""
        quiet = cls(Console(quiet=True), live=False)
        quiet.enabled = False
        return quiet

    # -- lines ---------------------------------------------------------------------------
    def message(self, text: str, style: str = "", mark: str = "") -> None:
        """One line, elapsed time first; never hard-wrapped (a narrow terminal may fold it)."""
        if not self.enabled:
            return
        line = Text.assemble((f"{self.clock() - self.start:7.1f}s ", "dim"), (mark, style), (text, style))
        with self.lock:
            self.console.print(line, highlight=False, soft_wrap=True)

    # -- the training loop ------------------------------------------------------------------
    def start_training(self, total_steps: int | None = None) -> None:
        if not self.enabled or self.status.started is not None:
            return
        self.status.total = total_steps or self.status.total
        self.status.started = self.clock()
        if self.live:
            with self.lock:
                self.training = self.tasks.add_task("training", total=self.status.total or None,
                                                    count=self._count(), detail="")
            self.refresh()

    def evaluated(self, accuracy: float) -> None:
        if self.status.accuracy_before is None:
            self.status.accuracy_before = accuracy
        self.status.accuracy = accuracy
        self.refresh()

    def step(self, step: int, metrics: dict) -> None:
        """A step's metrics: redraw the live status; a plain line when one is due."""
        if not self.enabled:
            return
        self.start_training()
        s = self.status
        s.step, s.metrics = step, dict(metrics)
        now = self.clock()
        last = bool(s.total) and step >= s.total
        if step == 1 or last or (self.every > 0 and step % self.every == 0):
            self.message(status_line(s, now))
        if self.training is not None:
            with self.lock:
                self.tasks.update(self.training, completed=step, count=self._count(),
                                  detail=f"ETA {duration(s.eta(now))}")
                if last:
                    self.tasks.remove_task(self.training)
                    self.training = None
            self.refresh()

    def _count(self) -> str:
        return f"{self.status.step}/{self.status.total}" if self.status.total else str(self.status.step)

    # -- activities ----------------------------------------------------------------------
    @contextmanager
    def activity(self, description: str, total: float | None = None) -> Iterator[Activity]:
        """A spinner (or a bar, with `total`) while the block runs; a 'done' line after it."""
        act = Activity(self, description, total)  # (shows nothing when disabled)
        ok = False
        try:
            yield act
            ok = True
        finally:
            act.done(ok=ok)

    def warmup_progress(self, step: int, total: int, accuracy: float | None = None) -> None:
        """The default model's warm-up: called every step, and once more with step == total at its end."""
        if not self.enabled:
            return
        if self._warmup is None or self._warmup.closed:
            self._warmup = Activity(self, "warm-up of the default model", total)
        detail = "" if accuracy is None else f"check accuracy {accuracy:.3f}"
        self._warmup.update(completed=step, total=total, detail=detail)
        if step >= total:
            self._warmup.done(f"{step} steps" + (f", accuracy {accuracy:.3f}" if accuracy is not None else ""))

    # -- the live view -------------------------------------------------------------------
    def _renderable(self) -> RenderableType:
        with self.lock:
            parts: list[RenderableType] = [self.tasks.get_renderable()] if self.tasks.tasks else []
            if self.training is not None:
                parts.extend(status_renderables(self.status))
        return Group(*parts)

    def refresh(self) -> None:
        """Start, redraw or stop the live view: it runs while something is in progress."""
        if not (self.enabled and self.live):
            return
        with self.lock:
            active = bool(self.tasks.tasks)
            if active and self._live is None:
                self._live = Live(console=self.console, get_renderable=self._renderable, transient=True,
                                  auto_refresh=self.auto_refresh, refresh_per_second=4,
                                  redirect_stdout=self.real and sys.stdout.isatty(), redirect_stderr=self.real)
                self._live.start()
            elif not active and self._live is not None:
                live, self._live = self._live, None
                live.stop()
            elif self._live is not None:
                self._live.refresh()

    # -- the end -------------------------------------------------------------------------
    def summary(self, rows: Sequence[tuple[str, str]], title: str = "grove run summary") -> None:
        """The closing table: one `key  value` row each."""
        if not self.enabled:
            return
        self.close()
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_header=False, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(key, value)
        with self.lock:
            if self.console.is_terminal:
                self.console.print(table, highlight=False)
                return
            # without a terminal: wide enough that no row folds (a log keeps one line per row)
            needed = max((len(k) for k, _ in rows), default=0) + max((len(v) for _, v in rows), default=0) + 8
            width = self.console.width
            self.console.width = max(width, needed, len(title))
            try:
                self.console.print(table, highlight=False)
            finally:
                self.console.width = width

    def close(self) -> None:
        """Stop the live view (the terminal gets its cursor back); idempotent."""
        with self.lock:
            for task in list(self.tasks.task_ids):
                self.tasks.remove_task(task)
            self.training = None
            if self._live is not None:
                live, self._live = self._live, None
                live.stop()
