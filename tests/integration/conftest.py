"""Shared real engines for the integration tests: one vLLM engine and one DeepSpeed
trainer per test session (each costs seconds to start and ~1.5 GB)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from algorithms import AlgorithmConfig
from buffer.arithmetic import ArithmeticSpec
from buffer.datasets import arithmetic_data
from rollout.engine import EngineConfig, VLLMEngine
from trainer.tiny_model import TinyModelSpec
from trainer.warmup import WarmupConfig, ensure_default_model


class LoopThread:
    """An event loop on a background thread: AsyncLLM must live on one running loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def task_data():
    return arithmetic_data(ArithmeticSpec())


@pytest.fixture(scope="session")
def model_path(task_data):
    """The built-in default model, as `grove train` builds it (cached across runs)."""
    return str(ensure_default_model(TinyModelSpec(), WarmupConfig(), task_data.train, task_data.fingerprint))


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


def cpu_engine_config(**overrides) -> EngineConfig:
    """The engine as the cpu_local profile sets it up, without pinning to a core."""
    return EngineConfig(**{"cpu_cores": None, "dtype": "float32", "enforce_eager": True, **overrides})


@pytest.fixture(scope="session")
def engine(model_path, loop_thread):
    eng = VLLMEngine(model_path, cpu_engine_config())
    loop_thread.run(eng.astart())
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def trainer(model_path):
    from trainer.policy_trainer import Trainer, TrainerConfig

    tr = Trainer(model_path, TrainerConfig(cpu_cores=None, num_threads=2, lr=1e-3), AlgorithmConfig())
    tr.setup()
    return tr
