"""How long a weight sync takes, per transport and model size, against the memcpy bound of
the same bytes, and how long it stalls generation.

For each model (a random-init Qwen2 built from its config, no hub: `tiny` is the built-in
shape, ~0.4M parameters; `10m` and `100m` have a 8k / 32k vocabulary; fp32 throughout):

- the real trainer, `trainer.policy_trainer.Trainer`, as a Ray actor (DeepSpeed ZeRO-1,
  one rank, pinned to core 1), and a vLLM engine in this process, as a rollout worker
  holds it (`VLLMEngine`, the model in the engine-core process, pinned to core 0);
- the trainer and the engine's model worker in a `broadcast` weight group (gloo);
- for each transport, `--repeats` times: one train step (not timed), then one sync, timed
  from the step's end until the engine holds the new weights, while four requests decode:
  - `object_store`: `export_weights` (a safetensors blob) through Ray's object store into
    this process, then the engine's weight swap (the blob to the engine core, the load);
  - `broadcast`: the step's ticket, then the trainer streams buckets of `--bucket-mb`
    while the engine core receives and loads them;
  - `broadcast+delta`: the same with `weight_sync.delta` (only changed buckets travel);
- the memcpy bound: one `copy_` of the same number of bytes in this process (best of 5);
- the stall: how long each swap held the engine core, which runs no decode step meanwhile
  (timed inside the engine, `GroveWorkerExtension.grove_take_stalls`);
- the fixed cost of a sync: a delta sync when nothing changed (no bucket travels);
- the floor under every transport: one call to the trainer actor and one `collective_rpc`
  to the engine's worker, both carrying nothing, while the probes decode (a sync needs at
  least these two: the trainer must be asked, the engine told); its ratio to the memcpy
  bound is the best any transport could show at that size;
- what delta sync saves per step: buckets (and bytes) changed by one Adam step, and the
  share of weights whose bits changed, in fp32 and once rounded to bf16.

    python scripts/bench_weight_sync.py                       # tiny, 10m, 100m; 5 syncs each
    python scripts/bench_weight_sync.py --sizes tiny --repeats 3

Ends with one line: `bench_weight_sync: worst_ratio_to_memcpy=<x> max_stall_ms=<y>` (the
worst median sync time over the memcpy bound, over sizes and transports; the longest stall).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (hidden, layers, heads, kv heads, intermediate, vocab; None = the tokenizer's, padded)
SIZES = {"tiny": (128, 2, 4, 2, 512, None), "10m": (256, 4, 4, 2, 1024, 8192),
         "100m": (768, 8, 12, 4, 2048, 32768)}
TRANSPORTS = ("object_store", "broadcast", "broadcast+delta")
QUIET = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
         "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def build_model(name: str, root: Path) -> tuple[str, int]:
    """The model folder (random weights, the built-in character tokenizer); its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.tiny_model import build_char_tokenizer, save_model_folder

    hidden, layers, heads, kv, inter, vocab = SIZES[name]
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=vocab or (len(tokenizer) + 31) // 32 * 32, hidden_size=hidden,
                         intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0, torch_dtype="float32")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    path = root / name
    save_model_folder(model, tokenizer, path)
    return str(path), sum(p.numel() for p in model.parameters())


def groups(vocab: int, seed: int):
    """Two groups of four short responses with mixed rewards: a real, cheap, gradient."""
    import torch

    from buffer.types import FinishReason, Group, Trajectory

    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in range(2):
        group = Group(group_id=f"g{seed}-{g}", prompt_id=f"p{g}", prompt_text="", row={})
        prompt = torch.randint(2, vocab, (8,), generator=gen).tolist()
        for i in range(4):
            t = Trajectory(prompt_id=f"p{g}", group_id=group.group_id, prompt_ids=prompt)
            t.append_tokens(torch.randint(2, vocab, (8,), generator=gen).tolist(),
                            (-1.0 - torch.rand(8, generator=gen)).tolist(), 0)
            t.reward, t.finish_reason = float(i % 2), FinishReason.STOP
            group.trajectories.append(t)
        out.append(group)
    return out


def memcpy_seconds(nbytes: int) -> float:
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return best


