"""The built-in synthetic task: integer arithmetic of mixed difficulty.

Rows look like ``{"prompt_id": "a3f..", "prompt": "47+8=", "answer": "55", "op": "+",
"difficulty": 2}``. Difficulty is the number of digits of the larger operand, so a
run can report accuracy per level and adaptive samplers have a label to check against.
The train and held-out splits never share a prompt.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import datasets

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticSpec:
    """What to generate; the seed makes it reproducible."""

    seed: int = 0
    num_train: int = 4000
    num_eval: int = 400
    ops: tuple[str, ...] = ("+", "-", "*")
    max_digits: int = 2  # difficulty levels 1..max_digits
    # Per-op cap: multi-digit products are far beyond the tiny default model.
    max_digits_mul: int = 1


def format_prompt(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def _operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:12]


def generate_rows(spec: ArithmeticSpec) -> list[dict]:
    """Unique problems, drawn uniformly over (op, difficulty) cells."""
    unknown = set(spec.ops) - set(OPS)
    if unknown:
        raise ValueError(f"task.ops has unknown operators {sorted(unknown)}; allowed: {sorted(OPS)}")
    rng = random.Random(spec.seed)
    cells = [
        (op, d)
        for op in spec.ops
        for d in range(1, (spec.max_digits_mul if op == "*" else spec.max_digits) + 1)
    ]
    total = spec.num_train + spec.num_eval
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50 * total:
            raise ValueError(
                f"cannot draw {total} unique arithmetic problems from ops={spec.ops} "
                f"max_digits={spec.max_digits}; lower task.num_train/num_eval"
            )
        op, digits = rng.choice(cells)  # 1-digit cells run out of unique problems early
        a = _operand(rng, digits)
        b = _operand(rng, rng.randint(1, digits))
        if rng.random() < 0.5:
            a, b = b, a
        prompt = format_prompt(a, op, b)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(
            {
                "prompt_id": _prompt_id(prompt),
                "prompt": prompt,
                "answer": str(OPS[op](a, b)),
                "op": op,
                "difficulty": max(len(str(a)), len(str(b))),
            }
        )
    rng.shuffle(rows)
    return rows


def make_arithmetic_dataset(spec: ArithmeticSpec) -> datasets.DatasetDict:
    """Train and held-out ("test") splits as an HF dataset."""
    rows = generate_rows(spec)
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[: spec.num_train]),
            "test": datasets.Dataset.from_list(rows[spec.num_train :]),
        }
    )
