"""Text generation: the ``Generator`` protocol and its backends."""

from core.generation.base import (
    ChatMessage,
    GenerationRequest,
    Generator,
    SamplingParams,
    TokenDelta,
    generator_backends,
)

__all__ = [
    "ChatMessage",
    "GenerationRequest",
    "Generator",
    "SamplingParams",
    "TokenDelta",
    "generator_backends",
]