class Probes:
    """Requests decoding through a sync, so each swap lands between steps of a busy engine."""

    def __init__(self, engine, count: int = 4, tokens: int = 1900) -> None:
        self.engine, self.ids = engine, [f"probe-{time.monotonic_ns()}-{k}" for k in range(count)]
        self.tasks = [asyncio.ensure_future(engine.agenerate([3, 4, 5 + k], tokens, min_tokens=tokens, request_id=rid))
                      for k, rid in enumerate(self.ids)]

    async def busy(self, timeout_s: float = 60.0) -> None:
        """Until every probe has decoded a few tokens; a probe that fails, or none decoding
        within `timeout_s`, is an error (the sync would otherwise be timed on an idle engine)."""
        states = self.engine.engine.output_processor.request_states  # keyed by vLLM's internal ids
        deadline = time.perf_counter() + timeout_s

        def decoding() -> set[str]:
            return {s.external_req_id for s in list(states.values()) if not s.is_prefilling}

        while not decoding() >= set(self.ids):
            for task in self.tasks:
                if task.done():
                    task.result()  # raises its error
                    raise RuntimeError("a probe request finished before the sync: raise Probes.tokens")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"probes not decoding after {timeout_s} s (decoding: {sorted(decoding())})")
            await asyncio.sleep(0.005)

    async def stop(self) -> bool:
        """Abort them; True if all were still decoding (the engine was busy throughout)."""
        from buffer.types import FinishReason

        await self.engine.abort(self.ids)
        segments = await asyncio.gather(*self.tasks)
        return all(s.finish_reason is FinishReason.ABORTED for s in segments)


async def bench_size(name: str, root: Path, args) -> dict:
    import ray
    import torch
    from safetensors.torch import load

    from algorithms import AlgorithmConfig
    from rollout.engine import EngineConfig, VLLMEngine
    from trainer.policy_trainer import Trainer, TrainerConfig

    from trainer.tiny_model import build_char_tokenizer

    path, params = build_model(name, root)
    vocab = len(build_char_tokenizer())  # the ids in use: larger vocabularies hold rows no step touches
    trainer = ray.remote(num_cpus=1)(Trainer).options(runtime_env={"env_vars": QUIET}).remote(
        path, TrainerConfig(cpu_cores=args.trainer_core, num_threads=1, lr=args.lr), AlgorithmConfig())
    engine = VLLMEngine(path, EngineConfig(cpu_cores=args.engine_core, dtype="float32", enforce_eager=True,
                                           max_model_len=2048, kv_cache_mb=512))
    started = time.perf_counter()
    await asyncio.gather(trainer.setup.remote(), engine.astart())
    say(f"{name}: {params / 1e6:.1f}M parameters; trainer and engine up in {time.perf_counter() - started:.0f}s")
    address, port = await trainer.free_port.remote()
    opened = trainer.broadcast_open.remote(address, port, 2, "gloo", args.bucket_mb, 300, False)
    await engine.engine.collective_rpc("grove_join_group", args=(address, port, 1, 2, "gloo", 300))
    plan = await opened
    await engine.engine.collective_rpc("grove_set_plan", args=(plan,))
    nbytes = sum(int(torch.Size(s).numel()) * 4 for b in plan for s in b["shapes"])
    memcpy = memcpy_seconds(nbytes)
    version, step = 0, 0
    results: dict = {"params": params, "bytes": nbytes, "memcpy_s": memcpy, "buckets": len(plan), "rows": {}}

    async def train() -> None:
        nonlocal step
        step += 1
        await trainer.train_step.remote(groups(vocab, step))

    async def sync(transport: str) -> tuple[float, float, int, bool]:
        nonlocal version
        version += 1
        probes = Probes(engine)
        await probes.busy()
        await engine.engine.collective_rpc("grove_take_stalls")
        start = time.perf_counter()
        if transport == "object_store":
            blob = await trainer.export_weights.remote()
            await engine.aswap_weights(blob, version)
            sent = len(blob)
        else:
            ticket = await trainer.broadcast_ticket.remote(version)
            sending = trainer.broadcast_send.remote(ticket)
            await engine.aswap_weights(ticket, version)
            sent = int((await sending)["bytes"])
        seconds = time.perf_counter() - start
        (stalls,) = await engine.engine.collective_rpc("grove_take_stalls")
        busy = await probes.stop()
        return seconds, max(stalls), sent, busy

    async def floor() -> float:
        probes = Probes(engine)
        await probes.busy()
        start = time.perf_counter()
        await trainer.__ray_call__.remote(_noop)
        await engine.engine.collective_rpc("grove_take_stalls")
        seconds = time.perf_counter() - start
        await probes.stop()
        return seconds

    results["floor_s"] = statistics.median([await floor() for _ in range(5)])
    say(f"{name}: floor (an empty trainer call + an empty engine rpc) {results['floor_s'] * 1000:.2f} ms, "
        f"{results['floor_s'] / memcpy:.1f}x memcpy")
    for transport in TRANSPORTS:
        delta = transport.endswith("delta")
        await trainer.__ray_call__.remote(_set_delta, delta)
        rows = []
        for _ in range(args.repeats):
            await train()
            rows.append(await sync(transport))
        results["rows"][transport] = rows
        seconds = statistics.median(r[0] for r in rows)
        say(f"{name} {transport:>16}: sync {seconds * 1000:8.1f} ms median ({' '.join(f'{r[0] * 1000:.0f}' for r in rows)})"
            f", {rows[-1][2] / 1e6:.1f} MB, {seconds / memcpy:6.1f}x memcpy, stall max "
            f"{max(r[1] for r in rows) * 1000:.1f} ms, engine busy throughout: {all(r[3] for r in rows)}")
    empty = [await sync("broadcast+delta") for _ in range(3)]  # nothing changed: the fixed cost
    results["empty_s"] = statistics.median(r[0] for r in empty)
    assert all(r[2] == 0 for r in empty)
    # what one Adam step changes: buckets (delta sync's unit), and bits per weight
    before = load(await trainer.export_weights.remote())
    await train()
    ticket = await trainer.broadcast_ticket.remote(version + 1)
    sending = trainer.broadcast_send.remote(ticket)
    await engine.aswap_weights(ticket, version + 1)
    await sending
    after = load(await trainer.export_weights.remote())
    total = sum(t.numel() for t in after.values())
    results["delta"] = {
        "buckets_changed": len(ticket["buckets"]), "bytes_sent": ticket["bytes"],
        "fp32_changed": sum(int((after[k] != before[k]).sum()) for k in after) / total,
        "bf16_changed": sum(int((after[k].bfloat16() != before[k].bfloat16()).sum()) for k in after) / total}
    engine.shutdown()
    ray.kill(trainer)
    return results


