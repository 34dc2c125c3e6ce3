"""The DCP rule as tensor functions: keep counts, the global selection, the utility update, the decay.

This module is the ground floor of the package (it imports nothing of ``dcp_kernels``): the
controller (:mod:`dcp_kernels.propagation`) applies the rule to a model's layers, and the backends'
gates call :func:`update_utilities`. ``docs/algorithm.md`` defines every rule here.

GPU-first: :class:`SelectionRule` builds its device constants (layer sizes, floors, which group each
channel belongs to) once, so a selection step is a fixed handful of device ops with no host read and
no host-to-device upload. Its :meth:`SelectionRule.indices` turns the masks into per-group index
vectors with one sort and exactly one device-to-host copy (of all groups' counts together).
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch


def check_prune_ratio(prune_ratio: float) -> None:
    if not isinstance(prune_ratio, (int, float)) or isinstance(prune_ratio, bool) or not (0.0 <= prune_ratio < 1.0):
        raise ValueError(f"prune_ratio must be a number in [0, 1), got {prune_ratio!r}")


def check_round_to(round_to: int) -> None:
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1 (1: the paper's exact rule; 8: widths in multiples of 8), "
                         f"got {round_to!r}")


def keep_count(total: int, prune_ratio: float) -> int:
    """Channels kept: ``total - round(total * prune_ratio)``, rounding halves up."""
    check_prune_ratio(prune_ratio)
    return total - int(math.floor(total * prune_ratio + 0.5))


def _per_layer(value: int | Sequence[int], n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"expected {n} per-layer values, got {len(values)}")
    return values


class SelectionRule:
    """The global selection for fixed group sizes, floors and keep counts, as reusable device ops.

    Args:
        sizes: channels per group (layers, or coupled groups sharing one selection), in order.
        keep: channels kept by the global selection among the *free* groups.
        floors: per group, channels it always keeps (its best ones), capped at its size.
        fixed: per group, a keep count of its own outside the global selection, or ``None`` (free).
        round_to: every group's kept width becomes a multiple of this (docs/algorithm.md,
            "round_to": the nearest multiple of the exact rule's count, halves up, at least the
            smallest multiple holding the floor, at most the group); 1 is the paper's exact rule.
        blocks: per group, the number of equal blocks its channels form (a space read or written
            by a grouped conv, docs/algorithm.md "Grouped convolutions"; 1: no blocks). A blocked
            group's width is rounded to a multiple of ``lcm(round_to, blocks)`` and it keeps the
            same number of channels, its best ones, in every block.

    Calling it with the concatenated utilities (one per channel of every group) returns the bool
    mask of the selected channels. The device constants are built on first use per device and
    reused: a call uploads nothing and reads nothing back to the host.
    """

    def __init__(self, sizes: Sequence[int], keep: int, floors: int | Sequence[int] = 1,
                 fixed: Sequence[int | None] | None = None, round_to: int = 1,
                 blocks: int | Sequence[int] = 1) -> None:
        check_round_to(round_to)
        self.sizes = [int(s) for s in sizes]
        n = len(self.sizes)
        self.blocks = [int(b) for b in _per_layer(blocks, n)]
        for size, b in zip(self.sizes, self.blocks):
            if b < 1 or size % b:
                raise ValueError(f"a group of {size} channels cannot form {b} equal blocks")
        self.floors = [min(int(f), s) for f, s in zip(_per_layer(floors, n), self.sizes)]
        self.fixed = list(fixed) if fixed is not None else [None] * n
        if len(self.fixed) != n:
            raise ValueError(f"expected {n} per-group keep counts, got {len(self.fixed)}")
        self.total = sum(self.sizes)
        free = [g for g in range(n) if self.fixed[g] is None]
        free_total = sum(self.sizes[g] for g in free)
        self.free_floor = sum(self.floors[g] for g in free)
        self.keep = int(keep)
        if not (self.free_floor <= self.keep <= free_total):
            raise ValueError(f"cannot keep {self.keep} of {free_total} channels when the per-layer minimums "
                             f"already need {self.free_floor}")
        self.round_to = round_to
        # What the rule depends on: a rule built with the same (a controller's reloaded state) is
        # the same rule, and keeps its device constants (see Propagation._set_keep).
        self.config = (tuple(self.sizes), self.keep, tuple(self.floors), tuple(self.fixed), round_to, tuple(self.blocks))
        self._constants: dict[torch.device, _Constants] = {}
        self._capacity_cache: tuple | None = None  # see _capacity_constants

    def _device_constants(self, device: torch.device) -> "_Constants":
        const = self._constants.get(device)
        if const is None:
            const = self._constants[device] = self._build_constants(device)
        return const

    def _build_constants(self, device: torch.device) -> "_Constants":
        n = len(self.sizes)
        sizes = torch.tensor(self.sizes, device=device)
        group_of = torch.repeat_interleave(torch.arange(n, device=device), sizes, output_size=self.total)
        start = torch.cumsum(sizes, 0) - sizes
        positions = torch.arange(self.total, device=device)
        # Per group: how many of its best channels it keeps outright (a free group its floor, a
        # fixed group its own count) and whether it takes part in the global selection.
        prefix = torch.tensor([f if k is None else max(int(k), f) for k, f in zip(self.fixed, self.floors)],
                              device=device)
        free = torch.tensor([int(k is None) for k in self.fixed], device=device)
        # The unit a group's width is a multiple of; the smallest width holding its floor.
        units = [math.lcm(self.round_to, b) for b in self.blocks]
        lowest = [min(s, -(-max(f, 1) // u) * u) for s, f, u in zip(self.sizes, self.floors, units)]
        # Blocks: consecutive runs of size / blocks channels, numbered over all groups in order (a
        # group without blocks is one block), so a channel's rank in its block comes from the same
        # stable-sort trick as its rank in its group.
        block_sizes = torch.tensor([s // b for s, b in zip(self.sizes, self.blocks) for _ in range(b)], device=device)
        block_of = torch.repeat_interleave(torch.arange(len(block_sizes), device=device), block_sizes,
                                           output_size=self.total)
        block_start = torch.cumsum(block_sizes, 0) - block_sizes
        return _Constants(
            sizes=sizes, start=start,
            per_channel=torch.stack([group_of, prefix[group_of], free[group_of], block_of]),
            start_of=start[group_of], group_local=positions - start[group_of],
            block_local=positions - block_start[block_of],
            unit=torch.tensor(units, device=device), lowest=torch.tensor(lowest, device=device),
            blocks=torch.tensor(self.blocks, device=device),
            key_selected=group_of * 2, key_unselected=group_of * 2 + 1,
            first_unselected_key=torch.arange(n, device=device) * 2 + 1,
        )

    def __call__(self, utilities: torch.Tensor) -> torch.Tensor:
        if utilities.dim() != 1 or utilities.numel() != self.total:
            raise ValueError(f"utilities has shape {tuple(utilities.shape)} but the layers hold {self.total} channels")
        c = self._device_constants(utilities.device)
        u = torch.nan_to_num(utilities.float(), nan=-math.inf)
        order = torch.sort(u, descending=True, stable=True).indices  # ties: lower index first
        # One gather of every per-channel constant into the sorted order.
        group_sorted, prefix_sorted, free_sorted, block_sorted = c.per_channel[:, order].unbind(0)
        # Rank of each sorted entry inside its own group: group the sorted positions by group
        # (stable, so each group stays in descending-utility order); in that grouped order the
        # entries sit exactly where the group's channels do, so their ranks are the constant
        # positions within the group.
        rank = torch.empty_like(order).index_put_((torch.sort(group_sorted, stable=True).indices,), c.group_local)
        prefix = rank < prefix_sorted  # a free group's floor, a fixed group's whole count
        rest = free_sorted > prefix  # free and not yet taken (0/1 against False/True)
        take = rest & (torch.cumsum(rest, 0, dtype=torch.long) <= self.keep - self.free_floor)
        chosen = prefix | take
        if self.round_to > 1 or max(self.blocks) > 1:
            count = torch.zeros_like(c.sizes).index_add_(0, group_sorted, chosen.long())
            width = torch.minimum(torch.maximum((count + c.unit // 2) // c.unit * c.unit, c.lowest), c.sizes)
            if max(self.blocks) > 1:
                # Equal counts per block: each block keeps its width / blocks best channels.
                block_rank = torch.empty_like(order).index_put_(
                    (torch.sort(block_sorted, stable=True).indices,), c.block_local)
                chosen = block_rank < (width // c.blocks)[group_sorted]
            else:
                chosen = rank < width[group_sorted]
        return torch.empty_like(chosen).index_put_((order,), chosen)

    def _kept_first_order(self, mask: torch.Tensor) -> tuple["_Constants", torch.Tensor, torch.Tensor]:
        """(device constants, sort keys, channel order) of one stable sort of ``mask`` by (group,
        unselected): every group's channels stay in their own range, the selected ones first, each
        part in increasing order. The one sort :meth:`indices`, :meth:`kept_first` and
        :meth:`capacity_indices` start from."""
        c = self._device_constants(mask.device)
        keys, order = torch.sort(torch.where(mask, c.key_selected, c.key_unselected), stable=True)
        return c, keys, order

    @staticmethod
    def _kept_counts(c: "_Constants", keys: torch.Tensor) -> torch.Tensor:
        """Every group's selected count, on the device: group g's selected channels end where its first
        unselected key (2g + 1) begins."""
        return torch.searchsorted(keys, c.first_unselected_key) - c.start

    def indices(self, mask: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
        """Per group, the sorted indices of its selected channels in ``mask``, and the counts.

        One stable sort of the mask by (group, unselected) puts every group's selected channels
        first, in increasing order; one host read (:func:`host_read`) of all groups' counts then
        cuts the per-group vectors out in one copy op. A ``nonzero`` per layer would sync once each.
        """
        c, keys, order = self._kept_first_order(mask)
        # The key sorts by group first, so the entries of group g occupy its own channel range:
        # subtracting the group starts (a per-position constant) gives indices within the group.
        local = order - c.start_of
        counts = host_read(self._kept_counts(c, keys))
        # Separate tensors (one copy op), not views of `local`: torch.compile treats a view's size as
        # its base's slice and would not keep the kept widths symbolic (a recompile per new width).
        parts = torch.split_with_sizes_copy(local, [n for k, s in zip(counts, self.sizes) for n in (k, s - k)])
        return list(parts[0::2]), counts


    def kept_first(self, mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per group, a permutation of its channels with the selected ones first (each part in
        increasing order), and every group's selected count as an int32 device vector.

        The static-shape form of :meth:`indices` (:func:`kept_first`): the same one sort, no
        host read, and shapes that do not depend on the selection."""
        c, keys, order = self._kept_first_order(mask)
        return list(torch.split(order - c.start_of, self.sizes)), self._kept_counts(c, keys).to(torch.int32)


    def capacity_indices(self, mask: torch.Tensor, capacities) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                         list[int]]:
        """Per group, a sorted index vector of fixed length (its *capacity*) holding its selected
        channels and, as padding, its lowest-numbered unselected ones; whether each entry is
        selected (one bool vector, all groups concatenated); and the kept counts.

        ``capacities(counts)`` maps the groups' kept counts (host ints, from the step's one host
        read) to their capacities (each between its count and its size). One sort puts each
        group's selected channels first; its first ``capacity`` entries, sorted again (one sort for
        all groups: their channel ranges are disjoint), are the slots. docs/algorithm.md, "Static
        capacity widths"."""
        c, keys, order = self._kept_first_order(mask)
        counts = host_read(self._kept_counts(c, keys))
        caps = [int(k) for k in capacities(counts)]
        if any(not (n <= k <= s) for n, k, s in zip(counts, caps, self.sizes)):
            raise ValueError(f"capacities {caps} must lie between the kept counts {counts} and the sizes {self.sizes}")
        positions, starts = self._capacity_constants(tuple(caps), mask.device)
        ids = torch.sort(order.index_select(0, positions)).values
        return list(torch.split(ids - starts, caps)), mask.index_select(0, ids), counts

    def _capacity_constants(self, caps: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions of each group's first ``cap`` entries in the kept-first order, each slot's group
        start), built once per set of capacities (they change rarely)."""
        key = (caps, device)
        cached = self._capacity_cache
        if cached is None or cached[0] != key:
            starts = [sum(self.sizes[:g]) for g in range(len(self.sizes))]
            positions = [st + j for st, k in zip(starts, caps) for j in range(k)]
            slot_starts = [st for st, k in zip(starts, caps) for _ in range(k)]
            cached = self._capacity_cache = (key, torch.tensor(positions, device=device),
                                             torch.tensor(slot_starts, device=device))
        return cached[1], cached[2]


def capacity_for(count: int, size: int, multiple: int) -> int:
    """The capacity a group of ``size`` channels gets for ``count`` kept ones: ``count`` plus 1/16
    headroom (so that the small step-to-step changes of a count fit), rounded up to ``multiple``,
    at most ``size``."""
    return min(size, -(-(count + count // 16) // multiple) * multiple)


class _Constants(NamedTuple):
    """A :class:`SelectionRule`'s device constants, built once per device."""

    sizes: torch.Tensor  # per group
    start: torch.Tensor  # per group: its first channel
    per_channel: torch.Tensor  # (4, total): group, outright keep count, free (0/1), block of each channel
    start_of: torch.Tensor  # per channel: its group's first channel
    group_local: torch.Tensor  # per channel: its position within its group
    block_local: torch.Tensor  # per channel: its position within its block
    unit: torch.Tensor  # per group: its width is a multiple of this
    lowest: torch.Tensor  # per group: the smallest width holding its floor
    blocks: torch.Tensor  # per group
    key_selected: torch.Tensor  # per channel: 2 * group (sort key of a selected channel)
    key_unselected: torch.Tensor  # per channel: 2 * group + 1
    first_unselected_key: torch.Tensor  # per group: 2 * g + 1


