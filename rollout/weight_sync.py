"""The receiving side of weight sync, run where vLLM runs the model.

vLLM loads this class into its model worker (`worker_extension_cls`): inside the
engine-core process with `rollout.engine.executor=uniproc`, in a worker process of its own
with `mp`. `engine.collective_rpc("grove_swap_weights", args=(payload, loader, version))`
calls it there. The payload is a safetensors blob: tensors passed through collective_rpc
across a process boundary arrive as plain lists, but bytes arrive intact. On CPU, vLLM's
linear layers run from oneDNN handles packed at load time, and their parameters are
emptied, so writing parameters does nothing by itself: `InPlaceLoader` repacks after
loading, `LiveLoader` turns the layers into plain ones that multiply by their parameters
(with `weight_loader=live` the engine does that at start-up, `grove_go_live`).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time

# Layers whose only tensors are buffers computed from the config, never in a checkpoint:
# vLLM's reload warns "<layer>: Failed to load weights" for them at every load.
WEIGHTLESS_LAYERS = ("RotaryEmbedding",)
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def is_weightless_layer_warning(record: logging.LogRecord) -> bool:
    """True for the reload warning about a layer that has no weights to load (its
    computed buffers are put back as they were); any other layer's warning stays."""
    return (record.msg == "%s: Failed to load weights" and bool(record.args)
            and str(record.args[0]).endswith(WEIGHTLESS_LAYERS))


def quiet_weightless_layer_warnings() -> None:
    """Drop those warnings (one per weight update, so hundreds per run) in this process."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(getattr(f, "grove", False) for f in logger.filters):
        class _Filter(logging.Filter):
            grove = True

            def filter(self, record: logging.LogRecord) -> bool:
                return not is_weightless_layer_warning(record)

        logger.addFilter(_Filter())


def original_loader(loader):
    """A weight loader without the deferring wrappers an earlier `reload_weights` left on
    vLLM's recorded metadata (they would buffer the load instead of doing it)."""
    while getattr(loader, "__name__", "") == "online_process_loader" and hasattr(loader, "__wrapped__"):
        loader = loader.__wrapped__
    return loader


def quantized_layers(model) -> list:
    """The layers with a quantization method (unquantized ones count: vLLM gives every
    linear and embedding layer one); these are the layers a load must post-process."""
    return [m for m in model.modules() if getattr(m, "quant_method", None) is not None]


class InPlaceLoader:
    """Checkpoint-format weights into the live model, without vLLM's layerwise reload.

    `reload_weights` handles any layer (quantized, MoE, padded), at the price of much
    Python bookkeeping per load; Grove loads after every optimizer step, while the rollout
    waits. For unquantized dense layers a load is just
    the model's own `load_weights` (which fuses q/k/v and gate/up) followed by each
    layer's `process_weights_after_loading` (on CPU: repacking into oneDNN handles).
    CPU linear layers keep only the packed handle, so each gets a full-size staging
    tensor for the load, built from the metadata vLLM recorded at start-up, with its loader.
    `supports` says whether a model qualifies; anything else goes through `reload_weights`.
    """

    METHODS = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")

    def __init__(self, model) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        self.model = model
        self.layers = quantized_layers(model)
        # (layer, parameter name, vLLM's recorded meta tensor, device) for every parameter
        self.recorded: list[tuple[object, str, object, object]] = []
        for layer in self.layers:
            info = LAYERWISE_INFO[layer]
            for name, meta in info.restore_metadata[0].items():
                self.recorded.append((layer, name, meta, info.restore_device))
        self.expected = {name for name, _ in model.named_parameters()}  # emptied weights keep their names

    @classmethod
    def supports(cls, model) -> bool:
        """Only unquantized dense layers, each with the metadata vLLM records at load time
        (without it an emptied CPU weight has no shape to rebuild)."""
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        layers = quantized_layers(model)
        return (bool(layers) and hasattr(model, "load_weights")
                and all(type(m.quant_method).__name__ in cls.METHODS and m in LAYERWISE_INFO for m in layers))

    def _stage(self) -> None:
        """Full-size tensors for the loaders to write into, for every parameter whose live
        form differs from the checkpoint's (emptied CPU linear weights), allocated per load:
        after the repack they are dropped, so no second copy of the weights stays between loads."""
        from vllm.model_executor.model_loader.reload.meta import materialize_meta_tensor
        from vllm.model_executor.model_loader.reload.sanitize import restore_layer_refs

        for layer, name, meta, device in self.recorded:
            live = getattr(layer, name, None)
            if live is not None and tuple(live.shape) == tuple(meta.shape):
                continue
            with device:  # a copy: vLLM's record stays as it is
                full = restore_layer_refs(materialize_meta_tensor(meta), layer)
            if hasattr(full, "weight_loader"):
                full.weight_loader = original_loader(full.weight_loader)
            delattr(layer, name)
            layer.register_parameter(name, full)

    def _load_all(self, buckets, complete: bool) -> int:
        """Load the buckets one after another (one in memory at a time); with `complete`,
        every parameter must have come (a delta sync sends the changed buckets only)."""
        loaded: set[str] = set()
        for weights in buckets:
            loaded |= set(self.model.load_weights(iter(weights)))
        missing = self.expected - loaded if complete else set()
        if missing:
            raise ValueError(f"weight update left {len(missing)} parameters of the rollout model unloaded "
                             f"(first: {sorted(missing)[:3]}); the payload must hold every checkpoint tensor. "
                             "The engine now mixes old and new weights: stop this run")
        return len(loaded)

    def load(self, weights) -> int:
        return self.load_buckets([weights])

    def load_buckets(self, buckets, complete: bool = True) -> int:
        self._stage()
        count = self._load_all(buckets, complete)
        for layer in self.layers:
            layer.quant_method.process_weights_after_loading(layer)
        return count


