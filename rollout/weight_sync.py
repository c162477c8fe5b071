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


class GroveWorkerExtension:
    def grove_load_weights(self, payload: bytes) -> int:
        from safetensors.torch import load

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
