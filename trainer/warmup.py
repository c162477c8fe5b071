"""Make (or reuse) the built-in default policy: a tiny Qwen2, briefly supervised.

A randomly initialised model never earns a reward, so RL has nothing to work with. A
short supervised warm-up on the task's answers (or a row's `warmup_target`, the
step-by-step response of `task=arithmetic_steps`) stops as soon as greedy accuracy on a
slice of prompts kept out of the warm-up reaches `target_accuracy`: far enough for RL
to have signal, short of what RL can add. The result is cached in a folder keyed by
everything that shaped it, and written atomically, so later runs start in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.tiny_model import TinyModelSpec, build_char_tokenizer, build_tiny_model, save_model_folder

CACHE_FORMAT = "grove-tiny-v1"  # bump when the code below changes what it produces


@dataclass
class WarmupConfig:
    target_accuracy: float = 0.2
    max_steps: int = 4000
    batch_size: int = 128
    lr: float = 1e-3
    eval_every: int = 50
    eval_rows: int = 200
    seed: int = 0


def default_cache_dir() -> Path:
    root = os.environ.get("GROVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "grove"
    )
    return Path(root)


def cache_key(spec: TinyModelSpec, warmup: WarmupConfig, task_fingerprint: str) -> str:
    blob = json.dumps(
        [CACHE_FORMAT, dataclasses.asdict(spec), dataclasses.asdict(warmup), task_fingerprint],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sft_target(row: dict) -> str:
    """What the warm-up teaches the model to write for a row: its ``warmup_target`` if it has
    one (``task=arithmetic_steps``: the steps and the final answer), else its ``answer``."""
    return str(row["warmup_target"]) if "warmup_target" in row else str(row["answer"])


def is_correct(response: str, row: dict) -> bool:
    """Whether a greedy answer counts as right, as the task's default reward judges it: the
    final answer after the last ``#`` for rows with a ``warmup_target`` (``steps_answer``),
    else the whole response, stripped (``exact_match``)."""
    if "warmup_target" in row:
        from rewards.builtin import steps_answer

        return steps_answer(response, answer=row["answer"]).score >= 1.0
    return response.strip() == str(row["answer"])


def _encode_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [
        (tokenizer.encode(r["prompt"]), tokenizer.encode(sft_target(r)) + [tokenizer.eos_token_id])
        for r in rows
    ]


def eval_max_new_tokens(rows: list[dict]) -> int:
    """8 for plain answers (as ever); step-by-step targets get their longest length + 8."""
    if not any("warmup_target" in r for r in rows):
        return 8
    return max(len(sft_target(r)) for r in rows) + 8


def _sft_batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded inputs, attention mask, and labels that only score the answer tokens."""
    length = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        attention[i, : len(p) + len(a)] = 1
    return ids, attention, labels


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 8) -> float:
    """Accuracy of greedy answers (transformers' generate, left padding), judged by :func:`is_correct`."""
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train()
    return sum(is_correct(a, r) for a, r in zip(answers, rows)) / len(rows)


def warm_up(model, tokenizer, rows: list[dict], cfg: WarmupConfig, log=print, progress=None) -> dict:
    """`progress(step, max_steps, accuracy)`, if given, after every step, and `(steps, steps,
    accuracy)` once at the end (a progress bar's total shrinks to where the warm-up stopped)."""
    torch.manual_seed(cfg.seed)
    check_rows, train_rows = rows[: cfg.eval_rows], rows[cfg.eval_rows :]
    examples = _encode_examples(tokenizer, train_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    max_new_tokens = eval_max_new_tokens(check_rows)
    accuracy, step, start = 0.0, 0, time.perf_counter()
    model.train()
    for step in range(1, cfg.max_steps + 1):
        pick = torch.randint(len(examples), (cfg.batch_size,), generator=generator).tolist()
        ids, attention, labels = _sft_batch([examples[i] for i in pick], tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % cfg.eval_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, check_rows, max_new_tokens)
            log(f"warm-up step {step}: loss={loss.item():.3f} accuracy={accuracy:.3f}")
            if accuracy >= cfg.target_accuracy:
                break
        if progress is not None:
            progress(step, cfg.max_steps, accuracy)
    if progress is not None:
        progress(step, step, accuracy)
    return {"steps": step, "accuracy": accuracy, "seconds": time.perf_counter() - start}


def ensure_default_model(spec: TinyModelSpec, warmup: WarmupConfig, train_rows: list[dict],
                         task_fingerprint: str, cache_dir: Path | None = None, log=print, progress=None) -> Path:
    """Path of the warmed-up default model, building it on first use. `progress`: as for
    `warm_up`; by default the `warmup_progress` method of `log`, if it has one (the run's console)."""
    cache_dir = cache_dir or default_cache_dir()
    final = cache_dir / "models" / cache_key(spec, warmup, task_fingerprint)
    if (final / "grove_warmup.json").exists():
        log(f"using cached default model {final}")
        return final
    log(f"building the default model in {final} (once; later runs reuse it)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(spec, tokenizer)
    report = warm_up(model, tokenizer, train_rows, warmup, log, progress or getattr(log, "warmup_progress", None))
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(model, tokenizer, tmp)
    (tmp / "grove_warmup.json").write_text(json.dumps(report, indent=2))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return final
