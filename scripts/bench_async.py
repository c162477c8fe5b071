"""Synchronous vs APRIL vs asynchronous training on one long-tail workload, same cores.

The workload (`--workload`): `steps` (the default) is `task=arithmetic_steps`, whose worked
answers run 14-64 tokens with the number of operations (2-6), a natural long tail; `forced`
is the built-in arithmetic task (answers of 2-4 tokens) with `scripts/workloads.py`'s
LongTailWorkflow making `--long-tail-fraction` of the prompts generate at least
`--long-tail-min-tokens` tokens (EOS ignored until then).

    python scripts/bench_async.py --quick        # 30 steps per mode, < 5 min including every start-up
    python scripts/bench_async.py                # 100 steps per mode, steadier numbers (~5 min)

One invocation measures, one after the other on the same two cores:

1. the bounds, in one Ray session (`start_actors`):
   - rollout-only: the fastest of five runs of the rollout worker alone (no training, no
     weight updates) on the same steps x B groups of the workload: all submitted at once,
     first and again last; at most W groups in flight, refilled as they finish, for
     W = B, 2B and (eta + 1) x B; and under AReaL's admission rule with a trainer that
     consumes instantly. Which schedule is fastest depends on the machine: where the
     engine's front end is slow, many requests at once cost more than they gain;
   - train-only: `Trainer.train_step` on those already generated groups, B per call,
     all calls queued back to back (the trainer never waits for data);
   - the windows read against the async loop: (eta + 1) x B is AReaL's window with a
     trainer that consumes instantly; while a batch trains, that batch takes B of it,
     and finished groups waiting for the next batch take more, so in the loop only about
     1.2 B groups generate (the async row's requests in flight / n_samples);
   - for diagnosis: the same groups under AReaL's admission rule with a trainer that
     takes the measured train_step time per batch but uses no core, and weights that load
     instantly. The async loop is this plus the trainer's work beside the rollout and the
     weight loads, so the report splits the gap to rollout-only into the rule's share and
     theirs;
2. the training runs, each through `trainer.launcher.train` (each starts and stops its
   own Ray, vLLM and DeepSpeed; only the loop is timed, `run/loop_s` in metrics.jsonl):
   - sync:       buffer.max_staleness=0, rollout.on_update=wait, rollout.overprovision=1
   - sync+april: buffer.max_staleness=1, rollout.on_update=wait, rollout.overprovision=2 (APRIL; refused at
                 eta=0: a group interrupted at version v resumes at v+1, so its tokens
                 cross a version). At each batch boundary the requests still generating are
                 held in the engine until the next weights (rollout.interrupt_by=pause);
                 --set rollout.interrupt_by=abort hands them back as partial groups instead
   - async:      buffer.max_staleness=<eta> (2), rollout.on_update=interrupt (requests paused in
                 the engine across each update, rollout.interrupt_by=pause), buffer.stragglers=proceed
                 (Grove's defaults): the trainer never waits for a group still generating when
                 due; that group's tokens older than eta become context only (masked tokens column)
   - async-wait: as async with buffer.stragglers=wait: the trainer waits for such a group, and
                 every generated token is trained on
   - async-abort (only with --modes): as async with rollout.interrupt_by=abort (requests
                 aborted and re-prefilled at each update instead of paused)
The summary line uses async.

Throughput is trained trajectories per second: consumed groups (ledger) x n_samples over
the loop's wall time. Pipeline efficiency is the async throughput over the smaller bound.
Progress goes to stderr; the table and the summary line go to stdout, whose last line is

    bench_async: async_speedup=<x> april_gain=<x> pipeline_efficiency=<x> max_staleness=<k> eta=<eta> lost=<n>
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def say(text: str) -> None:
    print(f"[bench_async {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- configs ---------------------------------------------------------------------------
def mode_overrides(eta: int) -> dict[str, list[str]]:
    return {
        "sync": ["buffer.max_staleness=0", "rollout.on_update=wait", "rollout.overprovision=1"],
        "sync+april": ["buffer.max_staleness=1", "rollout.on_update=wait", "rollout.overprovision=2"],
        # the default for async runs: a group still generating when due does not hold the
        # trainer; its tokens older than eta become context only (the masked % column)
        "async": [f"buffer.max_staleness={eta}", "rollout.on_update=interrupt", "buffer.stragglers=proceed",
                  "rollout.overprovision=1"],
        # the same, but the trainer waits for a straggler: every generated token is trained on
        "async-wait": [f"buffer.max_staleness={eta}", "rollout.on_update=interrupt", "buffer.stragglers=wait",
                       "rollout.overprovision=1"],
        # as async, with in-flight requests aborted and re-prefilled at each update instead
        # of paused in the engine (not in the default --modes)
        "async-abort": [f"buffer.max_staleness={eta}", "rollout.on_update=interrupt", "buffer.stragglers=proceed",
                        "rollout.interrupt_by=abort", "rollout.overprovision=1"],
    }


def workload_overrides(args) -> list[str]:
    if args.workload == "steps":  # the task's own long tail; its max_tokens (80) unless --max-tokens
        workload = ["task=arithmetic_steps"] + ([f"rollout.max_tokens={args.max_tokens}"] if args.max_tokens else [])
    else:
        workload = [
            f"rollout.max_tokens={args.max_tokens or 48}",
            f"rollout.workflow={ROOT / 'scripts' / 'workloads.py'}:LongTailWorkflow",
            f"+rollout.workflow_kwargs={{fraction: {args.long_tail_fraction}, min_tokens: {args.long_tail_min_tokens}}}",
        ]
    return [
        *workload,
        "logger=none",
        # a compiled trainer steps ~0.7x as long, which the admission rule turns into
        # rollout throughput; every mode and the train-only bound use it (compiling is
        # start-up, outside every clock). `--set trainer.compile=false` to compare.
        "trainer.compile=true",
        f"trainer.total_steps={args.steps}",
        f"trainer.batch_groups={args.batch_groups}",
        f"rollout.n_samples={args.n_samples}",
        "eval.every_steps=0",
        f"eval.max_rows={args.eval_rows}",
        *args.set,
    ]


# -- bounds ----------------------------------------------------------------------------
def measure_bounds(cfg, num_groups: int, train_batches: int, windows: list[int], eta: int) -> dict:
    """Rollout-only and train-only throughput (trajectories/s) on this workload; for
    diagnosis, the rollout alone with at most W groups in flight for each W in `windows`,
    and under the admission rule with a trainer that costs no core."""
    import ray

    from buffer.prompts import PromptPool
    from trainer.launcher import preflight, start_actors

    data, model_path = preflight(cfg, say)
    (worker,), (trainer,) = start_actors(cfg, model_path)  # one worker, one trainer rank
    try:
        setup = ray.get([worker.astart.remote(), trainer.setup.remote()])
        say(f"bounds: engines ready {setup}")
        n, batch_groups = cfg.rollout.n_samples, cfg.trainer.batch_groups

        def workload():  # the same prompts each time, with fresh group ids
            return PromptPool(data.train, n, seed=cfg.seed + 1, prompt_key=cfg.task.prompt_key).next(num_groups)

        before = ray.get(worker.stats.remote())
        cpu_a = cpu_snapshot()
        groups, rollout_s = rollout_in_window(worker, workload(), window=num_groups)  # all at once
        rollout_cpu = cpu_share(cpu_a, cpu_snapshot())
        after = ray.get(worker.stats.remote())
        tokens = after["rollout/tokens_generated"] - before["rollout/tokens_generated"]
        lengths = [t.num_response_tokens for g in groups for t in g.trajectories]
        min_tokens = cfg.rollout.workflow_kwargs.get("min_tokens", 0)
        long_groups = sum(min(t.num_response_tokens for t in g.trajectories) >= min_tokens
                          for g in groups) if min_tokens else 0
        spread = length_spread(lengths)
        say(f"bounds: rollout-only {num_groups} groups in {rollout_s:.2f}s, {tokens / rollout_s:.0f} tok/s, "
            f"{long_groups} forced long-tail groups, response tokens {spread}")
        schedules = {"all at once": num_groups * n / rollout_s}  # rollout-only is the fastest of these
        windowed = {}
        for window in windows:
            _, seconds = rollout_in_window(worker, workload(), window)
            windowed[window] = schedules[f"{window} groups in flight"] = num_groups * n / seconds
            say(f"bounds: rollout in a window of {window} groups: {num_groups} groups in {seconds:.2f}s")

        batches = [groups[i * batch_groups:(i + 1) * batch_groups] for i in range(len(groups) // batch_groups)]
        batches = (batches * math.ceil(train_batches / max(len(batches), 1)))[:train_batches]
        ray.get(trainer.train_step.remote(batches[0]))  # first step allocates optimizer state
        cpu_a = cpu_snapshot()
        start = time.perf_counter()
        step_metrics = ray.get([trainer.train_step.remote(b) for b in batches])
        train_s = time.perf_counter() - start
        train_cpu = cpu_share(cpu_a, cpu_snapshot())
        trained = sum(len(b) * n for b in batches)
        start = time.perf_counter()
        for _ in range(3):
            ray.get(trainer.export_weights.remote())
        export_s = (time.perf_counter() - start) / 3
        say(f"bounds: train-only {len(batches)} steps in {train_s:.2f}s "
            f"(train_step {sum(m['train/step_s'] for m in step_metrics) / len(batches):.3f}s each inside the actor), "
            f"export_weights {export_s * 1000:.0f} ms")
        under_rule = {}
        for step_s in (0.0, train_s / len(batches)):
            seconds, generating = rollout_under_rule(worker, workload(), batch_groups, eta, step_s)
            under_rule[step_s] = (num_groups * n / seconds, generating)
            say(f"bounds: rollout under the admission rule, trainer {step_s * 1000:.0f} ms per batch: "
                f"{num_groups} groups in {seconds:.2f}s, {generating:.1f} groups generating")
        schedules["under the rule, trainer consuming instantly"] = under_rule[0.0][0]
        _, seconds = rollout_in_window(worker, workload(), window=num_groups)  # the first run had a cold engine
        schedules["all at once, again"] = num_groups * n / seconds
        say(f"bounds: rollout-only again, all at once: {num_groups} groups in {seconds:.2f}s")
        ray.get(worker.ashutdown.remote())
    finally:
        ray.shutdown()
    fastest = max(schedules, key=schedules.get)
    return {
        "rollout_only_traj_s": schedules[fastest],
        "rollout_only_schedule": fastest,
        "rollout_schedules_traj_s": schedules,
        "rollout_window_traj_s": windowed[max(windows)],  # (eta + 1) x B, the admission window
        "rollout_window_groups": max(windows),
        "rollout_windows_traj_s": windowed,
        "rollout_under_rule": under_rule,  # trainer seconds per batch -> (traj/s, groups generating)
        "rollout_only_s": rollout_s,
        "rollout_only_groups": num_groups,
        "rollout_only_tok_s": tokens / rollout_s,
        "long_tail_groups": long_groups,
        "mean_response_tokens": sum(lengths) / len(lengths),
        "response_spread": spread,
        "train_only_traj_s": trained / train_s,
        "train_only_s": train_s,
        "train_only_steps": len(batches),
        "train_step_s": train_s / len(batches),
        "export_s": export_s,
        "rollout_cpu": rollout_cpu,
        "train_cpu": train_cpu,
    }


def length_spread(lengths: list[int]) -> str:
    """Response lengths as mean / median / p90 / max: the long tail a sync batch waits on."""
    ordered = sorted(lengths)
    pick = lambda q: ordered[min(int(q * len(ordered)), len(ordered) - 1)]  # noqa: E731
    return (f"mean {sum(ordered) / len(ordered):.1f}, median {pick(0.5)}, p90 {pick(0.9)}, max {ordered[-1]}")


def finished_groups(worker, min_groups: int, timeout_s: float, what: str) -> list:
    """The groups the worker has finished (waiting up to `timeout_s` for `min_groups`);
    a bound's workload never drops or interrupts a group, so either is an error."""
    import ray

    got = ray.get(worker.collect.remote(min_groups=min_groups, timeout_s=timeout_s))
    if got.dropped or got.partial:
        raise RuntimeError(f"{what}: {len(got.dropped)} dropped, {len(got.partial)} partial groups")
    return got.groups


