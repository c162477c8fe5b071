"""Token logprobs and entropy under the policy, chunked over positions.

The chosen-token logprob and the entropy come from the model's last hidden states and its
output layer a chunk of positions at a time, each chunk recomputed in the backward pass
(`chunked_head_logprobs`): the fp32 (positions x vocabulary) logits never exist for more
than one chunk, so a 150k vocabulary at thousands of tokens fits.
"""

from __future__ import annotations

import types
from typing import Optional

import torch

from trainer.batching import head_chunks, length_buckets


# Config fields of models whose logits are not simply output_layer(last hidden state):
# those keep the full-logits path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_softcapping", "logit_scale", "logits_scaling",
                     "output_multiplier_scale")


def supports_chunked_head(model) -> bool:
    """Whether the logits are `output embeddings(base model's last hidden state)`, as in
    Qwen2 and Llama: then `chunked_head_logprobs` applies."""
    config = getattr(model, "config", None)
    base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if config is None or not isinstance(base, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return False
    return all(getattr(config, name, None) is None for name in _LOGIT_TRANSFORMS)


def _head_stats(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                with_entropy: bool):
    """log π(target) and, when asked, the entropy, for (N, H) hidden states: (N,) each."""
    logprobs = torch.log_softmax(head(hidden).float() / temperature, dim=-1)
    chosen = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen
    return chosen, -(logprobs.exp() * logprobs).sum(-1)


def chunked_head_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                          with_entropy: bool = False, positions: Optional[torch.Tensor] = None, num_chunks: int = 1):
    """`token_logprobs` from the base model's last hidden states and the output layer,
    `num_chunks` slices of the scored positions at a time.

    With more than one chunk and gradients on, each chunk runs under activation
    checkpointing: only its (chunk, H) hidden states are kept, and the (chunk, vocabulary)
    logits are recomputed in the backward pass, so the logits' extra memory is
    O(chunk x vocabulary) in both passes, and the gradient is the unchunked one (the same
    operations, replayed). `positions` (B, L-1) bool: the positions to score (None: all);
    the others hold 0. A chunk may be empty (ranks run equal chunk counts)."""
    base = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    if positions is None:
        positions = torch.ones_like(targets, dtype=torch.bool)
    index = positions.nonzero(as_tuple=True)
    picked, picked_targets = hidden[index], targets[index]  # (N, H), (N,)
    checkpointed = num_chunks > 1 and torch.is_grad_enabled() and picked.requires_grad
    pieces = []
    for h, t in zip(picked.tensor_split(num_chunks), picked_targets.tensor_split(num_chunks)):
        if checkpointed:
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(_head_stats, head, h, t, temperature, with_entropy, use_reentrant=False)
        else:
            out = _head_stats(head, h, t, temperature, with_entropy)
        pieces.append(out if with_entropy else (out,))
    full = []
    for parts in zip(*pieces):
        values = torch.cat(parts)
        full.append(values.new_zeros(targets.shape).index_put(index, values))
    return tuple(full) if with_entropy else full[0]


def _policy_forward(self, *args, grove_logprobs: Optional[dict] = None, **kwargs):
    """The forward `install_policy_forward` sets: the class's own, unless asked for logprobs."""
    if grove_logprobs is None:
        return type(self).forward(self, *args, **kwargs)
    return chunked_head_logprobs(self, kwargs["input_ids"], kwargs["attention_mask"], **grove_logprobs)


def install_policy_forward(model) -> bool:
    """Route `model(..., grove_logprobs={...})` to `chunked_head_logprobs`, so that the
    chunked computation runs inside the module's own forward: through a DeepSpeed engine,
    with its forward and backward hooks (ZeRO-3 gathers the output layer for each chunk,
    also when the backward pass recomputes it). Any other call is the model's own forward
    (a bound method, so a deepcopy of the model calls its own). Returns False, changing
    nothing, for a model `supports_chunked_head` refuses."""
    if not supports_chunked_head(model):
        return False
    model.forward = types.MethodType(_policy_forward, model)
    model._grove_policy_forward = True
    return True


def _is_engine(model) -> bool:
    """Whether `model` is a DeepSpeed engine (its model is `.module`)."""
    module = getattr(model, "module", None)
    return isinstance(module, torch.nn.Module) and hasattr(model, "set_gradient_accumulation_boundary")


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False,
                   positions: Optional[torch.Tensor] = None, num_chunks: int = 1):
    """log π(token t+1 | tokens ≤ t) for every position, (B, L-1); with the entropy of
    each position's distribution too when asked.

    `model` is a causal LM or a DeepSpeed engine around one. Where the logits are the
    output layer of the last hidden state, they are computed `num_chunks` chunks of
    positions at a time (`chunked_head_logprobs`); otherwise all at once. `positions`
    (B, L-1) bool: only these are scored, the others hold 0."""
    module = model.module if _is_engine(model) else model
    kwargs = dict(temperature=temperature, with_entropy=with_entropy, positions=positions, num_chunks=num_chunks)
    if getattr(module, "_grove_policy_forward", False):
        return model(input_ids=input_ids, attention_mask=attention_mask, grove_logprobs=kwargs)
    if supports_chunked_head(module) and model is module:
        return chunked_head_logprobs(model, input_ids, attention_mask, **kwargs)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    chosen = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    out = (chosen, -(logprobs.exp() * logprobs).sum(-1)) if with_entropy else (chosen,)
    if positions is not None:
        out = tuple(torch.where(positions, t, torch.zeros_like(t)) for t in out)
    return out if with_entropy else out[0]


def bucketed_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            temperature: float = 1.0, with_entropy: bool = False,
                            overhead_tokens: int = 128, max_tokens: Optional[int] = None,
                            positions: Optional[torch.Tensor] = None, chunk_tokens: Optional[int] = None):
    """`token_logprobs` over right-padded rows, forwarded in length buckets (of at most
    `max_tokens` padded tokens), each cut to its own longest row. Causal attention makes
    the result the same as one padded pass (up to float rounding); positions past a row's
    end, which no loss reads, hold 0."""
    lengths = attention_mask.sum(-1)
    buckets = length_buckets(lengths.tolist(), overhead_tokens, max_tokens)
    if len(buckets) == 1:
        scored = int(positions.sum()) if positions is not None else input_ids.shape[0] * (input_ids.shape[1] - 1)
        return token_logprobs(model, input_ids, attention_mask, temperature, with_entropy, positions,
                              head_chunks(scored, chunk_tokens))
    width = input_ids.shape[1] - 1
    pieces: list[tuple[torch.Tensor, ...]] = []
    for rows in buckets:
        index = torch.tensor(rows, device=input_ids.device)
        n = int(lengths[index].max())
        where = None if positions is None else positions[index, : n - 1]
        scored = int(where.sum()) if where is not None else len(rows) * (n - 1)
        out = token_logprobs(model, input_ids[index, :n], attention_mask[index, :n], temperature, with_entropy,
                             where, head_chunks(scored, chunk_tokens))
        out = out if with_entropy else (out,)
        pieces.append(tuple(torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in out))
    inverse = torch.tensor([i for rows in buckets for i in rows], device=input_ids.device).argsort()
    joined = tuple(torch.cat(parts)[inverse] for parts in zip(*pieces))
    return joined if with_entropy else joined[0]
