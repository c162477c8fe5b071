"""Trainer peak memory against the group size (BroRL-size groups): flat with micro-batches.

    python scripts/bench_group_memory.py                 # n = 32, 128, 512; micro-batched and whole
    python scripts/bench_group_memory.py --sizes 32 256 --cap 4096 --vocab 32768

One group of n samples is one batch (`trainer.batch_groups=1`, as a BroRL run with a
prompt per step). For each n and each setting, a fresh process builds a DeepSpeed
`Trainer` (trainer/policy_trainer.py, ZeRO-1, fp32, one CPU thread) on a Qwen2 built from
config (default: the built-in model's body, 2 layers of 128, with a 16k vocabulary so the
output layer weighs as in a real model; random weights), runs one warm-up `train_step` on
a group of 8 (gradients and Adam's state exist from then on), and then measures one
`train_step` on a synthetic group of n: `--prompt-len` prompt tokens and `--response-len`
response tokens per sample, random ids, 0/1 rewards.

Measured: the step's peak extra resident memory, the kernel's high-water mark of the
resident set (VmHWM, reset through /proc/self/clear_refs just before the step) minus the
resident set before it. Every allocation over 64 KiB gets its own mmap (M_MMAP_THRESHOLD),
so freed tensors leave the resident set and the mark follows live tensor memory, as in
tests/unit/test_microbatch.py's probe. Two settings:

- **micro**: `trainer.max_tokens_per_micro_batch=--cap`, by default the smallest group's
  padded tokens (32 rows x 40 positions = 1280), so that group is one micro-batch and a
  group of n runs as n/32 micro-batches of the same size, whose gradients accumulate
  into one update;
- **whole**: a cap larger than the batch, so the whole group is one micro-batch.

Output: a table (stdout), then the last line

    bench_group_memory: peak_mb_32=<a> peak_mb_128=<b> peak_mb_512=<c> ratio_512_to_32=<r>

for the micro-batched setting (`--sizes` other than 32 128 512 name theirs), the whole
batch's on the line before it. Needs Linux (/proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
WHOLE_CAP = 1 << 30


def build_model(path: Path, vocab: int, hidden: int, layers: int, positions: int) -> None:
    """A Qwen2 from config (random weights) with the built-in character tokenizer, saved as
    an HF folder; the vocabulary is padded beyond the tokenizer's to `vocab`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.tiny_model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32,
                         num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def synthetic_group(n: int, prompt_len: int, response_len: int, vocab: int, seed: int, group_id: str):
    """One finished group of n samples: random ids (pad excluded), 0/1 rewards, version 0."""
    import random

    from buffer.types import FinishReason, Group, Trajectory

    rng = random.Random(seed)
    prompt = [rng.randrange(2, vocab) for _ in range(prompt_len)]
    trajs = []
    for i in range(n):
        response = [rng.randrange(2, vocab) for _ in range(response_len)]
        trajs.append(Trajectory(prompt_id="p", group_id=group_id, prompt_ids=prompt, response_ids=response,
                                behaviour_logprobs=[-rng.uniform(0.5, 3.0) for _ in response],
                                versions=[0] * response_len, loss_mask=[1] * response_len,
                                reward=float(rng.random() < 0.5), finish_reason=FinishReason.STOP))
    return Group(group_id=group_id, prompt_id="p", prompt_text="", row={}, trajectories=trajs)