def _noop(trainer) -> None:
    return None


def _set_delta(trainer, delta: bool) -> None:
    trainer._delta, trainer._sent_digests = delta, None


def report(all_results: dict[str, dict]) -> tuple[float, float]:
    print("| model | params | MB | buckets | transport | sync ms (median) | memcpy ms | x memcpy | max stall ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst, stall = 0.0, 0.0
    for name, res in all_results.items():
        for transport, rows in res["rows"].items():
            seconds = statistics.median(r[0] for r in rows)
            ratio = seconds / res["memcpy_s"]
            worst, stall = max(worst, ratio), max(stall, max(r[1] for r in rows))
            print(f"| {name} | {res['params'] / 1e6:.1f}M | {res['bytes'] / 1e6:.1f} | {res['buckets']} | {transport} | "
                  f"{seconds * 1000:.1f} | {res['memcpy_s'] * 1000:.2f} | {ratio:.1f} | "
                  f"{max(r[1] for r in rows) * 1000:.1f} |")
    print()
    print("| model | floor ms (x memcpy) | empty sync ms | buckets changed by a step | delta bytes saved | "
          "weights changed fp32 | as bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, res in all_results.items():
        d = res["delta"]
        print(f"| {name} | {res['floor_s'] * 1000:.2f} ({res['floor_s'] / res['memcpy_s']:.1f}) | "
              f"{res['empty_s'] * 1000:.1f} | {d['buckets_changed']}/{res['buckets']} | "
              f"{1 - d['bytes_sent'] / res['bytes']:.1%} | {d['fp32_changed']:.1%} | {d['bf16_changed']:.1%} |")
    return worst, stall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    parser.add_argument("--lr", type=float, default=1e-6, help="the trainer's (RL on a real model: ~1e-6)")
    parser.add_argument("--engine-core", default="0")
    parser.add_argument("--trainer-core", default="1")
    args = parser.parse_args()
    os.environ.update(QUIET, VLLM_LOGGING_LEVEL="WARNING")
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    results = {}
    with tempfile.TemporaryDirectory(prefix="grove-bench-sync-") as root:
        for name in args.sizes:
            results[name] = asyncio.run(bench_size(name, Path(root), args))
    ray.shutdown()
    worst, stall = report(results)
    print(f"bench_weight_sync: worst_ratio_to_memcpy={worst:.2f} max_stall_ms={stall * 1000:.1f}")


if __name__ == "__main__":
    main()
