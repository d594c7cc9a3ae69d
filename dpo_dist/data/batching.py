"""Which pairs form each optimizer step and micro-batch, and how a micro-batch becomes tensors.

The pairs of a global step depend only on the seed, the epoch and the global batch size — never on
the number of processes or on how the step is split into micro-batches — so 1 process × accum 4 and
2 processes × accum 2 train on the same pairs and reach the same weights. Every rank runs the same
number of forward passes (ZeRO-3 gathers parameters collectively); where a rank has no pair left in
a short last step it runs a zero-weight copy of one, which adds nothing to loss, gradients or metrics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from dpo_dist.data.store import Pair


@dataclass
class ScoredTokens:
    """The positions whose next token is a response token, worked out once on the host, so that the
    forward needs no boolean indexing or bincount on the device (each a host sync). index [n]: flat
    positions (row-major over rows × width); target, owner [n]: the next token's id and sequence
    (0..2B-1); in_shared [n]: 1.0 within the pair's shared length (its first min(chosen, rejected)
    response tokens, LD-DPO), else 0.0; tokens [2B]: response tokens per sequence."""

    index: torch.Tensor
    target: torch.Tensor
    owner: torch.Tensor
    in_shared: torch.Tensor
    tokens: torch.Tensor

    def within(self, columns: tuple[int, int], width: int) -> ScoredTokens:
        """The positions in columns [lo, hi) of every row, indexed as in the [rows, hi - lo] slice
        (sequence parallelism: a rank's part of the batch); `tokens` stay whole-sequence counts."""
        lo, hi = columns
        row, col = self.index // width, self.index % width
        keep = (col >= lo) & (col < hi)
        return ScoredTokens(row[keep] * (hi - lo) + col[keep] - lo, self.target[keep], self.owner[keep],
                            self.in_shared[keep], self.tokens)


def _rank_in_sequence(owner: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """0, 1, 2, ... along each sequence's scored tokens, given in order (a sequence's tokens are
    contiguous and ordered in the row-major flattening of any layout of `collate`)."""
    counts = torch.bincount(owner, minlength=num_seqs)
    first = torch.cumsum(counts, 0) - counts
    order = torch.argsort(owner, stable=True)
    rank = torch.empty_like(owner)
    rank[order] = torch.arange(owner.numel(), device=owner.device) - first[owner[order]]
    return rank


def scored_tokens(input_ids: torch.Tensor, response_mask: torch.Tensor, seq_index: torch.Tensor,
                  num_seqs: int) -> ScoredTokens:
    """Position t predicts token t+1 and is scored when t+1 is a response token (never the last
    column, so t+1 is in the same row)."""
    scored = torch.zeros_like(response_mask)
    scored[:, :-1] = response_mask[:, 1:]
    index = scored.flatten().nonzero().squeeze(1)
    owner = seq_index.flatten()[index + 1]
    tokens = torch.bincount(owner, minlength=num_seqs)
    shared_length = torch.minimum(*tokens.chunk(2)).repeat(2)
    in_shared = (_rank_in_sequence(owner, num_seqs) < shared_length[owner]).float()
    return ScoredTokens(index, input_ids.flatten()[index + 1], owner, in_shared, tokens)


@dataclass
class MicroBatch:
    """The chosen sequences of B pairs, then their rejected sequences, as model inputs.

    `packing` (see `collate`) says how tokens are laid out and so which attention mask they need:
    None — one sequence per row, right-padded ([2B, L]); "varlen" — all sequences in one row, no
    mask (flash kernels read boundaries from the position ids); "block_mask" / "flex" — units
    bin-packed into rows, attention kept inside a unit (and off the other side of a shared prompt)
    by a 4-D mask made from the layout a block of queries at a time (`LayoutMask`) or by a
    FlexAttention BlockMask; never shipped as [rows, T, T] from the host.
    response_mask marks response tokens; seq_index says which sequence (0..2B-1) each token is of
    (-1 for padding); unit_index, side: which unit a token belongs to and its side of the prompt
    (0 shared, 1 chosen, 2 rejected). index, weight: [B]. cu_seq_lens, max_length ("varlen" only):
    the flash kernels' sequence boundaries (int32 [units + 1]) and longest unit, computed here on the
    host so that no layer derives them from the position ids (host syncs in every layer).
    scored: `ScoredTokens`, computed on first use or before a move (`to`), so on the host.
    columns: under sequence parallelism, the slice [lo, hi) of every row that this rank's model
    forward sees (the width is a multiple of the group size); `scored` then covers that slice only.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    seq_index: torch.Tensor
    unit_index: torch.Tensor
    side: torch.Tensor
    seq_lengths: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor
    packing: str | None = None
    cu_seq_lens: torch.Tensor | None = None
    max_length: int | None = None
    scored: ScoredTokens | None = None
    columns: tuple[int, int] | None = None

    @property
    def num_pairs(self) -> int:
        return self.index.numel()

    def scoring(self) -> ScoredTokens:
        """Which positions are scored, and for which sequence (see `ScoredTokens`)."""
        if self.scored is None:
            scored = scored_tokens(self.input_ids, self.response_mask, self.seq_index, 2 * self.num_pairs)
            self.scored = scored if self.columns is None else scored.within(self.columns, self.input_ids.shape[1])
        return self.scored

    def to(self, device: torch.device | str) -> MicroBatch:
        """The batch on `device`; to a GPU from pinned host memory without blocking the host."""
        self.scoring()  # here, on the host
        pinned = torch.device(device).type == "cuda"

        def move(value):
            if isinstance(value, ScoredTokens):
                return ScoredTokens(*(move(t) for t in vars(value).values()))
            if isinstance(value, torch.Tensor):
                host = pinned and value.device.type == "cpu"
                return (value.pin_memory() if host else value).to(device, non_blocking=host)
            return value

        return MicroBatch(**{k: move(v) for k, v in vars(self).items()})

    def varlen_kwargs(self) -> dict:
        """What transformers' flash attention takes to skip deriving boundaries from position ids."""
        if self.packing != "varlen":
            return {}
        return dict(cu_seq_lens_q=self.cu_seq_lens, cu_seq_lens_k=self.cu_seq_lens,
                    max_length_q=self.max_length, max_length_k=self.max_length)

    def attention_mask(self, full: bool = False):
        """The mask of this layout: None ("varlen": flash reads the boundaries from the position ids);
        the 2-D padding mask (padded rows, unless `full`: sequence parallelism needs the whole 4-D
        mask, the model running on a slice of the columns); a FlexAttention BlockMask ("flex"); else
        a `LayoutMask`, which the model's attention makes into mask rows (`model.attention`)."""
        if self.packing == "varlen":
            return None
        if self.packing is None and not full:
            return (self.seq_index >= 0).long()
        mask = LayoutMask(self.unit_index, self.side)
        if self.packing != "flex":
            return mask
        rows, width = self.input_ids.shape
        build = _block_mask_builder(compiled=self.input_ids.device.type != "cpu")
        return build(lambda b, h, q, kv: mask.visible(b, q, kv), rows, None, width, width,
                     device=self.input_ids.device)


@functools.cache
def _block_mask_builder(compiled: bool):
    """FlexAttention's `create_block_mask`, compiled once per process on a GPU (dynamo then compiles
    per batch shape, rows x width, whose widths train.pad_to_multiple_of keeps to a few); eager on the CPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask) if compiled else create_block_mask


class LayoutMask:
    """Which keys each query of a row sees, kept as the layout: `unit` and `side` ([rows, W]) of every
    token (see MicroBatch). A token sees the earlier tokens of its unit that are shared (side 0) or on
    its own side; padding (unit -1) sees padding, so no row is fully masked (no NaN in the kernel).
    Mask rows are made on demand: [W, W] per row is too much to keep for long rows."""

    def __init__(self, unit: torch.Tensor, side: torch.Tensor):
        self.unit, self.side = unit, side
        self._whole: dict = {}

    def visible(self, b, q, kv) -> torch.Tensor:
        unit, side = self.unit, self.side
        return (q >= kv) & (unit[b, q] == unit[b, kv]) & ((side[b, kv] == 0) | (side[b, q] == side[b, kv]))

    def rows(self, start: int, end: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[rows, 1, end - start, end]: queries [start, end) against keys [0, end) (later keys are
        causally masked anyway); booleans, or with `dtype` 0 / dtype-min to add to the scores (sdpa
        would otherwise convert booleans in every layer)."""
        device = self.unit.device
        mask = self.visible(torch.arange(self.unit.shape[0], device=device)[:, None, None],
                            torch.arange(start, end, device=device)[None, :, None],
                            torch.arange(end, device=device)[None, None, :])[:, None]
        if dtype is None:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)

    def whole(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All rows of the mask, made once per dtype: every layer of a forward shares it."""
        if dtype not in self._whole:
            self._whole[dtype] = self.rows(0, self.unit.shape[1], dtype)
        return self._whole[dtype]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence numbers grouped into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        row = next((r for r, room in enumerate(free) if room >= lengths[k]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(k)
        free[row] -= lengths[k]
    return rows


@dataclass
class _Segment:
    """Tokens laid out together: ids with their position ids; response tokens from `response_from`
    on (relative); `seq`: the sequence (0..2B-1) they score for; `side`: 0 = seen by every later
    token of the unit, 1 / 2 = the chosen / rejected side of a shared prompt, hidden from each other."""

    ids: np.ndarray
    first_position: int
    response_from: int
    seq: int
    side: int


def _units(pairs: list[Pair], share_prefix: bool) -> list[list[_Segment]]:
    """What goes into a row contiguously: a sequence alone, or with `share_prefix` a whole pair as
    [prompt | chosen | last prompt token again | rejected]. The repeated token has the last prompt
    token's position and sees what that token sees, so its hidden state is the same and it predicts
    the first rejected token, as the original predicts the first chosen one. Pairs whose prompts
    differ (truncated differently) or are empty are laid out unshared."""
    b = len(pairs)
    units = []
    for j, pair in enumerate(pairs):
        chosen, rejected = pair.chosen, pair.rejected
        p = chosen.response_start
        if share_prefix and p >= 1 and rejected.response_start == p and np.array_equal(chosen.ids[:p], rejected.ids[:p]):
            units.append([_Segment(chosen.ids[: p - 1], 0, p, j, 0),
                          _Segment(chosen.ids[p - 1:], p - 1, 1, j, 1),
                          _Segment(rejected.ids[p - 1:], p - 1, 1, b + j, 2)])
        else:
            # A sequence's first token has no prefix to be scored from, whatever the data says.
            units += [[_Segment(chosen.ids, 0, max(p, 1), j, 0)],
                      [_Segment(rejected.ids, 0, max(rejected.response_start, 1), b + j, 0)]]
    return units


def collate(pairs: list[Pair], pad_token_id: int, weights: list[float] | None = None,
            packing: str | None = None, share_prefix: bool = False, shard: tuple[int, int] = (1, 0),
            multiple_of: int = 1) -> MicroBatch:
    """packing: None — one sequence per row, padded to the longest; "varlen" — all sequences in
    one row, no padding, attention bounded by position ids (flash kernels); "block_mask" / "flex" —
    units bin-packed into rows as long as the longest unit, attention masked to each unit (a dense
    mask costs ~ rows × longest², like padding; FlexAttention skips the masked-out blocks), while
    nearly no padding tokens are computed. share_prefix (block_mask, flex): each pair's prompt is
    computed once (see `_units`). multiple_of: padded and packed rows are as wide as the longest, rounded
    up to a multiple of it (train.pad_to_multiple_of: a few widths recur, not a new shape per batch);
    the tail is padding, masked, scoring nothing. ("varlen" is one row of exactly its tokens: the flash
    kernels take any length.) shard (parts, part): the width is padded to a multiple of `parts` too and
    the batch's `columns` are the part-th of them (sequence parallelism); (1, 0): all of it."""
    masked = packing in ("block_mask", "flex")
    units = _units(pairs, share_prefix and masked)
    unit_lengths = [sum(len(seg.ids) for seg in unit) for unit in units]
    if packing == "varlen":
        layout = [list(range(len(units)))]
    elif masked:
        layout = pack_rows(unit_lengths, max(unit_lengths))
    else:
        layout = [[u] for u in range(len(units))]
    parts, part = shard
    multiple = parts if packing == "varlen" else math.lcm(multiple_of, parts)
    width = -(-max(sum(unit_lengths[u] for u in row) for row in layout) // multiple) * multiple
    shape = (len(layout), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    response_mask = torch.zeros(shape, dtype=torch.bool)
    seq_index = torch.full(shape, -1, dtype=torch.long)
    unit_index = torch.full(shape, -1, dtype=torch.long)
    side = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(layout):
        start = 0
        for u in row:
            for seg in units[u]:
                n = len(seg.ids)
                input_ids[r, start : start + n] = torch.tensor(seg.ids)
                position_ids[r, start : start + n] = torch.arange(seg.first_position, seg.first_position + n)
                response_mask[r, start + seg.response_from : start + n] = True
                seq_index[r, start : start + n] = seg.seq
                unit_index[r, start : start + n] = u
                side[r, start : start + n] = seg.side
                start += n
    lengths = [len(p.chosen.ids) for p in pairs] + [len(p.rejected.ids) for p in pairs]
    varlen = {}
    if packing == "varlen":
        order = layout[0]
        varlen = dict(cu_seq_lens=torch.tensor(np.cumsum([0] + [unit_lengths[u] for u in order]), dtype=torch.int32),
                      max_length=max(unit_lengths))
    return MicroBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        response_mask=response_mask,
        seq_index=seq_index,
        unit_index=unit_index,
        side=side,
        seq_lengths=torch.tensor(lengths, dtype=torch.long),
        index=torch.tensor([p.index for p in pairs], dtype=torch.long),
        weight=torch.tensor(weights if weights is not None else [1.0] * len(pairs), dtype=torch.float32),
        packing=packing,
        columns=None if parts == 1 else (part * width // parts, (part + 1) * width // parts),
        **varlen,
    )


def split_evenly(positions: list[int], parts: int) -> list[list[int]]:
    """Contiguous split into `parts` lists whose sizes differ by at most one."""
    base, extra = divmod(len(positions), parts)
    out, start = [], 0
    for p in range(parts):
        size = base + (p < extra)
        out.append(positions[start : start + size])
        start += size
    return out


def rank_share(
    positions: list[int], world_size: int, rank: int, num_micro: int
) -> list[tuple[list[int], list[float]]]:
    """This rank's `num_micro` micro-batches of a step: (positions, weights), never empty."""
    parts = split_evenly(positions, world_size * num_micro)
    share = []
    for k in range(num_micro):
        part = parts[k * world_size + rank]
        share.append((part, [1.0] * len(part)) if part else ([positions[0]], [0.0]))
    return share


class StepPlan:
    """The shuffled order of the training pairs, cut into global batches (optimizer steps).

    The last, shorter batch of an epoch is kept; its loss is still the mean over its own pairs.
    """

    def __init__(self, num_pairs: int, global_batch: int, seed: int):
        self.num_pairs = num_pairs
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = -(-num_pairs // global_batch)

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_pairs, generator=generator).tolist()

    def step_positions(self, step: int) -> tuple[int, list[int]]:
        """(epoch, positions into the pair list) of global step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return epoch, order[k * self.global_batch : (k + 1) * self.global_batch]


def eval_batches(num_pairs: int, batch_size: int, world_size: int, rank: int):
    """This rank's share of a sequential pass over all pairs (evaluation, reference pass)."""
    positions = list(range(num_pairs))
    chunk = batch_size * world_size
    for start in range(0, num_pairs, chunk):
        yield from rank_share(positions[start : start + chunk], world_size, rank, 1)
