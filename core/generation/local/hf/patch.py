"""What every patch of the seam looks like, and the set the batching manager starts with.

A patch changes transformers' batching manager at up to three moments of its start:
``configure`` (the keyword arguments of its ``GenerationConfig`` and
``ContinuousBatchingConfig``), ``before_start`` (the manager is built, its thread not yet
running) and ``after_start`` (the thread runs and has built its batch processor). A patch
that raises at any of them, or whose manager then fails the self-check (``selfcheck.py``),
is switched off for this process.
"""

from __future__ import annotations

from typing import Any


class Patch:
    """One change to the manager; subclasses override what they need."""

    name = ""  # what the warning line calls it when it is switched off
    uses = ""  # the private transformers names it relies on (for the docs and the log)

    def configure(self, generation: dict[str, Any], batching: dict[str, Any]) -> None:
        """Adjust the keyword arguments of the manager's two configs."""

    def before_start(self, manager: Any, model: Any) -> None:
        """Change the built manager (or the model) before its thread starts."""

    def after_start(self, manager: Any) -> None:
        """Change the running manager's batch processor."""

    def forget(self, manager: Any, request_id: str) -> None:
        """Release what the manager keeps of a request Parley has finished with."""


def default_patches(*, newcomers_first: bool = True) -> list[Patch]:
    """The seam's patches, in the order they are applied."""
    from core.generation.local.hf.attention import VarlenAttention
    from core.generation.local.hf.cancellation import ForgetHandlers
    from core.generation.local.hf.sampler import CandidateSampler
    from core.generation.local.hf.scheduler import NewcomersFirstSchedule

    patches: list[Patch] = [VarlenAttention(), CandidateSampler(), ForgetHandlers()]
    if newcomers_first:
        patches.insert(1, NewcomersFirstSchedule())
    return patches
