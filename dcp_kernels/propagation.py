"""The controller: applies the DCP rule (:mod:`dcp_kernels.rule`) to a converted model's layers.

The rule (keep counts, the global selection, the utility update, the decay schedule) is tensor
functions in :mod:`dcp_kernels.rule`; this module holds :class:`Propagation`, which owns the
schedule, walks the layers, writes their selections and index vectors, and saves its state. The
kernels in :mod:`dcp_kernels.ops` only decide *how* channels are computed. Definitions:
``docs/algorithm.md``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import ops, reporting, rule
from .finalize import finalize as _finalize
from .modules import DCPConv2d, DCPLinear
from .ops.layer import Slots, _all_channels
from .plan import ConversionPlan  # noqa: F401  (re-exported: its historical home)
from .skipped_steps import SkippedSteps
from .rule import (  # noqa: F401  (re-exported: the rule's historical home)
    DecaySchedule,
    SelectionRule,
    UtilityUpdates,
    check_prune_ratio,
    check_round_to,
    keep_count,
    select_channels,
    update_utilities,
)

class Propagation:
    """The controller returned by :func:`dcp_kernels.convert`: owns selection and the schedule.

    Utilities and the current selection live in each layer's buffers (``utility``, ``selected``),
    so they are part of ``model.state_dict()``; this object's own :meth:`state_dict` holds the
    epoch counter and the schedule. Selection runs automatically before every training-mode
    forward of the converted model; call :meth:`epoch_end` once per epoch. ``round_to`` keeps every
    group's kept width a multiple of it (docs/algorithm.md, "round_to"; 1: the exact rule).

    A selecting step reads the device once (all groups' kept counts together, which the backends
    that size tensors on the host need); the selection itself runs entirely on the device.
    """

    def __init__(
        self,
        layers: Mapping[str, DCPConv2d],
        prune_ratio: float = 0.5,
        *,
        min_channels: int | Mapping[str, int] = 1,
        explore_epochs: int = 10,
        decay: float | DecaySchedule = 0.6,
        plan: ConversionPlan | None = None,
        groups: Sequence[Sequence[str]] | None = None,
        layer_prune_ratios: Mapping[str, float] | None = None,
        round_to: int = 1,
        blocks: Mapping[str, int] | None = None,
        static_shapes: bool = False,
        capacity_multiple: int = 8,
    ) -> None:
        check_prune_ratio(prune_ratio)
        if not layers:
            raise ValueError("Propagation needs at least one prunable DCPConv2d layer")
        if not isinstance(explore_epochs, int) or explore_epochs < 0:
            raise ValueError(f"explore_epochs must be an int >= 0, got {explore_epochs!r}")
        self.layer_names: list[str] = list(layers)
        self.layers: list[DCPConv2d] = list(layers.values())
        for name, layer in layers.items():
            if not layer.prunable:
                raise ValueError(f"layer {name!r} is not prunable (it has no utilities)")
        self.groups = self._resolve_groups(groups)
        self.min_channels = self._resolve_min_channels(min_channels)
        self.group_ratios = self._resolve_layer_ratios(layer_prune_ratios or {})
        self.group_blocks = self._resolve_blocks(blocks or {})
        self.prune_ratio = float(prune_ratio)
        check_round_to(round_to)
        self.round_to = round_to
        self._set_keep()
        self.explore_epochs = explore_epochs
        self.schedule = decay if isinstance(decay, DecaySchedule) else DecaySchedule(start=float(decay))
        self.epoch = 0
        self.steps = 0
        # Under an initialised process group of more than one rank (DDP), average the utilities over
        # the ranks (default group, one all_reduce) before each selection, so every rank selects the
        # same channels: every rank must then run the same number of selecting steps, as DDP's own
        # collectives require. False: each rank selects from its own utilities (its replicas then
        # train different networks; also for a forward that runs on one rank only).
        self.distributed = True
        # Select before every training-mode forward; False: the caller calls step() (accumulation).
        self.auto_select = True
        self.model: nn.Module | None = None
        self.plan = plan
        self._hook = None
        self._layout_hook = None  # convert(): the model also loads its original layout's state dicts
        self._index_holders: list | None = None  # what refresh_indices() updates (found at first use)
        self._dcp_layers: list = []  # every DCPConv2d of the model (found with the holders)
        # Grouped convs set_backend() moved to 'torch' (name -> the backend asked for).
        self.backend_fallbacks: dict[str, str] = {}
        self.static_shapes = False
        # Capacity widths (static_shapes on 'torch'): per group its slot count, the largest kept count
        # since the last epoch end, and its slot buffers (written in place while the capacity holds).
        if not isinstance(capacity_multiple, int) or isinstance(capacity_multiple, bool) or capacity_multiple < 1:
            raise ValueError(f"capacity_multiple must be an int >= 1 (8 suits tensor cores), got {capacity_multiple!r}")
        self.capacity_multiple = capacity_multiple
        self.capacity = False
        self._capacities: list[int | None] = [None] * len(self.groups)
        self._peaks = [0] * len(self.groups)
        self._slot_buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self.groups)
        # Selecting steps at which some capacity changed (each starts a new set of shapes).
        self.capacity_changes = 0
        # Write the slot vectors in place while a capacity holds (GraphedStep sets it: a captured
        # graph reads the tensors it was captured with). Off, every selection makes fresh ones, so
        # the tensors a forward saved for its backward stay valid across a later selection (two
        # forwards before one backward).
        self.slots_in_place = False
        # Every layer's backward leaves its utility measurement here; one update for all at the end.
        self.utility_updates = UtilityUpdates(self.layers)
        for slot, layer in enumerate(self.layers):
            layer._utility_updates = (self.utility_updates, slot)
        # The utilities at the start of the step under way, put back when that step is skipped.
        self.skipped_steps = SkippedSteps(self.layers)
        self._state_hooks: list = []  # attach(): saving the model settles a skipped step, loading forgets it
        self._apply_decay()
        if static_shapes:
            self.set_static_shapes(True)
        self._couple_layers()  # last: a controller that failed to build leaves the layers as they were

    def _couple_layers(self) -> None:
        """Hand every layer its group's other members: ``layer.set_selection()`` selects for them all."""
        for members in self.groups:
            for i in members:
                # In __dict__, not as attributes: nn.Module would register the layers as submodules.
                self.layers[i].__dict__["_coupled_layers"] = [self.layers[j] for j in members if j != i]

    # ----------------------------------------------------------------------------- configuration
    def _resolve_groups(self, groups: Sequence[Sequence[str]] | None) -> list[list[int]]:
        """Layer indices per selection group (every layer alone when ``groups`` is None)."""
        if groups is None:
            return [[i] for i in range(len(self.layers))]
        position = {n: i for i, n in enumerate(self.layer_names)}
        resolved, seen = [], set()
        for group in groups:
            unknown = [n for n in group if n not in position]
            if unknown or not group:
                raise ValueError(f"groups names unknown layers: {unknown or group}")
            idx = [position[n] for n in group]
            widths = {self.layers[i].out_channels for i in idx}
            if len(widths) != 1:
                raise ValueError(f"the layers of group {list(group)} have different widths {sorted(widths)}")
            if seen & set(idx):
                raise ValueError(f"a layer of group {list(group)} is in another group too")
            seen |= set(idx)
            resolved.append(idx)
        missing = [self.layer_names[i] for i in range(len(self.layers)) if i not in seen]
        if missing:
            raise ValueError(f"layers {missing} are in no group")
        return resolved

    def _resolve_layer_ratios(self, ratios: Mapping[str, float]) -> dict[int, float]:
        """Group index -> its own prune ratio, for the groups a layer of which is named."""
        unknown = set(ratios) - set(self.layer_names)
        if unknown:
            raise ValueError(f"layer_prune_ratios names unknown layers: {sorted(unknown)}")
        by_group: dict[int, float] = {}
        for g, members in enumerate(self.groups):
            named = {float(ratios[self.layer_names[i]]) for i in members if self.layer_names[i] in ratios}
            if len(named) > 1:
                raise ValueError(f"coupled layers {[self.layer_names[i] for i in members]} were given different "
                                 f"prune ratios {sorted(named)}; they share one selection")
            for r in named:
                check_prune_ratio(r)
                by_group[g] = r
        return by_group

    def _resolve_blocks(self, blocks: Mapping[str, int]) -> list[int]:
        """Per group, the number of equal blocks its channels form: the least common multiple of
        its layers' values (a layer read or written by a grouped conv; 1 elsewhere)."""
        unknown = set(blocks) - set(self.layer_names)
        if unknown:
            raise ValueError(f"blocks names unknown layers: {sorted(unknown)}")
        resolved = []
        for members in self.groups:
            count = 1
            for i in members:
                b = blocks.get(self.layer_names[i], 1)
                if not isinstance(b, int) or isinstance(b, bool) or b < 1:
                    raise ValueError(f"blocks for {self.layer_names[i]!r} must be an int >= 1, got {b!r}")
                count = math.lcm(count, b)
            width = self.layers[members[0]].out_channels
            if width % count:
                raise ValueError(f"the {width} channels of {self.layer_names[members[0]]!r} cannot form {count} "
                                 "equal blocks")
            resolved.append(count)
        return resolved

    def _set_keep(self) -> None:
        """Channels kept in total: the groups with their own ratio keep theirs, the rest share
        ``prune_ratio`` of their channels through the global selection."""
        sizes, floors = self._group_sizes(), self._group_floors()
        free = [g for g in range(len(sizes)) if g not in self.group_ratios]
        free_total = sum(sizes[g] for g in free)
        self.keep_free = keep_count(free_total, self.prune_ratio) if free else 0
        free_floors = sum(floors[g] for g in free)
        if self.keep_free < free_floors:
            raise ValueError(
                f"prune_ratio={self.prune_ratio} keeps {self.keep_free} of {free_total} channels, fewer than "
                f"the per-layer minimums ({free_floors}); lower prune_ratio or min_channels"
            )
        self.fixed_keep = {g: max(floors[g], keep_count(sizes[g], r)) for g, r in self.group_ratios.items()}
        self.keep = self.keep_free + sum(self.fixed_keep.values())
        rule = SelectionRule(sizes, self.keep_free, floors, [self.fixed_keep.get(g) for g in range(len(sizes))],
                             round_to=self.round_to, blocks=self.group_blocks)
        if getattr(getattr(self, "_rule", None), "config", None) != rule.config:
            self._rule = rule  # else the old one: a load_state_dict does not rebuild its device constants
        self._written = None  # what select() last wrote: ("all" | "selected", the masks' versions)
        self._counts: list[int] | None = None  # kept channels per group at that write (host ints)

    def _group_floors(self) -> list[int]:
        """Per group: the largest ``min_channels`` of its members, capped at its width."""
        sizes = self._group_sizes()
        return [min(max(self.min_channels[i] for i in members), size) for members, size in zip(self.groups, sizes)]

    def _resolve_min_channels(self, min_channels: int | Mapping[str, int]) -> list[int]:
        if isinstance(min_channels, Mapping):
            unknown = set(min_channels) - set(self.layer_names)
            if unknown:
                raise ValueError(f"min_channels names unknown layers: {sorted(unknown)}")
            values = [min_channels.get(n, 1) for n in self.layer_names]
        else:
            values = [min_channels] * len(self.layers)
        for name, v in zip(self.layer_names, values):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"min_channels for {name!r} must be an int >= 1, got {v!r}")
        return values

    @property
    def total_channels(self) -> int:
        """Selectable channels: coupled channels count once."""
        return sum(self._group_sizes())

    @property
    def decay(self) -> float:
        """The decay factor in force this epoch."""
        return self.schedule.at(self.epoch)

    @property
    def exploring(self) -> bool:
        return self.epoch < self.explore_epochs

    def _apply_decay(self) -> None:
        d = self.decay
        for layer in self.layers:
            layer.decay = d

    def set_backend(self, backend: str) -> None:
        """Switch every converted layer of the model to ``backend``.

        Grouped convs (1 < groups, not depthwise) go to ``torch`` instead when ``backend`` has no
        grouped kernel (``triton``, ``extension``): a ``UserWarning`` names them and
        :meth:`report` marks them (:attr:`backend_fallbacks`). Results are the same (every backend
        is tested against the reference); only the speed of those layers is ``torch``'s.
        """
        ops.resolve_backend(backend)  # a misspelt name fails before anything changes
        if self.static_shapes and ops.capabilities(backend).static_shapes is None:
            raise ValueError(f"static shapes run on backend {ops.static_shape_backends()}, "
                             f"not {backend!r}: call prop.set_static_shapes(False) first")
        self.backend_fallbacks = {}
        for layer in self._all_dcp_layers():
            # Only layers that run a compact grouped conv (a dense one is plain F.conv2d anywhere).
            compact = layer.prunable or layer.input_source is not None
            if layer.grouped and compact and not ops.capabilities(backend).grouped_convs:
                layer.backend = ops.GROUPED_FALLBACK
                self.backend_fallbacks[layer.dcp_name] = backend
            else:
                layer.backend = backend
        if self.backend_fallbacks:
            names = list(self.backend_fallbacks)
            listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            warnings.warn(f"backend {backend!r} has no grouped-conv kernel: {len(names)} grouped conv(s) run on "
                          f"'torch' instead ({listed}; prop.report() marks them)", stacklevel=2)
        if self.static_shapes:  # the static-shape step follows the backend: capacity widths or full width
            self.set_static_shapes(True)

    def set_static_shapes(self, enabled: bool = True) -> None:
        """Run every step with static shapes (``True``) or with compact tensors (``False``, the default).

        On backend ``torch`` (or ``auto``): **capacity widths** (docs/algorithm.md, "Static capacity
        widths"). Each group's compact tensors get a fixed number of slots, its capacity (at least
        its kept count, rounded up to ``capacity_multiple``, grown at once when a count exceeds it,
        fitted to the epoch's largest count at :meth:`epoch_end`); the slots past the kept channels
        hold unselected channels whose outputs are masked to zero, so the step computes what the
        reference computes, with ATen's convolutions (cuDNN, oneDNN) at shapes that stay the same
        from step to step. One host read per selecting step (the counts, which decide the
        capacities). :meth:`capacities` and :meth:`capacity_waste` report them.

        On backend ``triton``: full width. Each layer's selection is read on the device only (its ``selected`` mask and
        ``kept_order``/``kept_count``, see :func:`dcp_kernels.rule.kept_first`), activations stay full
        width with zeros in the unselected channels, and the Triton kernels skip those channels by
        reading the kept counts from device memory. No tensor shape and no host value depends on the
        selection, and a selecting step reads nothing back to the host: the whole training step can be
        captured in a CUDA graph (docs/api.md, "Static shapes"). Needs backend ``triton`` on every
        layer and no grouped convs (groups > 1, not depthwise). Cost: full-width activations (memory
        as dense).
        """
        enabled = bool(enabled)
        layers = self._all_dcp_layers()
        backends = {layer.backend for layer in layers}
        modes = {ops.capabilities(b).static_shapes for b in backends}
        capacity = enabled and "full width" not in modes
        if capacity and modes != {"capacity"}:
            raise ValueError(f"static_shapes=True runs on backend {ops.static_shape_backends()}; this model's "
                             f"layers use {sorted(backends)}: call prop.set_backend({ops.CAPACITY_BACKEND!r}) first")
        if enabled and not capacity:
            grouped = [layer._label() for layer in layers if layer.grouped]
            if grouped:
                raise ValueError(f"static_shapes: {len(grouped)} grouped conv(s) have no full-width static kernel "
                                 f"({', '.join(grouped[:3])}); leave static_shapes off for this model")
        for layer in layers:
            layer.static_shapes = enabled and not capacity
            if enabled and not capacity and isinstance(layer, DCPConv2d) and layer.prunable:
                layer._refresh_kept()
        if capacity != self.capacity:  # a new mode starts without capacities (a backend switch keeps them)
            self._capacities = [None] * len(self.groups)
            self._peaks = [0] * len(self.groups)
            self._slot_buffers = [None] * len(self.groups)
        self.static_shapes = enabled
        self.capacity = capacity
        self._written = None  # the next select() writes every layer's state in the new form

    @property
    def full_width_static(self) -> bool:
        """The Triton static-shape step (full-width tensors, no index vectors)."""
        return self.static_shapes and not self.capacity

    def _all_dcp_layers(self) -> list[DCPConv2d]:
        if self.model is None:
            return list(self.layers)
        return [m for m in self.model.modules() if isinstance(m, DCPConv2d)]

    def _linear_readers(self) -> list[DCPLinear]:
        return [] if self.model is None else [m for m in self.model.modules() if isinstance(m, DCPLinear)]

    # ----------------------------------------------------------------------------- selection
    def _group_sizes(self) -> list[int]:
        return [self.layers[members[0]].out_channels for members in self.groups]

    def utility_vector(self) -> torch.Tensor:
        """One utility per selectable channel: groups in order, a coupled group's channel utility
        being the **mean** of its members' (docs/algorithm.md, "Coupled groups"): each member's
        utility is max-normalised per layer, so a mean ranks a group on the same scale as a single
        layer, where a sum would rank an m-member group about m times higher and never prune it."""
        parts = []
        for members in self.groups:
            if len(members) == 1:
                parts.append(self.layers[members[0]].utility)
            else:
                parts.append(torch.stack([self.layers[i].utility for i in members]).mean(0))
        return torch.cat(parts)

    def _selection_mask(self) -> torch.Tensor:
        """The network-wide selection over :meth:`utility_vector` (see :class:`SelectionRule`).

        While no utility has been measured yet (all still 0: ``explore_epochs=0`` and none loaded)
        every channel stays selected: a selection from all-zero utilities would keep the first
        channels in layer order, and the channels it drops would never be measured, freezing it.
        Decided on the device (no host read)."""
        u = self.utility_vector()
        return torch.where(u.any(), self._rule(u), True)  # any non-zero (or NaN) utility: measured

    def _write_versions(self) -> tuple[tuple[int, int], ...]:
        """Identity and version of every layer's mask: any later write (set_selection, loading a
        state dict, moving the model) changes it."""
        return tuple((layer.selected.data_ptr(), layer.selected._version) for layer in self.layers)

    @torch.no_grad()
    def select(self, *, force: bool = False) -> None:
        """Recompute the selection and write it into every layer's ``selected`` buffer.

        While exploring (``epoch < explore_epochs``) every channel is selected unless ``force``.
        Also hands every layer its index vector of selected channels (see
        :meth:`SelectionRule.indices`): one host read per selecting step for the whole network, and
        none while exploring once every channel is selected.
        """
        self.utility_updates.flush()  # a backward pass that failed half-way: its layers' updates
        self.skipped_steps.restore_if_skipped()  # the step that ended, skipped by a followed GradScaler
        if self.exploring and not force:
            if self._written == ("all", self._write_versions()):
                return  # still every channel, and nobody wrote a selection since: nothing to redo
            for layer in self.layers:
                layer.selected.fill_(True)
                if self.full_width_static:
                    layer._refresh_kept()
                else:
                    layer._adopt_indices(None)
            self._written = ("all", self._write_versions())
            self._counts = self._group_sizes()
            return
        mask = self._selection_mask()
        if self.full_width_static:
            self._write_static(mask)
            return
        if self.capacity:
            self._write_capacity(mask)
            return
        indices, counts = self._rule.indices(mask)
        self._write_masks(mask)
        for members, idx in zip(self.groups, indices):
            for i in members:
                self.layers[i]._adopt_indices(idx)
        self._written = ("selected", self._write_versions())
        self._counts = counts

    def _write_masks(self, mask: torch.Tensor) -> None:
        """Write the network-wide selection ``mask`` into every layer's ``selected`` (a coupled group's
        part into each member's): one multi-tensor copy, where a per-layer ``copy_`` is one launch each."""
        parts = torch.split(mask, self._group_sizes())
        masks = [self.layers[i].selected for members in self.groups for i in members]
        torch._foreach_copy_(masks, [parts[g] for g, members in enumerate(self.groups) for _ in members])
        _mark_written(masks)

    def _write_capacity(self, mask: torch.Tensor) -> None:
        """Write the selection ``mask`` and every group's capacity slots (one host read: the counts).

        With :attr:`slots_in_place` a group's slot buffers (indices, selected, scale) keep their
        storage while its capacity holds, so the tensors every step reads are the same objects (what
        a captured graph needs)."""
        indices, selected, counts = self._rule.capacity_indices(mask, self._fit_capacities)
        self._write_masks(mask)
        caps = [int(c) for c in self._capacities]
        # (indices, selected, scale) per group; the float scale in one op for all groups.
        sources = [list(indices), list(torch.split(selected, caps)), list(torch.split(selected.float(), caps))]
        reuse = [g for g, buf in enumerate(self._slot_buffers) if self.slots_in_place and buf is not None
                 and buf[0].numel() == caps[g] and buf[0].device == mask.device]
        if reuse:
            for k in range(3):
                torch._foreach_copy_([self._slot_buffers[g][k] for g in reuse], [sources[k][g] for g in reuse])
        for g in range(len(self.groups)):
            if g not in reuse:
                # Views of this selection's fresh tensors; storage of their own only where they will
                # be written in place (a view's base would keep the other groups' slots alive).
                self._slot_buffers[g] = tuple(sources[k][g].clone() if self.slots_in_place else sources[k][g]
                                              for k in range(3))
        for g, members in enumerate(self.groups):
            idx, sel, scale = self._slot_buffers[g]
            for i in members:
                self.layers[i]._adopt_indices(idx, Slots(sel, scale))
        self._written = ("selected", self._write_versions())
        self._counts = counts

    def _fit_capacities(self, counts: Sequence[int]) -> list[int]:
        """Capacities for this step's kept ``counts``: a group keeps its capacity while its count
        fits, and grows at once (:func:`~dcp_kernels.rule.capacity_for`) when it does not. A group
        in blocks (grouped convs: equal counts per block) always has its full width."""
        before = list(self._capacities)
        for g, count in enumerate(counts):
            self._peaks[g] = max(self._peaks[g], int(count))
            cap = self._capacities[g]
            if cap is None or count > cap:
                self._capacities[g] = self._capacity_for(g, int(count))
        if before != self._capacities and None not in before:
            self.capacity_changes += 1
        return list(self._capacities)

    def _capacity_for(self, g: int, count: int) -> int:
        """Group ``g``'s capacity for ``count`` kept channels (:func:`~dcp_kernels.rule.capacity_for`);
        its full width when it is in blocks (grouped convs: equal counts per block)."""
        size = self.layers[self.groups[g][0]].out_channels
        return size if self.group_blocks[g] > 1 else rule.capacity_for(count, size, self.capacity_multiple)

    def capacities(self) -> dict[str, int]:
        """Under capacity widths: each prunable layer's slot count (its compact tensors' width);
        ``{}`` before the first selecting step or when capacity widths are off."""
        if not self.capacity or None in self._capacities:
            return {}
        return {self.layer_names[i]: int(self._capacities[g]) for g, members in enumerate(self.groups)
                for i in members}

    def capacity_waste(self) -> float | None:
        """Slots over kept channels, summed over the groups (1.0: no padding); None when off."""
        if not self.capacity or None in self._capacities or self._counts is None:
            return None
        return sum(int(c) for c in self._capacities) / max(1, sum(self._counts))

    def _write_static(self, mask: torch.Tensor) -> None:
        """Write the selection ``mask`` into every layer's ``selected``, ``kept_order`` and
        ``kept_count`` in place (one sort for all groups, three multi-tensor copies, no host read)."""
        orders, counts = self._rule.kept_first(mask)
        self._write_masks(mask)
        count_parts = torch.split(counts, 1)
        targets = [(self.layers[i], g) for g, members in enumerate(self.groups) for i in members]
        torch._foreach_copy_([layer.kept_order for layer, _ in targets], [orders[g] for _, g in targets])
        torch._foreach_copy_([layer.kept_count for layer, _ in targets], [count_parts[g] for _, g in targets])
        # kept() reads the counts when asked; nothing is read back here.
        self._written = None

    @torch.no_grad()
    def sync_utilities(self) -> None:
        """Average the utilities over all ranks of the default process group (in place); nothing
        without one, or with one rank. This rank's pending updates (an aborted backward's
        measurements) are applied first, so they count in the average."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        self.utility_updates.flush()
        self.skipped_steps.restore_if_skipped()
        vector = torch.cat([layer.utility for layer in self.layers])
        dist.all_reduce(vector)
        vector /= dist.get_world_size()
        for layer, part in zip(self.layers, torch.split(vector, [layer.out_channels for layer in self.layers])):
            layer.utility.copy_(part)

    def step(self) -> None:
        """One training step's selection.

        Called automatically before each training-mode forward while :attr:`auto_select` is True
        (the default). With gradient accumulation set ``prop.auto_select = False`` and call
        ``prop.step()`` once per optimizer step, before the first micro-batch: every micro-batch
        of the step then runs with one selection (each backward still updates the utilities).
        """
        self.steps += 1
        if self.distributed:
            self.sync_utilities()  # the step that ended settled first (a GradScaler's skip undone)
        self.select()
        self.skipped_steps.snapshot()

    def use_grad_scaler(self, scaler: torch.amp.GradScaler | None) -> None:
        """Leave the utilities as they were on every step ``scaler`` skips (inf/NaN gradients: its
        ``scaler.step(optimizer)`` does not step the optimizer), as if that batch never came. Needed
        for the standard fp16 recipe (``scaler.scale(loss).backward(); scaler.step(opt);
        scaler.update()`` once per step); ``None`` stops following a scaler. Decided on the device
        from the scaler's scale, which ``scaler.update()`` lowers exactly on a skipped step; applied
        at the next selection, ``model.state_dict()`` and :meth:`state_dict`
        (:mod:`dcp_kernels.skipped_steps`). BatchNorm's running statistics moved in the forward, as
        in plain PyTorch; the step counter :attr:`steps` counts the step."""
        self.skipped_steps.use_grad_scaler(scaler)

    def skip_step(self) -> None:
        """The step under way (since the last selection) did not happen: its utility updates are
        undone. For loops that skip an optimizer step on their own criterion (an aborted backward
        included); with a ``torch.amp.GradScaler`` use :meth:`use_grad_scaler` instead."""
        self.utility_updates.flush()
        self.skipped_steps.skip()

    @contextlib.contextmanager
    def no_utility_updates(self) -> Iterator[None]:
        """Backward passes run inside leave the utilities as they are, and training forwards inside
        keep the selection in force (no selecting step): for the backward passes that are not the
        training step's, such as a gradient penalty's ``torch.autograd.grad(..., create_graph=True)``,
        an auxiliary loss's own backward or a sharpness-aware optimizer's second pass.

        Outside it every training backward updates the utilities (the default: two backward passes
        through one forward update them twice). It pauses every DCP layer of the process, of any
        model. Eager backward passes only: a backward traced by ``torch.compile`` holds its update
        in the compiled graph, and this context raises ``RuntimeError`` on exit if one ran inside it.
        """
        versions = [layer.utility._version for layer in self.layers]
        with rule.paused_utility_updates():
            yield
        if any(layer.utility._version != v for layer, v in zip(self.layers, versions)):
            changed = [n for n, layer, v in zip(self.layer_names, self.layers, versions) if layer.utility._version != v]
            raise RuntimeError(
                f"utilities of {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} were written inside "
                "no_utility_updates(): a backward traced by torch.compile updates them regardless (run it from an "
                "eager forward), as do prop.step(), load_state_dict() and other writes made inside the context"
            )

    def refresh_indices(self) -> None:
        """Bring every cached index vector of the model up to date with the selection: each
        prunable layer's own and each reader's input source (a layer or a concat)."""
        if self._index_holders is None:
            holders = list(self.layers)
            if self.model is not None:
                holders += [m.input_source for m in self.model.modules() if getattr(m, "input_source", None) is not None]
            self._index_holders = list({id(h): h for h in holders}.values())
            self._dcp_layers = self._all_dcp_layers()
        for holder in self._index_holders:
            holder.selected_indices()
            holder.slot_scale()  # capacity slots: stale ones are dropped here, eagerly, not under compile
        # The all-channel index vectors the compiled forward looks up: created here, eagerly, so a
        # first use inside torch.compile's trace does not guard on a cache that is about to change.
        for layer in self._dcp_layers:
            _all_channels(layer.in_channels, layer.weight.device)
            _all_channels(layer.out_channels, layer.weight.device)

    def epoch_end(self) -> None:
        """Advance the epoch counter: ends exploration and moves the decay schedule. Under capacity
        widths each capacity is fitted to the largest kept count of the epoch that ended (it only
        grew during it), so shrinking happens here, at most once an epoch."""
        self.epoch += 1
        self._apply_decay()
        if self.capacity and None not in self._capacities and any(self._peaks):
            before = list(self._capacities)
            self._capacities = [self._capacity_for(g, peak) for g, peak in enumerate(self._peaks)]
            self._peaks = [0] * len(self.groups)
            if before != self._capacities:
                self.capacity_changes += 1

    # ----------------------------------------------------------------------------- inspection
    def utilities(self) -> dict[str, torch.Tensor]:
        return {n: l.utility.detach().clone() for n, l in zip(self.layer_names, self.layers)}

    def kept(self) -> dict[str, int]:
        """Selected channels per prunable layer (current selection).

        Free of device reads while the selection in force is the one :meth:`select` wrote (it
        keeps the counts it read then); otherwise one batched read of all layers' counts.
        """
        if self._written is not None and self._written[1] == self._write_versions():
            per_group = self._counts
        else:
            per_group = rule.host_read(torch.stack([self.layers[m[0]].selected.sum() for m in self.groups]))
        per_layer = [0] * len(self.layers)
        for members, count in zip(self.groups, per_group):
            for i in members:
                per_layer[i] = int(count)
        return dict(zip(self.layer_names, per_layer))

    def flops_ratio(self) -> float:
        """Multiply-accumulates of the converted layers with the current selection over dense ones
        (:func:`dcp_kernels.reporting.flops_ratio`)."""
        return reporting.flops_ratio(self)

    def report(self) -> str:
        """The per-layer table: channels, kept, FLOPs share, why dense (:func:`dcp_kernels.reporting.report`)."""
        return reporting.report(self)

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Epoch, step count and schedule (utilities and selection are in ``model.state_dict()``)."""
        self.skipped_steps.restore_if_skipped()
        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "prune_ratio": self.prune_ratio,
            "min_channels": list(self.min_channels),
            "explore_epochs": self.explore_epochs,
            "schedule": asdict(self.schedule),
            "layers": list(self.layer_names),
            "groups": [[self.layer_names[i] for i in members] for members in self.groups],
            "layer_prune_ratios": {self.layer_names[self.groups[g][0]]: r for g, r in self.group_ratios.items()},
            "round_to": self.round_to,
            "capacity_multiple": self.capacity_multiple,
            "capacities": list(self._capacities),
            "capacity_peaks": list(self._peaks),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("layers", [])) != self.layer_names:
            raise ValueError(
                "this state_dict was saved for other layers: "
                f"saved {state.get('layers')}, this model has {self.layer_names}"
            )
        groups = [[self.layer_names[i] for i in members] for members in self.groups]
        if "groups" in state and [list(g) for g in state["groups"]] != groups:
            raise ValueError(f"this state_dict was saved with other coupled groups: saved {state['groups']}")
        check_prune_ratio(state["prune_ratio"])
        self.prune_ratio = float(state["prune_ratio"])
        self.min_channels = [int(m) for m in state["min_channels"]]
        self.group_ratios = self._resolve_layer_ratios(state.get("layer_prune_ratios", {}))
        round_to = state.get("round_to", 1)
        check_round_to(round_to)
        self.round_to = round_to
        self._set_keep()
        self.explore_epochs = int(state["explore_epochs"])
        sched = dict(state["schedule"])
        self.schedule = DecaySchedule(**sched)
        self.epoch = int(state["epoch"])
        self.steps = int(state["steps"])
        self.skipped_steps.forget()
        self.capacity_multiple = int(state.get("capacity_multiple", self.capacity_multiple))
        caps = state.get("capacities")
        if caps is not None and len(caps) == len(self.groups):
            # A resumed run starts at the shapes it stopped with (no recompile, no new graph).
            self._capacities = [None if c is None else int(c) for c in caps]
            peaks = state.get("capacity_peaks")
            if peaks is not None and len(peaks) == len(self.groups):
                self._peaks = [int(p) for p in peaks]
        self._apply_decay()

    # ----------------------------------------------------------------------------- the end
    def finalize(self) -> nn.Module:
        """Cut the unselected channels: a plain, smaller ``nn.Module`` (a copy; see
        :func:`dcp_kernels.finalize.finalize`). The trained model is left as it was, except that while
        still exploring (every channel selected) a selection is first made and written into it, so
        that ``model.eval()`` and the returned module compute the same function."""
        return _finalize(self)

    def attach(self, model: nn.Module) -> None:
        """Select automatically before every training-mode forward of ``model``."""
        self.detach()
        self.model = model
        self._index_holders = None
        self._hook = model.register_forward_pre_hook(_SelectBeforeForward(self))
        self._state_hooks = [model.register_state_dict_pre_hook(_RestoreSkippedBeforeSaving(self)),
                             model.register_load_state_dict_post_hook(_ForgetStepOnLoad(self))]

    @contextlib.contextmanager
    def without_hook(self) -> Iterator[None]:
        """Temporarily remove the model's DCP hooks (the selection and the original-layout loading;
        e.g. to deep-copy the model without them)."""
        if self.model is None:
            yield
            return
        handles = [h for h in (self._hook, self._layout_hook, *self._state_hooks) if h is not None]
        removed = [(hooks, handle.id, hooks.pop(handle.id)) for handle in handles
                   if (hooks := handle.hooks_dict_ref()) is not None and handle.id in hooks]
        try:
            yield
        finally:
            for hooks, key, hook in removed:
                hooks[key] = hook

    def detach(self) -> None:
        """Stop selecting automatically (removes the forward pre-hook from the model)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for handle in self._state_hooks:
            handle.remove()
        self._state_hooks = []

    def __setstate__(self, state: dict) -> None:
        # A controller pickled (torch.save(model)) before skipped steps existed: none under way.
        self.__dict__.update(state)
        if "skipped_steps" not in state:
            self.skipped_steps = SkippedSteps(self.layers)
            self._state_hooks = []
        if any("_coupled_layers" not in layer.__dict__ for layer in self.layers):
            self._couple_layers()


def _mark_written(masks: list[torch.Tensor]) -> None:
    """Bump the masks' version counters after a multi-tensor copy into them: the caches derived from a
    mask (``SelectionCache``) key on its version, and ``_foreach_copy_`` leaves it unchanged while a
    ``TorchDispatchMode`` is active (measured with torch 2.14; a plain ``copy_`` bumps it)."""
    torch.autograd.graph.increment_version(masks)


class _SelectBeforeForward:
    """Forward pre-hook of the converted model: a fresh selection before each training forward.

    A small class rather than a closure so that ``torch.save(model)`` can pickle the hook.
    """

    def __init__(self, propagation: Propagation) -> None:
        self.propagation = propagation

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: Iterable[Any]) -> None:
        # Runs eagerly even inside torch.compile: the selection (a sort and a few masks) and the
        # index vectors it implies are computed here, so the compiled forward only reads them.
        if module.training and self.propagation.auto_select and not rule.utility_updates_paused():
            self.propagation.step()
        if not self.propagation.full_width_static:  # the full-width static step reads no index vector
            self.propagation.refresh_indices()


class _RestoreSkippedBeforeSaving:
    """State-dict pre-hook of the converted model: a step the followed GradScaler skipped gets its
    utilities back before they are saved (:meth:`Propagation.use_grad_scaler`). A class so that
    ``torch.save(model)`` can pickle it."""

    def __init__(self, propagation: Propagation) -> None:
        self.propagation = propagation

    def __call__(self, module: nn.Module, prefix: str, keep_vars: bool) -> None:
        self.propagation.skipped_steps.restore_if_skipped()


class _ForgetStepOnLoad:
    """Load-state-dict post-hook of the converted model: loaded utilities are never put back to the
    snapshot of a step under way before the load."""

    def __init__(self, propagation: Propagation) -> None:
        self.propagation = propagation

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        self.propagation.skipped_steps.forget()
