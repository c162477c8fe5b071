"""A thin wrapper over vLLM's AsyncLLM: generate one sample, swap weights, pause and resume.

Grove asks a few things of an inference engine: start, generate one response with the
logprob of each sampled token, abort a request (keeping what it generated), pause and resume with
requests kept in place, apply new weights without a restart, and stop. Everything else
(groups, admission, rewards) lives in `rollout.worker`. A GPU user gets the same class;
only the engine arguments differ.

The engine labels its weights with Grove's policy version (`aload_weights(..., version)`),
and vLLM reports, for each finished request, which label sampled which output tokens.
Those spans are the per-token version stamps: exact even when a request runs across a
weight update.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from buffer.types import FinishReason


EXECUTORS = ("uniproc", "mp", "ray")
WEIGHT_LOADERS = ("live", "inplace", "reload")


@dataclass
class EngineConfig:
    """vLLM engine arguments Grove sets; see shared/reference/platform-vllm-cpu.md. What
    differs between a CPU box and GPUs (core pinning, dtype, eager mode) is set by the
    platform profile (`configs/cluster/`), not here."""

    kv_cache_mb: int = 64  # always explicit: vLLM-CPU otherwise reserves most of RAM
    max_model_len: int = 64
    block_size: int = 32  # prefix caching reuses whole blocks only
    enforce_eager: bool = False  # false: vLLM compiles the model (on CPU "live" weights then load as "inplace")
    multiprocess: bool = True  # engine core in its own process: slower start, faster steps
    # Where the model runs: "uniproc" inside the engine-core process; "mp" in a worker
    # process of its own (needed for tensor_parallel_size > 1); "ray". With one core for
    # the whole engine, mp's scheduler and worker would spin-wait on each other through
    # shared memory every step.
    executor: str = "uniproc"
    cpu_cores: Optional[str] = None  # VLLM_CPU_OMP_THREADS_BIND; null = vLLM's default (no pinning)
    dtype: str = "auto"
    enable_prefix_caching: bool = True
    seed: int = 0
    # How a weight update reaches the model (rollout/weight_sync.py): "live" writes into
    # weights kept as plain tensors (on CPU, multiplied by torch's GEMM instead of vLLM's
    # kernels packed at load time), "inplace" loads and repacks, "reload" is vLLM's
    # reload_weights, for any model. live and inplace cover unquantized dense models and
    # fall back to reload for others. docs/benchmarks.md has their costs.
    weight_loader: str = "live"
    extra_args: dict = field(default_factory=dict)  # any other AsyncEngineArgs field

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"rollout.engine.executor={self.executor!r} is not one of {list(EXECUTORS)}")
        if self.weight_loader not in WEIGHT_LOADERS:
            raise ValueError(f"rollout.engine.weight_loader={self.weight_loader!r} is not one of {list(WEIGHT_LOADERS)}")
        if self.executor == "uniproc" and int(self.extra_args.get("tensor_parallel_size", 1)) > 1:
            raise ValueError("rollout.engine.executor=uniproc runs one model replica in the engine-core process; "
                             "tensor_parallel_size > 1 needs rollout.engine.executor=mp (or ray)")


@dataclass
class Segment:
    """What one engine request generated, handed over once it ends (finished or aborted)."""

    token_ids: list[int]
    logprobs: list[float]  # the sampling logprob of each token
    finish_reason: FinishReason
    # The policy version that sampled each token, from vLLM's weight-version spans (None
    # if the engine reported none). A request paused across an update spans two versions.
    versions: list[int] | None = None
    # With top_logprobs=k: per position, the k most likely tokens and their logprobs under
    # the distribution that was sampled, most likely first (tree branching reads them).
    top: list[list[tuple[int, float]]] | None = None
    cached_prompt_tokens: int = 0  # prompt tokens the engine's prefix cache already held
    prompt_tokens: int = 0


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    """Environment the engine needs; set before vLLM is imported (the launcher passes it
    to the rollout actor's runtime_env)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, cfg.kv_cache_mb // 1024))}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocess else "0"
    if cfg.cpu_cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cfg.cpu_cores)
    return env


def executor_backend(cfg: EngineConfig):
    """vLLM's distributed_executor_backend for `cfg.executor`.

    vLLM-CPU rewrites the string "uni" to "mp" whenever the engine core has its own
    process, so the in-core executor is passed as a class, which vLLM takes as given."""
    if cfg.executor != "uniproc":
        return cfg.executor
    if not cfg.multiprocess:
        return "uni"
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    return UniProcExecutor


_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORTED}