def rollout_in_window(worker, items, window: int):
    """The finished groups and the seconds to generate `items` with at most `window`
    groups in flight, refilled as groups finish. window >= len(items) is the rollout-only
    bound (all at once); (eta + 1) x B is the async mode's admission window (AReaL's rule
    with a trainer that consumes instantly), without training or weight updates."""
    import ray

    start = time.perf_counter()
    submitted = min(window, len(items))
    ray.get(worker.submit.remote(items[:submitted]))
    groups = []
    while len(groups) < len(items):
        # wake per finished group only while there is something left to submit
        wanted = 1 if submitted < len(items) else len(items) - len(groups)
        finished = finished_groups(worker, wanted, 60.0, f"rollout in a window of {window}")
        groups.extend(finished)
        refill = items[submitted:submitted + len(finished)]
        if refill:
            ray.get(worker.submit.remote(refill))
            submitted += len(refill)
    return groups, time.perf_counter() - start


def rollout_under_rule(worker, items, batch_groups: int, eta: int, train_s: float) -> tuple[float, float]:
    """Seconds to generate `items` under AReaL's admission rule, and the mean number of
    groups generating, with a trainer that takes `train_s` per batch of B finished groups
    but no core (0: it consumes instantly), and weights that load instantly.

    This is the async loop without its two costs on the machine, the trainer's core of
    work beside the rollout and the weight loads, so the gap between it and the async row
    is theirs, and the gap between it and rollout-only is the rule's."""

    from buffer.buffer import StalenessManager

    rule = StalenessManager(batch_groups, eta)  # the orchestrator's own rule, counted in groups of equal size
    start = last = time.perf_counter()
    started = finished = consumed = version = 0
    training_until: float | None = None
    generating_area = 0.0
    while consumed < len(items):
        now = time.perf_counter()
        generating_area += (started - finished) * (now - last)
        last = now
        if training_until is not None and now >= training_until:
            version, training_until = version + 1, None
        if training_until is None and finished - consumed >= batch_groups:
            consumed += batch_groups
            training_until = now + train_s  # 0: the next pass bumps the version at once
            continue
        room = min(rule.capacity(started - version * batch_groups), len(items) - started)
        if room > 0:
            worker.submit.remote(items[started:started + room])
            started += room
        wait = 60.0 if training_until is None else max(training_until - time.perf_counter(), 0.0005)
        if started == finished:  # nothing generating: the next slots open when this batch is trained
            time.sleep(wait)
            continue
        finished += len(finished_groups(worker, 1, wait, "rollout under the rule"))
    elapsed = time.perf_counter() - start
    return elapsed, generating_area / elapsed


