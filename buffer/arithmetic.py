"""The built-in synthetic tasks: integer arithmetic of mixed difficulty (`task=arithmetic`),
and multi-operation expressions answered step by step (`task=arithmetic_steps`, below).

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


def split_dataset(rows: list[dict], num_train: int) -> datasets.DatasetDict:
    """The first `num_train` rows as the train split, the rest as the held-out ("test") one."""
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:num_train]),
            "test": datasets.Dataset.from_list(rows[num_train:]),
        }
    )


def make_arithmetic_dataset(spec: ArithmeticSpec) -> datasets.DatasetDict:
    """Train and held-out ("test") splits as an HF dataset."""
    return split_dataset(generate_rows(spec), spec.num_train)


# --- arithmetic_steps: multi-operation expressions solved step by step -----------------------
#
# Rows look like ``{"prompt_id": "..", "prompt": "12+7*3-4=", "answer": "29",
# "warmup_target": "7*3=21;12+21=33;33-4=29;#29", "difficulty": 3}``. The response writes
# one step per operation, ``a<op>b=c`` separated by ``;``, then ``#`` and the final answer.
# Step order (deterministic): every multiplication first, left to right (a chain
# ``2*3*4`` is ``2*3=6`` then ``6*4=24``); then the additions and subtractions left to
# right over the resulting terms, with a running total on the left. So the right operand
# of a step is never negative, and since every intermediate result is kept in
# ``0..max_value`` (expressions that leave it are redrawn) no number in a row is negative.
# Difficulty is the number of operations, drawn uniformly from ``min_ops..max_ops``.


@dataclass(frozen=True)
class StepsSpec:
    """What `task=arithmetic_steps` generates; the seed makes it reproducible."""

    seed: int = 0
    num_train: int = 4000
    num_eval: int = 400
    ops: tuple[str, ...] = ("+", "-", "*")
    min_ops: int = 2
    max_ops: int = 6
    max_operand: int = 20  # operands of + and -: 1..max_operand
    max_operand_mul: int = 9  # operands next to a *: 2..max_operand_mul
    max_value: int = 999  # every intermediate result and the answer lie in 0..max_value


def solve_steps(operands: list[int], ops: list[str]) -> tuple[list[tuple[int, str, int, int]], int]:
    """The steps ``(a, op, b, a op b)`` in Grove's order (multiplications first, then left
    to right) and the value of ``operands[0] ops[0] operands[1] ...``.

    >>> solve_steps([12, 7, 3, 4], ["+", "*", "-"])
    ([(7, '*', 3, 21), (12, '+', 21, 33), (33, '-', 4, 29)], 29)
    """
    if len(operands) != len(ops) + 1:
        raise ValueError("an expression has one more operand than operators")
    steps: list[tuple[int, str, int, int]] = []
    terms, signs = [operands[0]], []
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            a = terms[-1]
            terms[-1] = a * b
            steps.append((a, "*", b, terms[-1]))
        else:
            signs.append(op)
            terms.append(b)
    total = terms[0]
    for op, b in zip(signs, terms[1:]):
        value = OPS[op](total, b)
        steps.append((total, op, b, value))
        total = value
    return steps, total


def format_steps(steps: list[tuple[int, str, int, int]], answer: int) -> str:
    """``7*3=21;12+21=33;33-4=29;#29``: the response the model is warmed up to write."""
    return "".join(f"{a}{op}{b}={c};" for a, op, b, c in steps) + f"#{answer}"


def format_expression(operands: list[int], ops: list[str]) -> str:
    return "".join(f"{x}{op}" for x, op in zip(operands, ops)) + f"{operands[-1]}="


def _draw_expression(rng: random.Random, spec: StepsSpec, num_ops: int):
    """One expression of ``num_ops`` operations whose every step stays in 0..max_value."""
    for _ in range(1000):
        ops = [rng.choice(spec.ops) for _ in range(num_ops)]
        operands = []
        for i in range(num_ops + 1):
            next_to_mul = (i > 0 and ops[i - 1] == "*") or (i < num_ops and ops[i] == "*")
            operands.append(rng.randint(2, spec.max_operand_mul) if next_to_mul else rng.randint(1, spec.max_operand))
        steps, answer = solve_steps(operands, ops)
        if all(0 <= c <= spec.max_value for *_, c in steps):
            return operands, ops, steps, answer
    raise ValueError(
        f"cannot draw a {num_ops}-operation expression from ops={spec.ops} whose results stay in "
        f"0..{spec.max_value}; raise task.max_value or lower task.max_ops"
    )


def generate_steps_rows(spec: StepsSpec) -> list[dict]:
    """Unique expressions, drawn uniformly over the number of operations."""
    unknown = set(spec.ops) - set(OPS)
    if unknown:
        raise ValueError(f"task.ops has unknown operators {sorted(unknown)}; allowed: {sorted(OPS)}")
    if not spec.ops:
        raise ValueError("task.ops is empty")
    if not 1 <= spec.min_ops <= spec.max_ops:
        raise ValueError(f"task.min_ops={spec.min_ops} and task.max_ops={spec.max_ops} need 1 <= min_ops <= max_ops")
    if spec.max_operand < 1 or spec.max_operand_mul < 2:
        raise ValueError(f"task.max_operand={spec.max_operand} must be >= 1 and "
                         f"task.max_operand_mul={spec.max_operand_mul} >= 2")
    rng = random.Random(spec.seed)
    total = spec.num_train + spec.num_eval
    seen: set[str] = set()
    rows: list[dict] = []
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50 * total:
            raise ValueError(f"cannot draw {total} unique expressions from this task spec; "
                             "lower task.num_train/num_eval or widen the operands")
        num_ops = rng.randint(spec.min_ops, spec.max_ops)
        operands, ops, steps, answer = _draw_expression(rng, spec, num_ops)
        prompt = format_expression(operands, ops)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append(
            {
                "prompt_id": _prompt_id(prompt),
                "prompt": prompt,
                "answer": str(answer),
                "warmup_target": format_steps(steps, answer),
                "difficulty": num_ops,
            }
        )
    rng.shuffle(rows)
    return rows


def make_steps_dataset(spec: StepsSpec) -> datasets.DatasetDict:
    """Train and held-out ("test") splits as an HF dataset."""
    return split_dataset(generate_steps_rows(spec), spec.num_train)
