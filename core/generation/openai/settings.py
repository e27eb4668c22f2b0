"""The openai backend's own keys of ``[generation]``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.config import Section


class OpenAISettings(Section):
    """The server to call, how hard to try, and how the bot's sampling settings are sent."""

    url: str | None = None  # the server's base URL, e.g. http://127.0.0.1:8000/v1
    api_key: str | None = None
    # Retries of a refused connection, a timeout, 408/409/429/5xx (the SDK's rules), each
    # after the server's Retry-After when it sends one, else a backoff.
    max_retries: int = Field(default=2, ge=0, le=10)
    connect_timeout: float = Field(default=10.0, gt=0.0)
    # Silence allowed between two reads; unset: generation.timeout.
    read_timeout: float | None = Field(default=None, gt=0.0)
    total_timeout: float = Field(default=600.0, gt=0.0)  # the whole answer, retries included
    # How generation.repetition_penalty travels: OpenAI's presence_penalty (every server
    # takes it), the repetition_penalty field of vLLM, TGI, llama.cpp and Parley, or not.
    repetition: Literal["presence_penalty", "repetition_penalty", "off"] = "presence_penalty"
    # How generation.no_repeat_ngram_size travels (the OpenAI API has no such field):
    # not at all; as the field of that name (Parley's own API, ``parley worker``, takes
    # it); or in vLLM's ``vllm_xargs`` (its extra_args), for a vLLM server whose logits
    # processor reads ``no_repeat_ngram_size`` (vLLM has none built in).
    no_repeat_ngram: Literal["off", "no_repeat_ngram_size", "vllm_xargs"] = "off"
