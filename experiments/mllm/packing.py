"""Packed training sequences of the multimodal job (``data.max_packed_tokens > 0``).

InternVL's fine-tuning recipe packs conversations into sequences of 8192 tokens instead of padding
each to the longest; this module does it for the job's training steps without changing what a step
trains on. A step takes the same `batch_size` conversations as without packing (the same
`experiments.engine.batches.EpochBatches` rows: compute matching, the experts' budgets and exact
resume are unchanged) and lays them end to end, first-fit-decreasing, into rows of
`max_packed_tokens` tokens, never splitting a conversation. Each conversation becomes one segment
of its row (`segment_ids` 1, 2, .. in the row, 0 = padding; `positions` restart at 0), which
`dfm.models.MultimodalModel` attends within (`Decoder.hidden_states`), so its logits, and the mean
cross entropy over the answer tokens (`experiments.mllm.modeling.llava_loss`), are those of the
padded layout.

Fixed shapes (XLA compiles one step program per stage): the number of rows per step is the maximum
the first-fit-decreasing packing needs over all steps of the stage (`plan_rows`), known before the
stage starts since the batches are a pure function of the step. Gradient accumulation
(``numerics.microbatches = m``) cuts a batch's leading axis into m slices
(`dfm.train.steps.value_and_grads`): the conversations are therefore split into the same m groups
as the padded batch's slices, each packed into its own `rows / m` rows, and the pixels of group g
fill the g-th slice of the pixel array, so every slice holds exactly the conversations (and images)
of the padded slice. Images: the pipeline has exactly one image per conversation
(`experiments.mllm.data`), so a step still has `batch_size` images; they are listed in packed token
order, the order in which `MultimodalModel.embed_inputs` scatters image features (row-major).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dfm.sharding import batch_spec
from experiments.engine.training import training_mesh


def conversation_lengths(tokens: np.ndarray, loss_mask: np.ndarray, pad_id: int | None,
                         image_token_id: int) -> np.ndarray:
    """Tokens each padded conversation needs, `[N]` int64.

    Args:
      tokens: `[N, L]` int ids, right-padded with `pad_id` (`experiments.mllm.data` arrays).
      loss_mask: `[N, L]` bool, True = answer token (a target of the loss).
      pad_id: the padding id (None: no padding id, every row is full length).
      image_token_id: id of the image placeholder.
    Returns:
      `1 + max(last non-pad token, last target, last image token)` per row: every target and every
      image token lies in the first `length` tokens, so keeping only them changes neither the loss
      (later tokens never reach earlier logits under causal attention) nor the image scatter (even
      when the padding id equals a real id, e.g. EOS).
    """
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask, bool)
    index = np.arange(tokens.shape[1])

    def last(flags):
        return np.where(flags.any(axis=1), np.max(np.where(flags, index, -1), axis=1), -1)

    real = np.ones_like(tokens, bool) if pad_id is None else tokens != pad_id
    ends = np.maximum.reduce([last(real), last(loss_mask), last(tokens == image_token_id)])
    return (np.maximum(ends, 0) + 1).astype(np.int64)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin packing of items of `lengths` into bins of `capacity` (first fit, longest first).

    Items are taken by decreasing length (ties: lower index first), each into the first bin with
    room, a new bin when none has. Deterministic. Returns the bins as lists of item indices, each
    sorted ascending; every item appears once; no bin's total exceeds `capacity`.

    Raises:
      ValueError: an item longer than `capacity`, or a non-positive `capacity` / length.
    """
    lengths = np.asarray(lengths, np.int64)
    if capacity < 1:
        raise ValueError(f"capacity: must be >= 1, got {capacity}")
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"lengths: every item must be in [1, capacity={capacity}], got "
                         f"[{lengths.min()}, {lengths.max()}]")
    room: list[int] = []
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        size = int(lengths[i])
        for b, free in enumerate(room):
            if free >= size:
                room[b] -= size
                bins[b].append(i)
                break
        else:
            room.append(capacity - size)
            bins.append([i])
    return [sorted(b) for b in bins]