def select_channels(
    utilities: torch.Tensor,
    layer_sizes: Sequence[int],
    keep: int,
    min_channels: int | Sequence[int] = 1,
    round_to: int = 1,
    blocks: int | Sequence[int] = 1,
) -> torch.Tensor:
    """The global selection rule; returns a bool mask over the concatenated channels.

    Exactly ``keep`` channels are selected (``round_to=1``). Each layer first keeps its
    ``min_channels`` best channels (capped at its size); the remaining slots go to the highest
    utilities over the whole network. Ties go to the lower global index (layers in order, channels
    in order). NaN utilities rank below everything. With ``round_to > 1`` each layer's count is then
    rounded (docs/algorithm.md, "round_to") and the layer keeps that many of its best channels.
    A layer with ``blocks > 1`` (read or written by a grouped conv) keeps equal counts per block
    (docs/algorithm.md, "Grouped convolutions").

    One stable sort over the concatenated vector plus a few vector ops: no Python loop over
    channels or layers. A controller keeps one :class:`SelectionRule` instead of calling this.
    """
    sizes = [int(s) for s in layer_sizes]
    if sum(sizes) != utilities.numel() or utilities.dim() != 1:
        raise ValueError(f"utilities has shape {tuple(utilities.shape)} but the layers hold {sum(sizes)} channels")
    return SelectionRule(sizes, keep, min_channels, round_to=round_to, blocks=blocks)(utilities)


