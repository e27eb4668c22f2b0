"""The local backend's own keys of ``[generation]``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import Section


class LocalSettings(Section):
    """Where the model runs and how the continuous batching is sized."""

    device: str = "auto"
    # "auto": bfloat16 on CUDA and on CPUs with bfloat16 matrix units (AMX, AVX512-BF16),
    # float32 elsewhere.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    context_tokens: int | None = Field(default=None, ge=64)
    cache_dir: str | None = None
    # How many requests decode together, how many may wait (beyond that: "busy" at once),
    # and how many one user may have running.
    batching: bool = True
    max_batch: int = Field(default=32, ge=1, le=1024)
    max_waiting: int = Field(default=256, ge=0)
    max_per_user: int = Field(default=4, ge=1)
    kv_cache_tokens: int | None = Field(default=None, ge=256)
    batch_tokens: int = Field(default=512, ge=64, le=65536)  # tokens per forward pass
    # Prompt pages (64 tokens) already in the KV cache, such as a bot's persona, are
    # reused instead of computed again (transformers' block sharing).
    prefix_sharing: bool = True
    # Tokens per KV-cache page: prefix sharing reuses whole pages only, so a persona shorter
    # than a page is computed for every conversation. Unset: 16 on a CPU, 64 on a GPU.
    kv_page_tokens: int | None = Field(default=None, ge=8, le=1024)