def group_bins(lengths: Sequence[int], capacity: int, groups: int) -> list[list[list[int]]]:
    """`first_fit_decreasing` of each of `groups` equal consecutive slices of `lengths` (the
    microbatch slices), with item indices into the whole `lengths`.

    Raises:
      ValueError: `groups` does not divide the number of items (or as `first_fit_decreasing`).
    """
    n = len(lengths)
    if groups < 1 or n % groups:
        raise ValueError(f"groups: must divide the {n} conversations of a step, got {groups}")
    size = n // groups
    out = []
    for g in range(groups):
        lo = g * size
        out.append([[lo + i for i in b] for b in first_fit_decreasing(lengths[lo:lo + size], capacity)])
    return out


@dataclass(frozen=True)
class PackingPlan:
    """The fixed packed shape of a stage and what it saves.

    Attributes:
      capacity: tokens per packed row (``data.max_packed_tokens``).
      rows: packed rows per step (a multiple of `groups`; the same at every step).
      groups: microbatch slices, each packed into `rows // groups` rows.
      batch_size: conversations per step; max_length: the padded layout's row length.
      steps: steps planned over; mean_real_tokens: mean tokens of a step's conversations.
    """

    capacity: int
    rows: int
    groups: int
    batch_size: int
    max_length: int
    steps: int
    mean_real_tokens: float

    def summary(self) -> dict:
        """Tokens processed per step packed vs padded and the fraction saved (JSON-ready)."""
        packed, padded = self.rows * self.capacity, self.batch_size * self.max_length
        return {"max_packed_tokens": self.capacity, "rows_per_step": self.rows, "groups": self.groups,
                "planned_steps": self.steps, "tokens_per_step_packed": packed, "tokens_per_step_padded": padded,
                "saved_fraction": 1.0 - packed / padded,
                "real_token_fraction_packed": self.mean_real_tokens / packed,
                "real_token_fraction_padded": self.mean_real_tokens / padded}

    def describe(self) -> str:
        """One log line: rows, tokens per step packed vs padded, the change and the real-token fill."""
        s = self.summary()
        saved = s["saved_fraction"]
        change = f"{saved:.1%} fewer" if saved >= 0 else f"{-saved:.1%} MORE (a smaller max_packed_tokens may fit better)"
        return (f"{self.rows} rows x {self.capacity} tokens per step ({s['tokens_per_step_packed']} tokens) instead "
                f"of {self.batch_size} x {self.max_length} ({s['tokens_per_step_padded']}): "
                f"{change} tokens processed; real tokens fill "
                f"{s['real_token_fraction_packed']:.1%} of the packed rows vs "
                f"{s['real_token_fraction_padded']:.1%} padded")