def span_versions(spans) -> list[int] | None:
    """Per-token versions from vLLM's WeightVersionSpan list (labels are Grove versions)."""
    if spans is None:
        return None
    versions: list[int] = []
    for span in spans:
        try:
            label = int(span.version)
        except ValueError:
            raise RuntimeError(f"engine weights are labelled {span.version!r}, not a Grove policy version; "
                               "label them with VLLMEngine.alabel") from None
        versions.extend([label] * (span.end - span.start))
    return versions


class VLLMEngine:
    """One AsyncLLM. Create and use it from a single running event loop."""

    def __init__(self, model_path: str, cfg: EngineConfig) -> None:
        self.model_path = model_path
        self.cfg = cfg
        self._engine = None
        self._request_counter = 0
        self._params_cache: dict[tuple, object] = {}
        self.live_from_start = False  # the model runs in LiveLoader's form from its first token (CPU, "live")

    async def astart(self) -> float:
        """Start the engine; returns seconds taken."""
        for key, value in engine_env(self.cfg).items():
            os.environ.setdefault(key, value)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        start = time.perf_counter()
        args = AsyncEngineArgs(
            model=self.model_path,
            dtype=self.cfg.dtype,
            enforce_eager=self.cfg.enforce_eager,
            kv_cache_memory_bytes=self.cfg.kv_cache_mb * 2**20,
            max_model_len=self.cfg.max_model_len,
            block_size=self.cfg.block_size,
            enable_prefix_caching=self.cfg.enable_prefix_caching,
            seed=self.cfg.seed,
            # The behaviour policy is the distribution actually sampled from.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="rollout.weight_sync.GroveWorkerExtension",
            disable_log_stats=True,  # Grove logs its own metrics; vLLM's per-token stats cost CPU on the rollout core
            **{"distributed_executor_backend": executor_backend(self.cfg), **self.cfg.extra_args},
        )
        self._engine = AsyncLLM.from_engine_args(args)
        await self.alabel(0)  # vLLM's default label is "default"; every token reports a Grove version
        if self.cfg.weight_loader == "live":  # the form the first update would switch to, from the first token on
            self.live_from_start = all(await self._engine.collective_rpc("grove_go_live", args=(self.model_path,)))
        return time.perf_counter() - start

    @property
    def started(self) -> bool:
        return self._engine is not None

    @property
    def engine(self):
        if self._engine is None:
            raise RuntimeError("VLLMEngine.astart() must be awaited before use")
        return self._engine

    def new_request_id(self, prefix: str = "req") -> str:
        self._request_counter += 1
        return f"{prefix}-{self._request_counter}"

    async def agenerate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        request_id: str | None = None,
        seed: int | None = None,
        min_tokens: int = 0,
        top_logprobs: int = 0,
        stop: tuple[str, ...] = (),
    ) -> Segment:
        """Sample one response and return it whole, with each token's sampling logprob.

        Outputs are asked for once, at the end (FINAL_ONLY): per-token streaming costs the
        rollout core an output object and a coroutine wake-up per request per decode step,
        and nothing in Grove reads tokens before a request ends. An aborted request still
        returns every token it generated."""
        from vllm.inputs import TokensPrompt

        params = self._sampling_params(max_tokens, min(min_tokens, max_tokens), temperature, top_p, seed,
                                       top_logprobs, tuple(stop))
        request_id = request_id or self.new_request_id()
        final = None
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
            final = out
        if final is None or not final.finished:
            raise RuntimeError(f"engine request {request_id} ended without a final output")
        sample = final.outputs[0]
        ids = list(sample.token_ids)
        flat = sample.logprobs
        if getattr(flat, "token_ids", None) == ids and len(flat.logprobs) == len(ids):
            logprobs = list(flat.logprobs)  # one entry per position: the sampled token's
        else:
            logprobs = [step[tok].logprob for tok, step in zip(ids, flat or [])]
        if len(logprobs) != len(ids):
            raise RuntimeError(f"vLLM returned {len(ids)} tokens but {len(logprobs)} logprobs")
        finish = _FINISH.get(sample.finish_reason) if sample.finish_reason else None
        top = None
        if top_logprobs:  # each position: the sampled token first, then the top k by rank
            top = [sorted(((t, lp.logprob) for t, lp in step.items() if lp.rank is not None and lp.rank <= top_logprobs),
                          key=lambda pair: -pair[1])[:top_logprobs] for step in flat]
        return Segment(ids, logprobs, finish or FinishReason.ABORTED, span_versions(sample.weight_versions), top,
                       final.num_cached_tokens or 0, len(prompt_ids))

    def _sampling_params(self, max_tokens: int, min_tokens: int, temperature: float, top_p: float,
                         seed: int | None, top_logprobs: int = 0, stop: tuple[str, ...] = ()):
        """One SamplingParams per distinct setting, shared by requests (vLLM copies it per
        request): building one validates every field, a cost paid per request otherwise."""
        key = (max_tokens, min_tokens, temperature, top_p, seed, top_logprobs, stop)
        params = self._params_cache.get(key)
        if params is None:
            from vllm import SamplingParams
            from vllm.sampling_params import RequestOutputKind

            params = SamplingParams(
                n=1,
                max_tokens=max_tokens,
                min_tokens=min_tokens,
                temperature=temperature,
                top_p=top_p,
                logprobs=top_logprobs,  # 0: the sampled token's only
                seed=seed,
                output_kind=RequestOutputKind.FINAL_ONLY,
                flat_logprobs=True,  # a few flat lists per request, not a dict and a Logprob object per token
                # rewards decode whole responses themselves; per-token text is wasted work,
                # except to find stop strings (a turn of a multi-turn episode ends at one)
                detokenize=bool(stop),
                stop=list(stop) or None,
                include_stop_str_in_output=bool(stop),  # the tokens and the text stay the same
            )
            if len(self._params_cache) >= 4096:  # per-request seeds would otherwise grow it without end
                self._params_cache.clear()
            self._params_cache[key] = params
        return params

    async def abort(self, request_ids: list[str]) -> None:
        await self.engine.abort(request_ids)

    async def aload_weights(self, payload: bytes, version: int | None = None) -> bool:
        """Load a safetensors blob into the live engine (no restart) and label it `version`.

        Call it while no request is generating: cached prefixes computed by the old weights
        are dropped too, so no later request reuses them (`aswap_weights` is the load for an
        engine with requests in flight). Returns False if the prefix cache could not be
        dropped because a request still held cache blocks."""
        await self.engine.collective_rpc("grove_load_weights", args=(payload, self.cfg.weight_loader))
        if version is not None:
            await self.alabel(version)
        if self.cfg.enable_prefix_caching:
            return bool(await self.engine.reset_prefix_cache())
        return True

    async def aswap_weights(self, payload: bytes, version: int, paused: bool = False,
                            on_sent: Callable[[], None] | None = None) -> float | None:
        """Load `payload` under requests in flight (they go on over their cached context, on
        the new weights) and label it `version`, with no step between the load and the label,
        so every token's label names the weights that sampled it. Ends with the engine
        running, also when it was `paused` before and also when the load fails.

        `on_sent` is called once the load's messages are on their way to the engine core,
        which handles its input in order: a request sent after that call runs on the new
        weights only, without waiting for the load to be acknowledged.

        Returns `time.perf_counter()` from when the engine stopped for the swap, or None
        when it stopped only for the load's own work:

        - uniproc executor: the load and the label are one call, which the engine core runs
          between two steps; no pause and no drain, only the load's own work;
        - other executors: pause (requests kept in place), load, label, sent back to back,
          not each after the other's reply (the engine core handles its input in order and
          schedules nothing while paused), then resume once the pause is acknowledged (vLLM
          finishes a pause only when the engine has gone idle, which it would not once resumed).
        """
        core = self.engine.engine_core
        loader = self.cfg.weight_loader
        paused_at: list[float] = []

        async def pause() -> None:
            await core.pause_scheduler_async(mode="keep", clear_cache=False)
            paused_at.append(time.perf_counter())

        # gather wraps each in a task, started in this order; each sends its message before
        # its first wait, and the socket keeps the order.
        if self.cfg.executor == "uniproc":
            calls = [core.collective_rpc_async("grove_swap_weights", None, (payload, loader, str(version)), None)]
        else:
            calls = [pause(), core.collective_rpc_async("grove_load_weights", None, (payload, loader), None),
                     core.set_weight_version_async(str(version))]
        swap = asyncio.gather(*calls, return_exceptions=True)
        if on_sent is not None:
            # gather's tasks run their first steps before this task resumes, in order, and
            # each sends its message in its first step (before its first wait, for a reply)
            await asyncio.sleep(0)
            on_sent()
        results = await swap
        if paused_at or paused:
            await core.resume_scheduler_async()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return paused_at[0] if paused_at else None

    async def alabel(self, version: int) -> None:
        """Label the weights in use; finished requests report the label per output token."""
        await self.engine.update_weight_version(str(version))

    async def apause(self) -> None:
        """Stop scheduling, keeping every request and its KV cache in place.

        This is AsyncLLM.pause_generation(mode="keep") without its fixed 20 ms sleep, which
        only lets last outputs reach their streams before it returns ("not required for
        correctness", vLLM says): the engine's weight labels already attribute every token."""
        await self.engine.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)

    async def aresume(self) -> None:
        await self.engine.resume_generation()

    async def aweights_digest(self) -> str:
        return (await self.engine.collective_rpc("grove_weights_digest"))[0]

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
