"""Building, starting and reading the state of transformers' ``ContinuousBatchingManager``.

Private names: ``ContinuousBatchingConfig`` (imported from
``transformers.generation.configuration_utils``), ``manager.batch_processor`` (set by the
manager's thread once its cache is allocated), ``manager.background_thread_status``
(``fatal_error``), and the ``ContinuousBatchingLogger`` logger name. The rest is the
manager's documented surface (``init_continuous_batching``, ``start``, ``stop``,
``is_running``, ``add_request``, ``register_result_handler``, ``cancel_request``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import GenerationError
from core.generation.local.hf.patch import Patch

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # seconds the manager's thread may take to allocate its cache


class PatchFailed(GenerationError):
    """A patch raised while the manager was being set up with it."""

    def __init__(self, patch: Patch, error: BaseException) -> None:
        super().__init__(f"{patch.name}: {type(error).__name__}: {error}")
        self.patch = patch
        self.error = error


@dataclass(frozen=True, slots=True)
class ManagerSpec:
    """What the manager is built with, apart from the patches."""

    num_blocks: int
    page_size: int
    max_batch_tokens: int
    max_requests: int
    pad_token_id: int
    # The model's attention implementation as loaded; restored before every start, since
    # the attention patch leaves the model on one that only a manager can run.
    attention: str
    prefix_sharing: bool = True  # pages of a prompt already in the cache are reused


def start_manager(model: Any, spec: ManagerSpec, patches: Sequence[Patch]) -> Any:
    """A started manager with ``patches`` applied (blocking; call off the event loop).

    Raises :class:`PatchFailed` naming the patch that raised, or :class:`GenerationError`
    when the manager itself does not start.
    """
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # transformers gives this logger a console handler of its own; keep it to warnings
    # unless Parley itself is debugging.
    logging.getLogger("ContinuousBatchingLogger").setLevel(
        logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    )
    restore_attention(model, spec)
    # do_sample is global, so every request samples; greedy is asked for per request as
    # top_p = 0, which leaves only the argmax. Temperature and top-p must be non-neutral
    # for the manager to build its per-request processors at all.
    generation: dict[str, Any] = {
        "do_sample": True, "temperature": 0.9999, "top_p": 0.9999,
        # No global end token: each request names its own (none with ignore_eos).
        # -1, not None: None makes transformers warn on every start and set -1 itself.
        "max_new_tokens": 256, "eos_token_id": -1, "pad_token_id": spec.pad_token_id,
    }
    batching: dict[str, Any] = {
        "num_blocks": spec.num_blocks, "page_size": spec.page_size,
        "max_batch_tokens": spec.max_batch_tokens,
        "max_requests_per_batch": spec.max_requests, "max_memory_percent": 0.9,
        "per_request_processors": True,
        "allow_block_sharing": spec.prefix_sharing,  # a bot's persona is computed once
        "scheduler_type": "fifo",
    }
    for patch in patches:
        _run(patch, patch.configure, generation, batching)
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(**generation),  # type: ignore[no-untyped-call]
        continuous_batching_config=ContinuousBatchingConfig(**batching),
    )
    try:
        for patch in patches:
            _run(patch, patch.before_start, manager, model)
        manager.start()
        _wait_started(manager)
        for patch in patches:
            _run(patch, patch.after_start, manager)
    except BaseException:
        stop_manager(model, spec, manager)
        raise
    return manager


def stop_manager(model: Any, spec: ManagerSpec, manager: Any, timeout: float = 30.0) -> None:
    """Stop ``manager`` (blocking) and give the model back its own attention."""
    try:
        manager.stop(True, timeout)
    finally:
        restore_attention(model, spec)


def restore_attention(model: Any, spec: ManagerSpec) -> None:
    """Put ``model`` back on the attention implementation it was loaded with."""
    if str(model.config._attn_implementation) != spec.attention:
        model.set_attn_implementation(spec.attention)


def loop_error(manager: Any) -> str:
    """Why the manager's loop is not running: its fatal error, or that it stopped."""
    status = getattr(manager, "background_thread_status", None)
    error = getattr(status, "fatal_error", None)
    if error is None:
        return "the generation loop stopped"
    return f"{type(error).__name__}: {error}"


def attention_in_use(model: Any) -> str:
    """The model's attention implementation now (for the log line)."""
    return str(model.config._attn_implementation)


def _wait_started(manager: Any) -> None:
    # start() does not raise: the cache is allocated on the manager's thread, and a
    # failure there only shows as a dead thread.
    deadline = time.monotonic() + START_TIMEOUT
    while manager.batch_processor is None:
        if not manager.is_running():
            raise GenerationError(f"continuous batching failed to start: {loop_error(manager)}")
        if time.monotonic() > deadline:
            raise GenerationError(f"continuous batching did not start within {START_TIMEOUT:g} s")
        time.sleep(0.01)


def _run(patch: Patch, hook: Any, *args: Any) -> None:
    try:
        hook(*args)
    except Exception as exc:
        raise PatchFailed(patch, exc) from exc