class LiveLoader(InPlaceLoader):
    """On CPU: linear layers multiply by their weights as plain tensors, through torch's
    GEMM, instead of through kernels packed from them at load time; a load writes into
    those tensors in place. No staging and no repack, so an update holds the engine for
    less time than `InPlaceLoader`'s. vLLM's packed CPU kernels pay off for larger projections than the built-in model has,
    so a large model on CPU may decode faster with "inplace". The first load turns the
    model's packed layers back into plain ones (staging as InPlaceLoader does); elsewhere
    than on CPU layers are never packed and this is InPlaceLoader."""

    live = False  # the layers multiply by their plain weights (set by the first load on CPU)

    def load_buckets(self, buckets, complete: bool = True) -> int:
        import torch
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return super().load_buckets(buckets, complete)
        self._stage()  # only if the layers are packed (start-up, or another loader since)
        count = self._load_all(buckets, complete)
        for layer in self.layers:
            layer.cpu_linear = torch.nn.functional.linear  # what vLLM's CPU GEMM dispatch calls
        self.live = True
        return count

    def pack(self) -> None:
        """Back to the packed form vLLM left the model in, which its reload_weights expects."""
        if self.live:
            for layer in self.layers:
                layer.quant_method.process_weights_after_loading(layer)
            self.live = False


def engine_core_running_this_call():
    """The vLLM EngineCore whose `collective_rpc` is running this call, or None.

    With the uniproc executor the model runs in the engine core's own thread, which runs a
    collective_rpc between two engine steps; the core is then a caller up this thread's stack.
    With the mp or ray executor the model runs in another process and there is none."""
    from vllm.v1.engine.core import EngineCore

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, EngineCore):
            return candidate
        frame = frame.f_back
    return None


DIRECT_LOADERS = {"inplace": InPlaceLoader, "live": LiveLoader}


