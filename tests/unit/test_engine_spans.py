"""vLLM's weight-version spans become per-token version stamps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rollout.engine import span_versions


@dataclass
class Span:  # the fields of vllm.outputs.WeightVersionSpan
    version: str
    start: int
    end: int


def test_spans_expand_to_one_version_per_token():
    assert span_versions([Span("3", 0, 2), Span("4", 2, 5)]) == [3, 3, 4, 4, 4]
    assert span_versions([Span("0", 0, 0)]) == []


def test_no_spans_means_unknown_not_empty():
    assert span_versions(None) is None


def test_a_label_that_is_not_a_grove_version_is_an_error():
    with pytest.raises(RuntimeError, match="'default'"):
        span_versions([Span("default", 0, 3)])


def test_executor_names_map_to_vllm_backends():
    from rollout.engine import EngineConfig, executor_backend

    assert executor_backend(EngineConfig(executor="mp")) == "mp"
    assert executor_backend(EngineConfig(executor="ray")) == "ray"
    # without its own engine-core process, vLLM's own "uni" is already in-process
    assert executor_backend(EngineConfig(executor="uniproc", multiprocess=False)) == "uni"