def kept_first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, count)`` of a bool channel mask: the channel indices with the selected ones first
    (both parts in increasing order) and the selected count as an int32 (1,) tensor.

    The selection in a form whose shapes never change (for CUDA graphs and the Triton kernels that
    read the count on the device): two launches, no host read."""
    order = torch.sort(mask.logical_not().to(torch.uint8), stable=True).indices
    return order, mask.sum(dtype=torch.int32).view(1)


def host_read(counts: torch.Tensor) -> list[int]:
    """The one device-to-host copy of a step: a small integer vector to Python ints.

    Every read of device values that a training step needs goes through here, so a test can count
    them (tests/test_syncs.py) and they cannot multiply unnoticed.
    """
    return counts.tolist()


class _Pause:
    """Nesting depth of :func:`paused_utility_updates`. Process-wide, not thread-local: autograd runs a
    CUDA backward on its own device threads, which must see it too (so it pauses other threads'
    backward passes as well)."""

    depth = 0
    lock = threading.Lock()


def utility_updates_paused() -> bool:
    """Whether backward passes leave the utilities alone now (read by every gate's backward)."""
    return _Pause.depth > 0


@contextlib.contextmanager
def paused_utility_updates() -> Iterator[None]:
    """Backward passes run inside leave every DCP layer's utilities as they are (see
    :meth:`dcp_kernels.Propagation.no_utility_updates`)."""
    with _Pause.lock:
        _Pause.depth += 1
    try:
        yield
    finally:
        with _Pause.lock:
            _Pause.depth -= 1


@torch.no_grad()
def update_utilities(utility: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None, decay: float,
                     only: torch.Tensor | None = None) -> None:
    """``U[idx] = decay * U[idx] + v / max(v)`` in place (``v = 0`` when ``max(v) == 0``, never NaN).

    ``v`` holds the raw importances of the channels ``idx`` (all channels when ``idx`` is None);
    the max-normalisation is per layer, over the selected channels (unselected ones are 0).
    ``only`` (bool, one per entry of ``v``): update those entries alone, the others (capacity
    padding slots, which hold unselected channels and ``v = 0``) keep their utility undecayed.
    """
    # Written for few kernel launches (each is a GPU launch per layer per step): 0/0 -> NaN -> 0
    # gives "v = 0 when max(v) == 0" without a comparison and a select; add(alpha=) fuses the decay.
    v = torch.nan_to_num_(v.float() / v.max(), nan=0.0, posinf=0.0, neginf=0.0)
    if only is not None:
        old = utility if idx is None else utility.index_select(0, idx)
        new = torch.where(only, torch.add(v, old, alpha=decay), old)
        if idx is None:
            utility.copy_(new)
        else:
            utility.index_copy_(0, idx, new)
    elif idx is None:
        utility.mul_(decay).add_(v)
    else:
        utility.index_copy_(0, idx, torch.add(v, utility.index_select(0, idx), alpha=decay))


class UtilityUpdates:
    """The utility updates of one backward pass, applied to every layer at once when it ends.

    Each layer's backward leaves its raw importances ``v`` (float32, 0 outside its selection) in its
    row of a padded ``(layers, widest)`` buffer (:meth:`pending_row`); when the backward pass ends (an
    autograd final callback, queued by the first layer that contributes) one network-wide update
    applies :func:`update_utilities` to every layer that contributed: ``U = decay * U + v / max(v)``
    on its selected channels (``layer.selected``), the others unchanged. Seven ops for the whole
    network instead of five per layer (one kernel per layer on the static Triton step): on a GPU each
    launch per layer and step costs about as much as a small layer's convolution
    (docs/benchmarks-gpu.md). Under ``torch.compile`` (a traced backward
    queues no callback) and outside a backward pass, :meth:`pending_row` answers None and the caller
    updates at once, as before.

    ``layers`` are the controller's prunable layers (anything with ``utility``, ``selected`` and
    ``decay``). Nothing here is state: pickling drops the buffers.
    """

    def __init__(self, layers: Sequence) -> None:
        self.layers = list(layers)
        self._reset()

    def _reset(self) -> None:
        self._pending: torch.Tensor | None = None  # (layers, widest) float32
        self._selected: torch.Tensor | None = None  # (layers, widest) bool, scratch
        self._contributed: dict[int, bool] = {}  # rows written in the pass under way -> written in full
        self._stale: set[int] = set()  # rows still holding an applied pass's values (others are zero)
        self._task = -2  # the autograd graph task whose end will apply the updates
        self._factors: tuple[float, torch.Tensor, torch.Tensor] | None = None  # see _factor_values

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pending=None, _selected=None, _contributed={}, _stale=set(), _task=-2, _factors=None)
        return state

    def pending_row(self, slot: int, *, full: bool) -> torch.Tensor | None:
        """Row ``slot``'s float32 buffer (one entry per channel) for the raw importances of this
        backward pass, or None when the caller must update at once (no backward pass under way, or a
        traced one). ``full``: the caller writes every entry; else the row comes zeroed and the caller
        writes the selected channels only. A layer contributing twice in one pass (a module called
        twice) has its first contribution applied first, as an immediate update would."""
        if torch.compiler.is_compiling():
            return None
        task = torch._C._current_graph_task_id()
        if task < 0:
            return None
        pending = self._buffers()
        if task != self._task:
            self.flush()  # an earlier pass stopped before its end (an error): apply what it measured
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._apply)
        elif slot in self._contributed:
            self._apply_rows({slot: self._contributed.pop(slot)})
        if not full and slot in self._stale:
            pending[slot].zero_()
        self._stale.discard(slot)
        self._contributed[slot] = full
        return pending[slot, : self.layers[slot].utility.numel()]

    def _buffers(self) -> torch.Tensor:
        device = self.layers[0].utility.device
        if self._pending is None or self._pending.device != device:
            shape = (len(self.layers), max(layer.utility.numel() for layer in self.layers))
            self._reset()
            self._pending = torch.zeros(shape, dtype=torch.float32, device=device)
            self._selected = torch.zeros(shape, dtype=torch.bool, device=device)
        return self._pending

    def _factor_values(self, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(decay, 1.0) as device scalars, made once per decay value: ``where`` with Python numbers
        would fill two new device scalars every step."""
        if self._factors is None or self._factors[0] != decay or self._factors[1].device != self._pending.device:
            values = torch.tensor([decay, 1.0], device=self._pending.device)
            self._factors = (decay, values[0], values[1])
        return self._factors[1], self._factors[2]

    def flush(self) -> None:
        """Apply the measurements of a backward pass that stopped before its end (an error in a
        hook, out of memory): the layers whose backward ran update their utilities, as they would
        have at once. Called before each selection; nothing to do (no launch) otherwise."""
        if self._contributed:
            self._apply()

    def _apply(self) -> None:
        rows, self._contributed, self._task = self._contributed, {}, -2
        if rows:
            self._apply_rows(rows)

    @torch.no_grad()
    def _apply_rows(self, rows: dict[int, bool]) -> None:
        """:func:`update_utilities` for ``rows`` (slot -> written in full) from their pending
        importances. Rows written in part are zeroed after use, rows written in full marked stale."""
        pending = self._pending
        slots = list(rows)
        layers = [self.layers[s] for s in slots]
        widths = [layer.utility.numel() for layer in layers]
        # Per-row max-normalisation; 0/0 -> NaN -> 0 gives "v = 0 when max(v) == 0" (update_utilities).
        normalised = torch.nan_to_num_(pending / pending.amax(dim=1, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)
        selected_rows = [self._selected[s, :w] for s, w in zip(slots, widths)]
        torch._foreach_copy_(selected_rows, [layer.selected for layer in layers])
        decays = {float(layer.decay) for layer in layers}
        if len(decays) == 1:  # the controller's schedule: one decay for all layers
            factor = torch.where(self._selected, *self._factor_values(decays.pop()))
            factors = [factor[s, :w] for s, w in zip(slots, widths)]
        else:
            factors = [torch.where(row, float(layer.decay), 1.0) for row, layer in zip(selected_rows, layers)]
        utilities = [layer.utility for layer in layers]
        torch._foreach_mul_(utilities, factors)
        torch._foreach_add_(utilities, [normalised[s, :w] for s, w in zip(slots, widths)])
        partial = [s for s in slots if not rows[s]]
        if len(partial) == len(self.layers):
            pending.zero_()
        else:
            for s in partial:
                pending[s].zero_()
        self._stale.update(s for s in slots if rows[s])


@dataclass
class DecaySchedule:
    """Utility decay ``d`` per epoch: ``start``, ``+step`` at each milestone, ``1.0`` from ``final`` on."""

    start: float = 0.6
    step: float = 0.1
    milestones: tuple[int, ...] = ()
    final: int | None = None

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        if not (0.0 <= self.start <= 1.0):
            raise ValueError(f"decay start must be in [0, 1], got {self.start}")
        if self.step < 0:
            raise ValueError(f"decay step must be >= 0, got {self.step}")

    def at(self, epoch: int) -> float:
        if self.final is not None and epoch >= self.final:
            return 1.0
        return min(1.0, self.start + self.step * sum(1 for m in self.milestones if epoch >= m))
