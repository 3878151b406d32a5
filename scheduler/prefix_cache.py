"""Automatic prefix caching, the index: which token blocks have their KV stored, and where.

Pure Python (no torch); the stored tensors live in scheduler/prefix_store.py. A prompt is cut
into blocks of `block_size` tokens; a block is stored under (its parent block's id, its tokens),
so a key names the whole prefix up to the block's end and a match is exact, with no hashing of
long prefixes. Requests that share a start (the chat template's system turn, an instruction, an
earlier turn of the same conversation) skip computing it: admission copies the stored blocks
into the request's KV slot and starts the prompt's first chunk after them.

Life of a block:
    claim()     the batcher plans a prefill chunk that computes the block, or a request that
                ends with it (prompt and answer, for the conversation's next turn): it gets an
                id, and the runner copies its KV (and draft features) out of the slot;
    mark_ready  after that step: match() may now hand it out (never earlier: a request
                admitted in the same step as the one computing the block must not read it);
    match()     an admitted prompt starts with the block: the runner copies it into the slot;
    eviction    the least recently used ready block goes, with every block stored under it
                (their keys name its id, which a new block may take).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# Tokens a block: a hit is a whole number of blocks. Small, because a block costs only a dict
# entry and its share of one copy: the embedded model's chat template opens every prompt with
# a 24-token system turn, of which blocks of 16 would keep 16.
PREFIX_BLOCK_SIZE = 8

_ROOT = -1  # the parent id of a prompt's first block

BlockKey = tuple[int, tuple[int, ...]]  # (parent block id, the block's tokens)


@dataclass(slots=True)
class _Block:
    key: BlockKey
    ready: bool = False
    children: set[int] = field(default_factory=set)


class PrefixIndex:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a prefix cache needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0 first
        self._by_key: dict[BlockKey, int] = {}
        self._blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self._pending: list[int] = []  # claimed, not yet marked ready

    @property
    def num_used(self) -> int:
        return len(self._blocks)

    def _key(self, parent: int, token_ids: Sequence[int], j: int) -> BlockKey:
        b = self.block_size
        return parent, tuple(token_ids[j * b : (j + 1) * b])

    def match(self, prompt_ids: Sequence[int]) -> list[int]:
        """Ids of the stored ready blocks the prompt starts with, leaving at least its last token
        to compute (its logits give the first output token). Marks them recently used."""
        ids: list[int] = []
        parent = _ROOT
        for j in range((len(prompt_ids) - 1) // self.block_size):
            block_id = self._by_key.get(self._key(parent, prompt_ids, j))
            if block_id is None or not self._blocks[block_id].ready:
                break
            ids.append(block_id)
            parent = block_id
        for block_id in reversed(ids):  # parents end up more recent than their children
            self._blocks.move_to_end(block_id)
        return ids

    def claim(self, prompt_ids: Sequence[int], end: int) -> list[tuple[int, int]]:
        """(block id, first position) for each whole prompt block within positions [0, end)
        that is not stored yet: a step that computed up to `end` has every earlier position's
        keys, values and features in its slot (scheduler/prefix_store.py). Stops where the
        chain of stored parents breaks or no block can be evicted."""
        b = self.block_size
        end = min(end, len(prompt_ids))
        claimed: list[tuple[int, int]] = []
        parent = _ROOT
        for j in range(end // b):
            key = self._key(parent, prompt_ids, j)
            block_id = self._by_key.get(key)
            if block_id is None:
                block_id = self._allocate(key, parent)
                if block_id is None:
                    break
                claimed.append((block_id, j * b))
            else:
                self._blocks.move_to_end(block_id)  # not evicted from under its new children
            parent = block_id
        return claimed

    def mark_ready(self) -> None:
        """The step that computed every claimed block has run: their KV is stored."""
        for block_id in self._pending:
            if block_id in self._blocks:
                self._blocks[block_id].ready = True
        self._pending.clear()

    def _allocate(self, key: BlockKey, parent: int) -> int | None:
        if not self._free and not self._evict_one():
            return None
        block_id = self._free.pop()
        self._blocks[block_id] = _Block(key)
        self._by_key[key] = block_id
        if parent != _ROOT:
            self._blocks[parent].children.add(block_id)
        self._pending.append(block_id)
        return block_id

    def _subtree(self, block_id: int) -> list[int]:
        out, stack = [], [block_id]
        while stack:
            out.append(stack.pop())
            stack.extend(self._blocks[out[-1]].children)
        return out

    def _evict_one(self) -> bool:
        """Drop the least recently used block whose subtree is all ready, with that subtree;
        False if none can go. A pending descendant pins it: that id is written this step."""
        for block_id in self._blocks:  # least recently used first
            subtree = self._subtree(block_id)
            if all(self._blocks[d].ready for d in subtree):
                break
        else:
            return False
        parent = self._blocks[block_id].key[0]
        if parent in self._blocks:
            self._blocks[parent].children.discard(block_id)
        for d in subtree:
            del self._by_key[self._blocks.pop(d).key]
            self._free.append(d)
        return True
