"""KV slot accounting: one preallocated cache row of max_model_len per resident request.

Pure integers; the tensors live in scheduler/model.py. The lowest free slot is always handed out
first, so resident requests stay packed at the front of the cache and the runner can attend over
the view `cache[:max_slot + 1]` without gathering rows.

Rollback of rejected draft tokens needs no call here: the request's `num_computed_tokens` simply
does not advance past the accepted tokens, and the stale KV beyond it is overwritten later.
"""

from __future__ import annotations

import heapq


class KVSlotManager:
    def __init__(self, num_slots: int, max_model_len: int) -> None:
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self._free = list(range(num_slots))  # a min-heap
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def try_allocate(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)