def measure(args: argparse.Namespace) -> dict:
    """In this (fresh) process: a warm-up step, then the measured step's peak extra RSS."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: freed tensors leave the RSS

    def status(key: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    from algorithms import AlgorithmConfig
    from trainer.policy_trainer import Trainer, TrainerConfig

    cfg = TrainerConfig(cpu_cores=None, num_threads=1, batch_groups=1, max_tokens_per_micro_batch=args.child_cap,
                        logits_chunk_tokens=args.logits_chunk)
    trainer = Trainer(args.model, cfg, AlgorithmConfig())
    trainer.setup()
    trainer.train_step([synthetic_group(8, args.prompt_len, args.response_len, args.vocab, 1, "warm")])
    group = synthetic_group(args.child_n, args.prompt_len, args.response_len, args.vocab, 2, "measured")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS:")
    start = time.perf_counter()
    metrics = trainer.train_step([group])
    seconds = time.perf_counter() - start
    return {"n": args.child_n, "cap": args.child_cap, "peak_mb": (status("VmHWM:") - base) / 2**20,
            "base_mb": base / 2**20, "micro_batches": metrics["train/micro_batches"], "step_s": seconds,
            "loss_finite": metrics["train/loss"] == metrics["train/loss"]}


def run_child(args: argparse.Namespace, n: int, cap: int) -> dict:
    cmd = [sys.executable, __file__, "--child-n", str(n), "--child-cap", str(cap), "--model", str(args.model),
           "--vocab", str(args.vocab), "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len),
           "--logits-chunk", str(args.logits_chunk)]
    # a clean torch.distributed environment: each child is its own one-rank group
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"n={n} cap={cap} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary_line(prefix: str, results: dict[int, dict]) -> str:
    sizes = sorted(results)
    parts = [f"peak_mb_{n}={results[n]['peak_mb']:.1f}" for n in sizes]
    ratio = results[sizes[-1]]["peak_mb"] / max(results[sizes[0]]["peak_mb"], 1e-9)
    return f"{prefix}: " + " ".join(parts) + f" ratio_{sizes[-1]}_to_{sizes[0]}={ratio:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[32, 128, 512], help="group sizes n")
    ap.add_argument("--cap", type=int, default=None,
                    help="trainer.max_tokens_per_micro_batch of the micro setting "
                         "(default: the smallest group's padded tokens)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--logits-chunk", type=int, default=256, help="trainer.logits_chunk_tokens")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-batch comparison")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    ap.add_argument("--model", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-cap", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_n is not None:
        print(json.dumps(measure(args)))
        return
    if args.cap is None:
        args.cap = min(args.sizes) * (args.prompt_len + args.response_len)
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("bench_group_memory needs Linux /proc/self/clear_refs to reset the peak resident set")
    with tempfile.TemporaryDirectory(prefix="grove-bench-group-memory-") as tmp:
        args.model = Path(tmp) / "model"
        build_model(args.model, args.vocab, args.hidden, args.layers, args.prompt_len + args.response_len + 8)
        settings = [("micro", args.cap)] + ([] if args.no_whole else [("whole", WHOLE_CAP)])
        results: dict[str, dict[int, dict]] = {name: {} for name, _ in settings}
        for n in args.sizes:
            for name, cap in settings:
                r = run_child(args, n, cap)
                results[name][n] = r
                print(f"  n={n:4d} {name:5s} peak {r['peak_mb']:8.1f} MiB  micro-batches {r['micro_batches']:3.0f}  "
                      f"step {r['step_s']:6.2f} s", file=sys.stderr, flush=True)
    print(f"model: Qwen2 {args.layers} layers x {args.hidden}, vocab {args.vocab}; rows of {args.prompt_len} prompt + "
          f"{args.response_len} response tokens; micro cap {args.cap} padded tokens; logits chunk {args.logits_chunk}")
    print("| n | setting | micro-batches | peak extra RSS (MiB) | step (s) |")
    print("|---:|---|---:|---:|---:|")
    for n in args.sizes:
        for name, _ in settings:
            r = results[name][n]
            print(f"| {n} | {name} | {r['micro_batches']:.0f} | {r['peak_mb']:.1f} | {r['step_s']:.2f} |")
    if "whole" in results:
        print(summary_line("whole_batch", results["whole"]))
    print(summary_line("bench_group_memory", results["micro"]))


if __name__ == "__main__":
    main()