class GroveWorkerExtension:
    def grove_swap_weights(self, payload: bytes, loader: str, version: str) -> int:
        """Load a blob and label the engine's weights `version` in the same call, so no engine
        step runs between the two: tokens sampled before it report the old label, tokens
        after it the new one, with no pause of the engine around the load. Needs the model
        in the engine-core process (the uniproc executor)."""
        core = engine_core_running_this_call()
        if core is None:
            raise RuntimeError("grove_swap_weights needs the model in the engine-core process "
                               "(rollout.engine.executor=uniproc); other executors pause, load and label")
        start = time.perf_counter()
        count = self.grove_load_weights(payload, loader)
        core.set_weight_version(version)
        # the engine core runs no step during this call: it is the generation stall of the swap
        self._grove_stalls = [*getattr(self, "_grove_stalls", [])[-999:], time.perf_counter() - start]
        return count

    def grove_take_stalls(self) -> list[float]:
        """Seconds each `grove_swap_weights` since the last call held the engine core (it
        generates nothing meanwhile; scripts/bench_weight_sync.py reads them)."""
        stalls, self._grove_stalls = getattr(self, "_grove_stalls", []), []
        return stalls

    def grove_load_weights(self, payload, loader: str = "live") -> int:
        """Load new weights by `loader`: "live" (LiveLoader) or "inplace" (InPlaceLoader)
        where the model qualifies, else, or for "reload", vLLM's reload_weights, which
        handles any model. `payload` is a safetensors blob (object_store), or a broadcast
        ticket: the buckets it names arrive now over the weight group, one at a time."""
        if isinstance(payload, dict):
            buckets, complete = self._grove_received(payload), payload["complete"]
        else:
            from safetensors.torch import load

            buckets, complete = [list(load(payload).items())], True
        if loader in DIRECT_LOADERS:
            direct = self._grove_direct_loader(loader)
            if direct is not None:
                return direct.load_buckets(buckets, complete)
        elif loader != "reload":
            raise ValueError(f"unknown weight loader {loader!r}; expected one of {[*DIRECT_LOADERS, 'reload']}")
        else:
            cached = getattr(self, "_grove_direct", None)
            if cached is not None and isinstance(cached[2], LiveLoader):
                cached[2].pack()
        quiet_weightless_layer_warnings()
        state = [pair for bucket in buckets for pair in bucket]  # vLLM's reload takes them all at once
        self.model_runner.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=iter(state), is_checkpoint_format=True
        )
        return len(state)

    # -- the broadcast transport's receiving side -------------------------------------------
    def grove_join_group(self, address: str, port: int, rank: int, world: int, backend: str,
                         timeout_s: float) -> int:
        """Join the trainer's weight group (it returns once every member has joined)."""
        from rollout.broadcast import open_group

        self._grove_group = open_group(address, port, rank, world, backend, timeout_s)
        return rank

    def grove_set_plan(self, plan: list) -> int:
        from rollout.broadcast import plan_from_json

        self._grove_plan = plan_from_json(plan)
        return len(self._grove_plan)

    def _grove_received(self, ticket: dict):
        """The ticket's buckets as they arrive, on the model's device."""
        from rollout.broadcast import receive

        device = next(self.model_runner.get_model().parameters()).device  # type: ignore[attr-defined]
        return receive(self._grove_group, self._grove_plan, ticket["buckets"], device)

    def _grove_direct_loader(self, loader: str):
        """The model's InPlaceLoader or LiveLoader (kept across loads), or None if the
        model does not qualify for it. A model vLLM compiled (`enforce_eager=false`) gets an
        InPlaceLoader for "live": its compiled forward calls the packed CPU kernels it was
        traced with, and cannot call the plain GEMM LiveLoader would put in their place."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        cached = getattr(self, "_grove_direct", None)  # (model, loader name, its loader or None)
        if cached is None or cached[0] is not model or cached[1] != loader:
            kind = DIRECT_LOADERS[loader]
            if kind is LiveLoader and self._grove_compiled():
                kind = InPlaceLoader
            cached = (model, loader, kind(model) if kind.supports(model) else None)
            self._grove_direct = cached
        return cached[2]

    def _grove_compiled(self) -> bool:
        from vllm.config import CompilationMode

        mode = getattr(getattr(self.model_runner, "compilation_config", None), "mode", CompilationMode.NONE)
        return mode != CompilationMode.NONE

    def grove_go_live(self, model_path: str) -> bool:
        """On CPU, turn the layers vLLM packed at start-up into live ones now, with the
        checkpoint's own weights, instead of at the first update, so a run's first version
        decodes in the same form as every later one. False where there is nothing to do (not CPU, no safetensors, a model LiveLoader
        does not handle, a compiled model)."""
        from pathlib import Path

        from safetensors import safe_open
        from vllm.platforms import current_platform

        files = sorted(Path(model_path).glob("*.safetensors"))
        live = self._grove_direct_loader("live") if current_platform.is_cpu() and files else None
        if not isinstance(live, LiveLoader):
            return False

        def checkpoint():
            for file in files:
                with safe_open(str(file), framework="pt") as tensors:
                    for name in tensors.keys():
                        yield name, tensors.get_tensor(name)

        live.load(checkpoint())
        return True

    def grove_weights_digest(self) -> str:
        """A digest of the live weights, so tests can tell an update really landed."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        digest = hashlib.sha1()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(float(tensor.float().sum())).encode())
        return digest.hexdigest()
