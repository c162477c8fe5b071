"""Prompt datasets: the built-in arithmetic tasks or the user's json/jsonl/parquet files."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import datasets

from buffer.arithmetic import ArithmeticSpec, StepsSpec, make_arithmetic_dataset, make_steps_dataset
from buffer.prompts import check_rows


@dataclass
class PromptData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprint: str  # identifies the content, for cache keys and logs


def _fingerprint(rows: list[dict[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _prompt_data(ds) -> PromptData:
    train, evaluation = ds["train"].to_list(), ds["test"].to_list()
    return PromptData(train, evaluation, _fingerprint(train))


def arithmetic_data(spec: ArithmeticSpec) -> PromptData:
    return _prompt_data(make_arithmetic_dataset(spec))


def arithmetic_steps_data(spec: StepsSpec) -> PromptData:
    return _prompt_data(make_steps_dataset(spec))


def _format_of(path: str) -> str:
    for suffix, fmt in ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json")):
        if path.endswith(suffix):
            return fmt
    raise ValueError(f"cannot tell the format of {path!r}: use .json, .jsonl or .parquet")


def file_data(train_files: str, eval_files: str, prompt_key: str = "prompt") -> PromptData:
    """Load the user's rows with HF datasets and check each one before any engine starts."""
    splits = {}
    for split, path in (("train", train_files), ("eval", eval_files)):
        try:
            ds = datasets.load_dataset(_format_of(path), data_files=path, split="train")
        except FileNotFoundError as err:
            raise ValueError(f"task.{split}_files={path!r}: no such file") from err
        rows = ds.to_list()
        check_rows(rows, split, prompt_key)
        splits[split] = rows
    return PromptData(splits["train"], splits["eval"], _fingerprint(splits["train"]))