def plan_rows(batches, lengths: np.ndarray, steps: int, capacity: int, max_length: int, *, groups: int = 1,
              row_multiple: int = 1) -> PackingPlan:
    """The rows per step that fit every step `0 .. steps - 1` of `batches`.

    Args:
      batches: `EpochBatches` (or anything with `indices(step) -> [batch_size]` rows and
        `batch_size`) over the conversations whose lengths are `lengths [num]`.
      steps: the stage's optimizer steps (>= 1).
      capacity: tokens per packed row; max_length: tokens per padded row (for the summary).
      groups: microbatch slices (divides `batches.batch_size`).
      row_multiple: each group's row count is rounded up to a multiple of this (the batch mesh
        axes' size, which must divide every slice).
    Returns:
      `PackingPlan` with `rows = groups * max over steps and groups of the bins needed`, rounded.
    """
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    lengths = np.asarray(lengths, np.int64)
    most, real = 1, 0
    for step in range(steps):
        step_lengths = lengths[batches.indices(step)]
        real += int(step_lengths.sum())
        most = max(most, max(len(b) for b in group_bins(step_lengths, capacity, groups)))
    most = -(-most // row_multiple) * row_multiple
    return PackingPlan(capacity, groups * most, groups, int(batches.batch_size), max_length, steps, real / steps)


def pack_batch(tokens: np.ndarray, loss_mask: np.ndarray, lengths: np.ndarray, pixels: np.ndarray, *,
               capacity: int, rows: int, groups: int = 1, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pack one step's padded conversations into `rows` rows of `capacity` tokens.

    Args:
      tokens, loss_mask: `[B, L]` the step's conversations (padded layout); lengths: `[B]` their
        token counts (`conversation_lengths`), each <= capacity.
      pixels: `[B, ...]` the image of each conversation (exactly one each).
      rows: packed rows (a multiple of `groups`); groups: microbatch slices (module doc).
      pad_id: token id of the padding.
    Returns:
      `{"tokens" [rows, capacity] int32, "mask" [rows, capacity] bool, "segment_ids" [rows,
      capacity] int32 (1.. per conversation in its row, 0 = padding), "positions" [rows, capacity]
      int32 (0.. in each segment, 0 on padding), "pixels" [B, ...] (in packed token order)}`. A
      conversation's first token is never a target (`mask` False there: its logit would read the
      previous segment's last token; the padded loss never counts position 0 either).
    Raises:
      ValueError: a group needs more than `rows // groups` rows (a plan made for other batches),
        or shapes that do not match.
    """
    tokens, loss_mask, lengths = np.asarray(tokens), np.asarray(loss_mask, bool), np.asarray(lengths, np.int64)
    b = len(tokens)
    if loss_mask.shape != tokens.shape or lengths.shape != (b,) or len(pixels) != b:
        raise ValueError(f"pack_batch: tokens {tokens.shape}, loss_mask {loss_mask.shape}, lengths {lengths.shape} "
                         f"and pixels {np.shape(pixels)} must describe the same {b} conversations")
    if rows % groups:
        raise ValueError(f"rows: must be a multiple of groups={groups}, got {rows}")
    per_group, images_per_group = rows // groups, b // groups
    out_tokens = np.full((rows, capacity), pad_id, np.int32)
    out_mask = np.zeros((rows, capacity), bool)
    segments = np.zeros((rows, capacity), np.int32)
    positions = np.zeros((rows, capacity), np.int32)
    order = np.empty(b, np.int64)
    for g, bins in enumerate(group_bins(lengths, capacity, groups)):
        if len(bins) > per_group:
            raise ValueError(f"rows: group {g} of this step needs {len(bins)} packed rows, the plan has "
                             f"{per_group} per group")
        slot = g * images_per_group
        for r, members in enumerate(bins):
            row, start = g * per_group + r, 0
            for s, i in enumerate(members):
                n = int(lengths[i])
                out_tokens[row, start:start + n] = tokens[i, :n]
                out_mask[row, start + 1:start + n] = loss_mask[i, 1:n]
                segments[row, start:start + n] = s + 1
                positions[row, start:start + n] = np.arange(n)
                order[slot] = i
                slot, start = slot + 1, start + n
    return {"tokens": out_tokens, "mask": out_mask, "segment_ids": segments, "positions": positions,
            "pixels": np.asarray(pixels)[order]}


def stage_steps_of(config, batches) -> tuple[list[str], int]:
    """`(stages, steps)`: the training stage whose batches `batches` are, and its steps.

    The engine builds each stage's `EpochBatches` with the stage's name (`stream`) and `steps`.
    Batches made elsewhere (no `steps`): no stage and an upper bound of every stage's steps,
    `max(stage1.steps, stage2.steps)` (experts get shares of stage2.steps), so the shape still fits
    every step.
    """
    if getattr(batches, "steps", None) is not None:
        return [batches.stream], int(batches.steps)
    return [], max(config.stage1.steps, config.stage2.steps)


def batch_rows_multiple(mesh_section) -> int:
    """Size of the batch mesh axes of the `[mesh]` section (1 unsharded): every packed slice's row
    count must be divisible by it, as the padded batch is (`dfm.sharding.global_batch`)."""
    mesh = training_mesh(mesh_section)
    if mesh is None:
        return 1
    axes = batch_spec(1, mesh)
    axes = axes[0] if len(axes) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