# -- where the CPU goes -----------------------------------------------------------------
CPU_GROUPS = ("trainer", "rollout actor", "engine core", "engine worker", "rewards", "driver", "ray")


def cpu_group(proc) -> str:
    if proc.pid == os.getpid():
        return "driver"
    try:
        name, cmd = proc.name(), " ".join(proc.cmdline()[:4])
    except Exception:
        return "ray"
    text = f"{name} {cmd}"
    for key, group in (("ray::Trainer", "trainer"), ("ray::RolloutWorker", "rollout actor"),
                       ("EngineCore", "engine core"), ("VLLM::Worker", "engine worker"),
                       ("VllmWorker", "engine worker"), ("rewards._worker", "rewards")):
        if key in text:
            return group
    return "ray"


def cpu_snapshot() -> tuple[float, dict[str, float], dict[str, str]]:
    """CPU seconds used so far by this process and everything it started, by role, and
    the cores each role may run on."""
    import psutil

    me = psutil.Process()
    used = dict.fromkeys(CPU_GROUPS, 0.0)
    cores: dict[str, set[int]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            group = cpu_group(proc)
            used[group] += times.user + times.system
            cores.setdefault(group, set()).update(proc.cpu_affinity())
        except Exception:  # exited meanwhile
            continue
    return time.perf_counter(), used, {g: ",".join(map(str, sorted(c))) for g, c in cores.items()}


def cpu_share(a, b) -> dict[str, float]:
    """Cores busy on average per role between two snapshots."""
    wall = max(b[0] - a[0], 1e-9)
    return {g: max(0.0, b[1][g] - a[1].get(g, 0.0)) / wall for g in CPU_GROUPS}


class RunWatch:
    """Watches a run from a thread: CPU snapshots at the loop's start and end (seen in
    metrics.jsonl), and a guard that kills the trainer actor when a batch or its memory
    runs away, so a runaway mode fails in seconds instead of filling the machine's RAM."""

    def __init__(self, metrics: Path, max_batch_trajectories: int, max_rss_gb: float) -> None:
        import threading

        self.metrics, self.max_batch, self.max_rss = metrics, max_batch_trajectories, max_rss_gb * 2**30
        self.start = self.end = None
        self.cores: dict[str, str] = {}
        self.tripped: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        trainer = None
        offset = 0
        while not self._stop.wait(0.25):  # light: one file read and one /proc read per tick
            if not self.metrics.exists():
                continue
            with open(self.metrics) as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            offset += len(complete)
            for line in complete.splitlines():
                record = json.loads(line)
                if self.start is None and "eval/accuracy" in record:
                    self.start = cpu_snapshot()  # the loop starts right after the first eval
                    self.cores = self.start[2]
                elif "run/loop_s" in record and self.end is None:
                    self.end = cpu_snapshot()
                if (record.get("train/num_trajectories") or 0) > self.max_batch and not self.tripped:
                    self._trip(f"a batch of {int(record['train/num_trajectories'])} trajectories "
                               f"(> {self.max_batch}): admission let generation run away")
            if trainer is None and self.start is not None:
                trainer = next((p for p in psutil.Process().children(recursive=True)
                                if cpu_group(p) == "trainer"), None)
            try:
                if trainer is not None and trainer.memory_info().rss > self.max_rss and not self.tripped:
                    self._trip(f"trainer RSS {trainer.memory_info().rss / 2**30:.1f} GiB > {self.max_rss / 2**30:.1f}")
            except psutil.Error:
                trainer = None

    def _trip(self, why: str) -> None:
        import psutil

        self.tripped = why
        say(f"guard: {why}; killing the trainer actor")
        for proc in psutil.Process().children(recursive=True):
            try:
                if cpu_group(proc) == "trainer":
                    proc.kill()  # a process this benchmark started, by its pid
            except Exception:
                continue

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        return cpu_share(self.start, self.end) if self.start and self.end else {}


# -- one training run -------------------------------------------------------------------
def run_mode(name: str, overrides: list[str], out: Path, guard_batches: float, max_rss_gb: float) -> dict:
    from omegaconf import OmegaConf

    from trainer.cli import load_config
    from trainer.launcher import train

    cfg = load_config(overrides)
    run_dir = out / name.replace("+", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    say(f"{name}: {' '.join(overrides)}")
    limit = int(guard_batches * cfg.trainer.batch_groups * cfg.rollout.n_samples)
    watch = RunWatch(run_dir / "metrics.jsonl", limit, max_rss_gb)
    start = time.perf_counter()
    error = None
    try:
        train(cfg, run_dir)
    except Exception as err:  # reported in the table, the other modes still run
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        say(f"{name}: FAILED {err}")
    total_s = time.perf_counter() - start
    cpu = watch.stop()
    if watch.tripped:
        error = f"stopped by the guard: {watch.tripped}"
    row = summarize(name, cfg, run_dir, total_s, error)
    row["cpu"], row["cores"] = cpu, watch.cores
    return row


def summarize(name: str, cfg, run_dir: Path, total_s: float, error: str | None) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "train/loss" in r]
    final = next((r for r in reversed(records) if "run/loop_s" in r), None)

    def mean(key: str) -> float:
        values = [r[key] for r in steps if r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    def peak(key: str, only_trained: bool = False) -> float:
        # a batch whose every token is masked (APRIL) trains nothing: it has no staleness, and
        # the trainer then reports the context's age as batch/age_max
        values = [r[key] for r in steps if r.get(key) is not None and not (only_trained and not r.get("train/num_tokens"))]
        return max(values) if values else float("nan")

    row = {"mode": name, "eta": cfg.buffer.max_staleness, "steps": len(steps), "total_s": total_s, "error": error,
           "n_samples": cfg.rollout.n_samples}
    if final is None:
        # a failed run: the last step record still holds the running ledger
        last = steps[-1] if steps else {}
        row.update({"loop_s": float("nan"), "traj_s": float("nan"), "consumed": last.get("ledger/consumed", 0),
                    "lost": None})  # no final ledger: the run never reached its balance check
    else:
        consumed = int(final["ledger/consumed"])
        row.update({
            "loop_s": final["run/loop_s"],
            "consumed": consumed,
            "trajectories": consumed * cfg.rollout.n_samples,
            "traj_s": consumed * cfg.rollout.n_samples / final["run/loop_s"],
            "rollout_idle": final["run/rollout_idle_ratio"],
            "trainer_idle": final["run/trainer_idle_ratio"],
            "straggler_wait": final.get("run/trainer_straggler_wait_ratio", float("nan")),
            "concurrency": final.get("run/rollout_concurrency_mean", float("nan")),
            "ledger": {k.removeprefix("ledger/"): int(v) for k, v in final.items() if k.startswith("ledger/")},
            "lost": int(final["ledger/lost"]),
        })
    if len(steps) >= 3:  # between the first and the last step: no start-up ramp, no exit
        window = steps[-1]["time_s"] - steps[0]["time_s"]
        row["steady_traj_s"] = sum(r["train/num_trajectories"] for r in steps[1:]) / max(window, 1e-9)
    else:
        row["steady_traj_s"] = float("nan")
    row["exit_s"] = final["time_s"] - steps[-1]["time_s"] if final and steps else float("nan")
    trained = sum(r.get("train/num_tokens", 0.0) for r in steps)
    masked = (final or (steps[-1] if steps else {})).get("ledger/masked_tokens", 0.0)
    row["masked_share"] = masked / (masked + trained) if masked + trained else float("nan")
    # trajectories/s counts a trajectory whose older tokens were masked as fully trained;
    # trained (unmasked) tokens per second does not
    row["trained_tok_s"] = trained / row["loop_s"]  # nan for a failed run
    row.update({
        "group_age_max": peak("staleness/group_age_max"),
        "batch_age_max": peak("batch/age_max", only_trained=True),
        "empty_batches": sum(1 for r in steps if not r.get("train/num_tokens")),
        "token_age_max": peak("staleness/token_age_max"),
        "context_age_max": peak("batch/context_age_max"),
        "train_step_s": mean("train/step_s"),
        "sync_total_s": mean("weight_sync/total_s"),
        "sync_drain_s": mean("weight_sync/drain_s"),
        "sync_load_s": mean("weight_sync/load_s"),
        "step_rollout_idle": mean("rollout/idle_ratio"),
        "response_len": mean("response/length_mean"),
        "partial_ratio": mean("batch/partial_ratio"),
    })
    row["max_staleness"] = max(v for v in (row["group_age_max"], row["batch_age_max"], 0.0) if not math.isnan(v))
    return row


# -- report -----------------------------------------------------------------------------
def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def provenance() -> str:
    """Which library code ran: the checkout the launcher was imported from, its commit,
    and whether it had uncommitted changes (this script's own files aside)."""
    import subprocess

    import trainer.launcher

    root = Path(trainer.launcher.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = [line[3:] for line in subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                                                      capture_output=True, text=True).stdout.splitlines()
                 if line[3:] not in ("scripts/bench_async.py", "docs/benchmarks.md")]
        return f"library: {root} at {commit}" + (f" + uncommitted changes in {len(dirty)} files" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return f"library: {root} (not a git checkout)"


def workload_description(args) -> str:
    if getattr(args, "workload", "forced") == "steps":
        return (f"task=arithmetic_steps (its tiny model; worked answers of 2-6 steps, a natural long tail), "
                f"max_tokens={args.max_tokens or 80}")
    return (f"built-in tiny model and arithmetic task, max_tokens={args.max_tokens or 48}; "
            f"{args.long_tail_fraction:.0%} of groups must generate >= {args.long_tail_min_tokens} tokens")


def report(args, bounds: dict, rows: list[dict], eta: int) -> list[str]:
    nan = float("nan")
    lines = [
        provenance(),
        f"workload: {workload_description(args)}; {args.steps} steps x {args.batch_groups} groups x "
        f"{args.n_samples} samples per mode; 2 cores (engine threads on core 0, trainer on core 1), no GPU",
        "",
        "| bound | trajectories/s | detail |",
        "|---|---:|---|",
    ]
    if bounds:
        lines += [
            f"| rollout-only | {fmt(bounds['rollout_only_traj_s'], 1)} | the fastest of the rollout-alone runs marked * "
            f"below: {bounds['rollout_only_schedule']} |",
            f"| (rollout, all {bounds['rollout_only_groups']} groups at once) * | "
            f"{fmt(bounds['rollout_schedules_traj_s']['all at once'], 1)}, again last "
            f"{fmt(bounds['rollout_schedules_traj_s']['all at once, again'], 1)} | no admission limit; the first run "
            f"done in {fmt(bounds['rollout_only_s'])} s, {fmt(bounds['rollout_only_tok_s'], 0)} tok/s; "
            + (f"{bounds['long_tail_groups']} forced long-tail groups; " if bounds['long_tail_groups'] else "")
            + f"response tokens {bounds.get('response_spread') or fmt(bounds['mean_response_tokens'], 1) + ' mean'} |",
            f"| train-only | {fmt(bounds['train_only_traj_s'], 1)} | {bounds['train_only_steps']} train_step calls queued "
            f"back to back, {fmt(bounds['train_step_s'], 3)} s each; export_weights {fmt(bounds['export_s'] * 1000, 0)} ms |",
        ]
        windows = bounds["rollout_windows_traj_s"]
        for window in sorted(windows):
            label = ("(eta + 1) x B: AReaL's window, trainer consuming instantly" if window == bounds["rollout_window_groups"]
                     else f"{window // args.batch_groups} x B")
            lines.append(f"| (rollout, {window} groups in flight) * | {fmt(windows[window], 1)} | the same groups, at "
                         f"most {window} = {label}; refilled as they finish |")
        for step_s, (traj_s, generating) in sorted(bounds["rollout_under_rule"].items()):
            trainer = ("consuming instantly) *" if step_s == 0
                       else f"taking {fmt(step_s, 3)} s per batch on no core)")
            lines.append(f"| (rollout under the rule, trainer {trainer} | {fmt(traj_s, 1)} | the same groups under "
                         f"AReaL's admission rule (eta={eta}), {fmt(generating, 1)} groups generating on average; weights "
                         "load instantly" + ("" if step_s == 0 else "; diagnosis only, not rollout alone") + " |")
    lines += [
        "",
        "| mode | eta | steps | loop s | trained traj | traj/s (loop) | vs sync | traj/s (steady) | exit s | "
        "rollout idle | requests in flight | trainer idle (straggler wait) | train_step s | weight sync s (drain) | max age: group / batch / masked context | "
        "masked tokens | trained tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    by_mode = {r["mode"]: r for r in rows}
    base = by_mode.get("sync", {}).get("traj_s", nan)
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['eta']} | {r['steps']} | {fmt(r['loop_s'], 1)} | {r.get('trajectories', 'n/a')} | "
            f"{fmt(r['traj_s'], 1)} | {fmt(r['traj_s'] / base)} | {fmt(r['steady_traj_s'], 1)} | {fmt(r['exit_s'], 1)} | "
            f"{fmt(r.get('rollout_idle', nan))} | {fmt(r.get('concurrency', nan), 1)} | {fmt(r.get('trainer_idle', nan))} "
            f"({fmt(r.get('straggler_wait', nan))}) | {fmt(r['train_step_s'], 3)} | "
            f"{fmt(r['sync_total_s'], 3)} ({fmt(r['sync_drain_s'], 3)}) | {fmt(r['group_age_max'], 0)} / "
            f"{fmt(r['batch_age_max'], 0)} / {fmt(r['context_age_max'], 0)} | {fmt(100 * r['masked_share'], 1)} % | "
            f"{fmt(r['trained_tok_s'], 0)} |"
        )
    if bounds and "async" in by_mode:
        generating = by_mode["async"].get("concurrency", nan) / args.n_samples
        rule_traj_s = bounds["rollout_under_rule"][max(bounds["rollout_under_rule"])][0]
        ceiling = bounds["rollout_under_rule"][min(bounds["rollout_under_rule"])][0] / bounds["rollout_only_traj_s"]
        lines += ["", f"async over the rollout in its admission window: "
                      f"{fmt(by_mode['async']['traj_s'] / bounds['rollout_window_traj_s'])}; groups generating in the "
                      f"async loop: {fmt(generating, 1)} on average (requests in flight / n_samples), to read against "
                      "the rollout rows above",
                  "", "where the async loop's gap to rollout-only goes: the admission rule with a trainer of this "
                      f"speed leaves {fmt(rule_traj_s / bounds['rollout_only_traj_s'])} of rollout-only; of that, the "
                      f"async loop keeps {fmt(by_mode['async']['traj_s'] / rule_traj_s)} (the rest is the trainer's "
                      "work beside the rollout and the weight loads)",
                  "", f"ceiling: with a trainer that takes no time and no core, the rule leaves {fmt(ceiling)} of "
                      "rollout-only: beyond run-to-run noise, no loop under AReaL's rule at this eta, batch and engine "
                      "makes a higher pipeline_efficiency"]
    lines += ["", "ledgers (lost must be 0):", ""]
    keys = ("started", "finished", "consumed", "partial", "resumed", "samples_interrupted", "masked_tokens",
            "unfinished_at_exit", "buffered_at_exit", "partial_at_exit", "lost")
    for r in rows:
        ledger = r.get("ledger") or {}
        text = ", ".join(f"{k}={ledger[k]}" for k in keys if k in ledger) if ledger else "no final ledger"
        empty = f"; {r['empty_batches']} batches with every token masked" if r.get("empty_batches") else ""
        lines.append(f"- {r['mode']}: {text}{empty}" + (f" -- FAILED: {r['error']}" if r["error"] else ""))
    lines += ["", "where the CPU goes (cores busy on average; the machine has 2):", "",
              "| phase | " + " | ".join(CPU_GROUPS) + " | total |", "|---|" + "---:|" * (len(CPU_GROUPS) + 1)]
    phases = [("rollout-only", bounds.get("rollout_cpu")), ("train-only", bounds.get("train_cpu"))]
    phases += [(f"{r['mode']} loop", r.get("cpu")) for r in rows]
    for label, cpu in phases:
        if cpu:
            lines.append(f"| {label} | " + " | ".join(f"{cpu[g]:.2f}" for g in CPU_GROUPS) + f" | {sum(cpu.values()):.2f} |")
    cores = next((r["cores"] for r in rows if r.get("cores")), {})
    if cores:
        lines += ["", "allowed cores: " + "; ".join(f"{g} {c}" for g, c in sorted(cores.items()))]

    sync_t = by_mode.get("sync", {}).get("traj_s", nan)
    async_t = by_mode.get("async", {}).get("traj_s", nan)
    april_t = by_mode.get("sync+april", {}).get("traj_s", nan)
    bound = min(bounds.get("rollout_only_traj_s", nan), bounds.get("train_only_traj_s", nan))
    ages = [v for r in rows for v in (r["group_age_max"], r["batch_age_max"]) if not math.isnan(v)]
    max_staleness = int(max(ages, default=0))
    lost = sum(int(r.get("lost") or 0) for r in rows)
    failed = [r["mode"] for r in rows if r["error"]]
    lines += ["", f"total wall time {time.perf_counter() - T0:.0f} s (including every start-up)"
              + (f"; FAILED modes: {', '.join(failed)}" if failed else "")]
    lines.append(
        f"bench_async: async_speedup={async_t / sync_t:.2f} april_gain={april_t / sync_t:.2f} "
        f"pipeline_efficiency={async_t / bound:.2f} max_staleness={max_staleness} eta={eta} lost={lost}"
    )
    return lines


@contextlib.contextmanager
def stdout_to_stderr():
    """Everything the engines, Ray and the launcher print goes to stderr, so stdout holds
    only the report (Ray forwards actor stdout to the driver's stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


T0 = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps: the whole run in under 5 minutes")
    ap.add_argument("--steps", type=int, default=None, help="trainer.total_steps per mode (quick 30, full 100)")
    ap.add_argument("--batch-groups", type=int, default=8)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--workload", choices=("steps", "forced"), default="steps",
                    help="steps: task=arithmetic_steps' natural long tail; forced: arithmetic with forced lengths")
    ap.add_argument("--max-tokens", type=int, default=None, help="rollout.max_tokens (steps: 80, forced: 48)")
    ap.add_argument("--long-tail-fraction", type=float, default=0.15, help="forced: the share of long prompts")
    ap.add_argument("--long-tail-min-tokens", type=int, default=40, help="forced: their minimum length")
    ap.add_argument("--eta", type=int, default=2, help="the async mode's buffer.max_staleness")
    ap.add_argument("--eval-rows", type=int, default=8)
    ap.add_argument("--modes", default="sync,sync+april,async,async-wait", help="comma-separated subset (for tuning)")
    ap.add_argument("--skip-bounds", action="store_true", help="for tuning: no rollout-only/train-only runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra Hydra override for every mode (repeatable)")
    ap.add_argument("--guard-batches", type=float, default=6.0,
                    help="stop a mode whose batch exceeds this many batch_groups x n_samples trajectories")
    ap.add_argument("--max-trainer-gb", type=float, default=6.0, help="stop a mode whose trainer RSS exceeds this")
    ap.add_argument("--out", type=Path, default=Path("/tmp/grove-bench-async"))
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 30 if args.quick else 100

    from trainer.cli import load_config

    args.out.mkdir(parents=True, exist_ok=True)
    base = workload_overrides(args)
    modes = mode_overrides(args.eta)
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in wanted:
        if m not in modes:
            ap.error(f"unknown mode {m!r}; choose from {list(modes)}")

    bounds: dict[str, float] = {}
    rows: list[dict] = []
    with stdout_to_stderr():
        if not args.skip_bounds:
            say("bounds: rollout-only and train-only")
            cfg = load_config(base + modes["async"])
            start = time.perf_counter()
            windows = sorted({args.batch_groups, 2 * args.batch_groups, (args.eta + 1) * args.batch_groups})
            bounds = measure_bounds(cfg, num_groups=args.steps * args.batch_groups, train_batches=args.steps,
                                    windows=windows, eta=args.eta)
            say(f"bounds done in {time.perf_counter() - start:.0f}s: rollout-only {bounds['rollout_only_traj_s']:.1f} "
                f"traj/s, train-only {bounds['train_only_traj_s']:.1f} traj/s")
        for name in wanted:
            row = run_mode(name, base + modes[name], args.out, args.guard_batches, args.max_trainer_gb)
            rows.append(row)
            say(f"{name}: {fmt(row['traj_s'], 1)} traj/s, loop {fmt(row['loop_s'], 1)} s, "
                f"whole run {row['total_s']:.0f} s, lost {row.get('lost')}")
    lines = report(args, bounds, rows, args.eta)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
