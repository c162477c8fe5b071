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


def test_only_the_weightless_layer_reload_warning_is_dropped():
    import logging

    from rollout.weight_sync import RELOAD_LOGGER, quiet_weightless_layer_warnings

    quiet_weightless_layer_warnings()
    quiet_weightless_layer_warnings()  # idempotent: one filter
    logger = logging.getLogger(RELOAD_LOGGER)
    assert sum(getattr(f, "grove", False) for f in logger.filters) == 1

    def passes(layer: str) -> bool:
        record = logger.makeRecord(RELOAD_LOGGER, logging.WARNING, __file__, 1, "%s: Failed to load weights",
                                   (layer,), None)
        return bool(logger.filter(record))

    assert not passes("RotaryEmbedding") and not passes("Llama3RotaryEmbedding")
    assert passes("QKVParallelLinear") and passes("VocabParallelEmbedding")  # a real failure still shows
