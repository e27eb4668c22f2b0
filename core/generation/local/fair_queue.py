"""Who gets the next free batch slot.

The waiting tenant (bot) with the fewest requests running goes first, round-robin among
equals, and never a user already at their concurrency cap. The queue is bounded; a full
queue answers "busy" at once.
"""

from __future__ import annotations

from collections import Counter, deque

from core.generation.local.ticket import Ticket


class FairQueue:
    """Waiting jobs by tenant; see the module docstring for the order they leave in."""

    def __init__(self, max_waiting: int, max_per_user: int) -> None:
        self.max_waiting = max_waiting
        self.max_per_user = max_per_user
        self._by_tenant: dict[str, deque[Ticket]] = {}
        self._turn: deque[str] = deque()  # round-robin order of tenants
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, job: Ticket) -> bool:
        """Queue ``job``; False (and nothing queued) when the queue is full."""
        if self._size >= self.max_waiting:
            return False
        tenant = job.request.tenant
        if tenant not in self._by_tenant:
            self._by_tenant[tenant] = deque()
            self._turn.append(tenant)
        self._by_tenant[tenant].append(job)
        self._size += 1
        return True

    def discard(self, job: Ticket) -> bool:
        """Remove a waiting job (its consumer left); False if it was not waiting."""
        jobs = self._by_tenant.get(job.request.tenant)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        self._size -= 1
        self._drop_if_empty(job.request.tenant)
        return True

    def pop(self, running_by_tenant: Counter[str], running_by_user: Counter[str]) -> Ticket | None:
        """The next job to admit, or None if every waiting job's user is at their cap."""
        candidates = sorted(
            range(len(self._turn)), key=lambda i: (running_by_tenant[self._turn[i]], i)
        )
        for index in candidates:
            tenant = self._turn[index]
            jobs = self._by_tenant[tenant]
            for job in jobs:
                if running_by_user[user_key(job)] < self.max_per_user:
                    jobs.remove(job)
                    self._size -= 1
                    # The served tenant goes to the back of the round-robin order.
                    del self._turn[index]
                    self._turn.append(tenant)
                    self._drop_if_empty(tenant)
                    return job
        return None

    def drain(self) -> list[Ticket]:
        """Remove and return every waiting job."""
        jobs = [job for queue in self._by_tenant.values() for job in queue]
        self._by_tenant.clear()
        self._turn.clear()
        self._size = 0
        return jobs

    def _drop_if_empty(self, tenant: str) -> None:
        if not self._by_tenant[tenant]:
            del self._by_tenant[tenant]
            self._turn.remove(tenant)


def user_key(job: Ticket) -> str:
    return f"{job.request.tenant}\x00{job.request.user}"
