"""Attention over a continuous batch, one request at a time, for devices without flash kernels.

transformers' continuous batching packs every request's tokens into one sequence. With
FlashAttention (CUDA) the kernel uses the sequence boundaries (``cu_seq_lens``) and each
query attends only to its own request. Without it, the manager falls back to SDPA over
the whole packed sequence with a mask that hides other requests: every query is scored
against every request's keys, so the cost of a step grows with the square of the batch
and batching stops paying off past a handful of requests (measured: ~2.5x sequential on
CPU at 16 requests).

:func:`varlen_attention` is a drop-in attention function that reads the same boundaries
and runs SDPA per request, with the causal (and sliding-window) mask of that request
only. It is registered with transformers' ``AttentionInterface`` under
:data:`ATTENTION_NAME` and switched on after the batching manager is set up.

Private names: the ``cu_seq_lens_q`` / ``cu_seq_lens_k`` keyword arguments the model
runner passes to attention functions, ``module.layer_idx`` / ``layer_types``, and on
transformers < 5.24 the ``cache`` argument (``PagedAttentionCache.update``). Switched off,
the manager attends with its own SDPA over the whole packed batch (slower, same tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.generation.local.hf.patch import Patch

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

ATTENTION_NAME = "parley_varlen"


def varlen_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed continuous batch; see the module docstring.

    ``query`` is ``[1, heads, total_q, dim]``; ``key``/``value`` the new tokens'
    ``[1, kv_heads, total_q, dim]``, which the paged cache turns into every request's
    keys, packed in the order of ``cu_seq_lens_k``. Returns ``[1, total_q, heads, dim]``.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    cu_seq_lens_q = kwargs.get("cu_seq_lens_q")
    cu_seq_lens_k = kwargs.get("cu_seq_lens_k")
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(f"{ATTENTION_NAME} attention only serves continuous batching")
    if cache is not None:
        # transformers < 5.24 hands the paged cache to the attention function, which
        # stores the new keys and reads back every request's; the cache reads the batch
        # layout from the same keyword arguments, so they stay in. From 5.24 the
        # attention module updates the cache itself (``cache=`` on its forward) and
        # passes the keys read back.
        key, value = cache.update(
            key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs
        )
    layer_type = _layer_type(module)
    bounds_k = cu_seq_lens_k[layer_type] if isinstance(cu_seq_lens_k, dict) else cu_seq_lens_k
    window = getattr(module, "sliding_window", None) if layer_type == "sliding_attention" else None
    gqa = query.shape[1] != key.shape[1]
    starts_q = cu_seq_lens_q.tolist()
    starts_k = bounds_k.tolist()
    out = torch.empty_like(query)
    for i in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]
        len_q, len_k = q1 - q0, k1 - k0
        if len_q == 0:
            continue
        mask = None
        if len_q > 1 or (window is not None and len_k > window):
            # Queries are the request's newest tokens: query j sits at key position
            # len_k - len_q + j. Causal, and within the window on sliding layers.
            q_pos = torch.arange(len_k - len_q, len_k, device=query.device)[:, None]
            k_pos = torch.arange(len_k, device=query.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= q_pos - k_pos < window
        out[:, :, q0:q1] = sdpa(
            query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1],
            attn_mask=mask, scale=scaling, enable_gqa=gqa,
        )
    return out.transpose(1, 2).contiguous(), None


def _layer_type(module: Any) -> str:
    types = getattr(getattr(module, "config", None), "layer_types", None)
    if types is not None:
        return str(types[module.layer_idx])
    return "sliding_attention" if getattr(module, "is_sliding", False) else "full_attention"


class VarlenAttention(Patch):
    """Makes the model attend per request (:func:`varlen_attention`) unless it uses flash
    kernels, which already do."""

    name = "attention"
    uses = "cu_seq_lens_q / cu_seq_lens_k attention kwargs; PagedAttentionCache.update (< 5.24)"
    # The function registered; a test swaps in one whose assumptions do not hold.
    function: Callable[..., tuple[torch.Tensor, None]] = staticmethod(varlen_attention)

    def before_start(self, manager: Any, model: Any) -> None:
        """Register the function and switch ``model`` to it.

        After ``init_continuous_batching``: the manager only accepts its own list of
        implementations when it is set up, and nothing but the manager may run the model
        afterwards (a plain forward has no packed batch to read boundaries from).
        """
        from transformers import AttentionInterface

        if "flash" in str(model.config._attn_implementation):
            return
        AttentionInterface.register(ATTENTION_NAME, self.function)
        model.set_attn_implementation(ATTENTION_NAME)
