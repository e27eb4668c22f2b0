"""Conversation memory: the ``MemoryStore`` protocol and its backends."""

from core.memory.base import MemorySnapshot, MemoryStore, memory_backends

__all__ = ["MemorySnapshot", "MemoryStore", "memory_backends"]
