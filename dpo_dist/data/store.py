"""Tokenized pairs as the rest of dpo_dist sees them: a list-like of Pair views over flat arrays.

The arrays are the token cache's memory-mapped files (or arrays in memory for a one-off load), so no
token lives in a Python object: a Pair and its Sequences are made when they are looked up, their ids
are views into the arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dpo_dist.data.tokenize import TokenizedPairs


@dataclass(frozen=True, eq=False)
class Sequence:
    """One prompt+response token sequence; `response_start` is the first response token's position."""

    ids: np.ndarray  # int32
    response_start: int

    @property
    def response_tokens(self) -> int:
        return len(self.ids) - self.response_start

    @property
    def scored_tokens(self) -> int:
        """Response tokens that get a log-prob: a sequence's first token has no prefix to predict it."""
        return len(self.ids) - max(self.response_start, 1)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Sequence) and self.response_start == other.response_start
                and np.array_equal(self.ids, other.ids))


@dataclass(frozen=True)
class Pair:
    index: int
    chosen: Sequence
    rejected: Sequence

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


class Pairs:
    """The pairs of a split, in order, over one or more TokenizedPairs parts."""

    def __init__(self, parts: list[TokenizedPairs]):
        self.parts = [p for p in parts if len(p.index)]
        self._first = np.cumsum([0] + [len(p.index) for p in self.parts])

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, k: int | slice) -> Pair | list[Pair]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        k %= len(self)
        part_no = int(np.searchsorted(self._first, k, side="right")) - 1
        part, j = self.parts[part_no], k - int(self._first[part_no])
        chosen, rejected = (Sequence(part.ids[part.offsets[s]: part.offsets[s + 1]], int(part.starts[s]))
                            for s in (2 * j, 2 * j + 1))
        return Pair(int(part.index[j]), chosen, rejected)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @cached_property
    def indices(self) -> np.ndarray:
        """Every pair's row index, in order: [len(self)] int64."""
        return np.concatenate([p.index for p in self.parts]) if self.parts else np.zeros(0, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(p.ids) for p in self.parts))


@dataclass
class PreferenceData:
    pairs: Pairs
    form: str
    files: list[Path]  # what the rows were read from (their digests key the caches)
    num_rows: int
    truncated: int = 0
    dropped: int = 0

    def summary(self, name: str) -> str:
        return (
            f"{name}: {len(self.pairs)} pairs from {self.num_rows} rows in {len(self.files)} file(s) "
            f"({self.form}); {self.truncated} truncated, {self.dropped} dropped"
        )
