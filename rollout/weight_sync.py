"""The receiving side of weight sync, run where vLLM runs the model.

vLLM loads this class into its model worker (`worker_extension_cls`): inside the
engine-core process with `rollout.engine.executor=uniproc`, in a worker process of its own
with `mp`. `engine.collective_rpc("grove_load_weights", args=(payload,))` calls it there.
The payload is a safetensors blob: tensors passed through collective_rpc across a process
boundary arrive as plain lists, but bytes arrive intact. On CPU the weights must
go through `reload_weights` (linear layers are repacked into oneDNN handles, so
writing parameters directly corrupts them).
"""

from __future__ import annotations

import hashlib
import logging

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


class GroveWorkerExtension:
    def grove_load_weights(self, payload: bytes) -> int:
        from safetensors.torch import load

        quiet_weightless_layer_warnings()
        state = load(payload)
        self.model_runner.reload_weights(  # type: ignore[attr-defined]
            weights_iterator=iter(state.items()), is_checkpoint_format=True
        )
        return len(state)

    def grove_weights_digest(self) -> str:
        """A digest of the live weights, so tests can tell an update really landed."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        digest = hashlib.sha1()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(str(float(tensor.float().sum())).encode())
        return digest.hexdigest()
