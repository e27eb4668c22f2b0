"""Dropping the result handler of a request Parley has finished with.

The manager's ``cancel_request`` sends no final event and leaves the request's result
handler registered, and a request Parley stops early (a stop string, its consumer gone)
never finishes in the manager's eyes: without this, every such request would leave an
entry behind for the life of the process.

Private names: ``manager.output_router``, its ``_lock`` and ``result_handlers``.
Switched off, handlers of requests stopped early stay registered (a slow leak, no wrong
answers: the scheduler ignores late events).
"""

from __future__ import annotations

from typing import Any

from core.generation.local.hf.patch import Patch


class ForgetHandlers(Patch):
    """Pops a finished request's handler from the manager's output router."""

    name = "cancellation"
    uses = "ContinuousBatchingManager.output_router._lock / .result_handlers"

    def after_start(self, manager: Any) -> None:
        """Fail now, not at the first cancellation, if the router looks different."""
        router = manager.output_router
        if not hasattr(router, "_lock") or not isinstance(router.result_handlers, dict):
            raise TypeError("the manager's output router has no _lock / result_handlers dict")

    def forget(self, manager: Any, request_id: str) -> None:
        """Drop ``request_id``'s handler (a no-op if the manager already did)."""
        router = manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)
