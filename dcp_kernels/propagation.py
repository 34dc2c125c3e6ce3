"""The DCP algorithm: utilities, the global selection rule, the decay schedule, the controller.

Everything that decides *which* channels are used lives here; the kernels in :mod:`dcp_kernels.ops`
only decide *how* they are computed. See ``docs/algorithm.md`` for the definitions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .modules import DCPConv2d


def keep_count(total: int, prune_ratio: float) -> int:
    """Channels kept: ``total - round(total * prune_ratio)``, rounding halves up."""
    check_prune_ratio(prune_ratio)
    return total - int(math.floor(total * prune_ratio + 0.5))


def check_prune_ratio(prune_ratio: float) -> None:
    if not isinstance(prune_ratio, (int, float)) or isinstance(prune_ratio, bool) or not (0.0 <= prune_ratio < 1.0):
        raise ValueError(f"prune_ratio must be a number in [0, 1), got {prune_ratio!r}")


def select_channels(
    utilities: torch.Tensor,
    layer_sizes: Sequence[int],
    keep: int,
    min_channels: int | Sequence[int] = 1,
) -> torch.Tensor:
    """The global selection rule; returns a bool mask over the concatenated channels.

    Exactly ``keep`` channels are selected. Each layer first keeps its ``min_channels`` best
    channels (capped at its size); the remaining slots go to the highest utilities over the whole
    network. Ties go to the lower global index (layers in order, channels in order). NaN
    utilities rank below everything.

    It is one stable sort over the concatenated vector plus a few vector ops: no Python loop
    over channels or layers.
    """
    total = utilities.numel()
    sizes = [int(s) for s in layer_sizes]
    if sum(sizes) != total or utilities.dim() != 1:
        raise ValueError(f"utilities has shape {tuple(utilities.shape)} but the layers hold {sum(sizes)} channels")
    floors_per_layer = [min(int(m), s) for m, s in zip(_per_layer(min_channels, len(sizes)), sizes)]
    n_floor = sum(floors_per_layer)
    if not (n_floor <= keep <= total):
        raise ValueError(
            f"cannot keep {keep} of {total} channels when the per-layer minimums already need {n_floor}"
        )
    device = utilities.device
    u = torch.nan_to_num(utilities.float(), nan=-math.inf)
    order = torch.sort(u, descending=True, stable=True).indices  # ties: lower index first
    sizes_t = torch.tensor(sizes, device=device)
    layer_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t)
    layer_sorted = layer_of[order]
    # Rank of each sorted entry inside its own layer: group the sorted positions by layer
    # (stable, so each group stays in descending-utility order) and count from the group start.
    grouped = torch.sort(layer_sorted, stable=True).indices
    group_start = torch.cumsum(sizes_t, 0) - sizes_t
    rank = torch.empty(total, dtype=torch.long, device=device)
    rank[grouped] = torch.arange(total, device=device) - group_start[layer_sorted[grouped]]
    floor = rank < torch.tensor(floors_per_layer, device=device)[layer_sorted]
    rest = ~floor
    take = rest & (torch.cumsum(rest.long(), 0) <= keep - n_floor)
    mask = torch.zeros(total, dtype=torch.bool, device=device)
    mask[order] = floor | take
    return mask


def _per_layer(value: int | Sequence[int], n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"expected {n} per-layer values, got {len(values)}")
    return values


@torch.no_grad()
def update_utilities(utility: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None, decay: float) -> None:
    """``U[idx] = decay * U[idx] + v / max(v)`` in place (``v = 0`` when ``max(v) == 0``, never NaN).

    ``v`` holds the raw importances of the channels ``idx`` (all channels when ``idx`` is None);
    the max-normalisation is per layer, over the selected channels (unselected ones are 0).
    """
    v = v.float()
    peak = v.max()
    v = torch.where(peak > 0, v / peak, torch.zeros_like(v))
    if idx is None:
        utility.mul_(decay).add_(v)
    else:
        utility.index_copy_(0, idx, utility.index_select(0, idx).mul_(decay).add_(v))


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


@dataclass
class ConversionPlan:
    """What ``convert`` decided, kept so ``finalize`` cuts exactly the coupled tensors.

    ``norm_homes`` maps a prunable conv's name to where its BatchNorm sat before the BN moved into
    the DCPConv2d (an ``nn.Identity`` holds that place now); ``consumers`` maps a prunable conv's
    name to ``(consumer name, kind, block)`` with ``kind`` in ``{"conv", "linear"}`` and ``block``
    the number of Linear input features per channel after flattening.
    """

    norm_homes: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class Propagation:
    """The controller returned by :func:`dcp_kernels.convert`: owns selection and the schedule.

    Utilities and the current selection live in each layer's buffers (``utility``, ``selected``),
    so they are part of ``model.state_dict()``; this object's own :meth:`state_dict` holds the
    epoch counter and the schedule. Selection runs automatically before every training-mode
    forward of the converted model; call :meth:`epoch_end` once per epoch.
    """

    def __init__(
        self,
        layers: Mapping[str, "DCPConv2d"],
        prune_ratio: float = 0.5,
        *,
        min_channels: int | Mapping[str, int] = 1,
        explore_epochs: int = 10,
        decay: float | DecaySchedule = 0.6,
        plan: ConversionPlan | None = None,
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
        self.min_channels = self._resolve_min_channels(min_channels)
        self.prune_ratio = float(prune_ratio)
        self.keep = keep_count(self.total_channels, self.prune_ratio)
        floors = sum(min(m, l.out_channels) for m, l in zip(self.min_channels, self.layers))
        if self.keep < floors:
            raise ValueError(
                f"prune_ratio={prune_ratio} keeps {self.keep} of {self.total_channels} channels, fewer than "
                f"the per-layer minimums ({floors}); lower prune_ratio or min_channels"
            )
        self.explore_epochs = explore_epochs
        self.schedule = decay if isinstance(decay, DecaySchedule) else DecaySchedule(start=float(decay))
        self.epoch = 0
        self.steps = 0
        # Under torch.distributed (DDP), average utilities over the ranks before each selection so
        # every rank selects the same channels. Set by the training CLI; off by default.
        self.distributed = False
        self.model: nn.Module | None = None
        self.plan = plan
        self._hook = None
        self._apply_decay()

    # ----------------------------------------------------------------------------- configuration
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
        return sum(self._layer_sizes())

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
        """Switch every converted layer of the model to ``backend``."""
        for layer in self._all_dcp_layers():
            layer.backend = backend

    def _all_dcp_layers(self) -> list["DCPConv2d"]:
        from .modules import DCPConv2d

        if self.model is None:
            return list(self.layers)
        return [m for m in self.model.modules() if isinstance(m, DCPConv2d)]

    # ----------------------------------------------------------------------------- selection
    def _layer_sizes(self) -> list[int]:
        return [layer.out_channels for layer in self.layers]

    def _scatter_to_layers(self, vector: torch.Tensor, buffer: str) -> None:
        """Copy consecutive slices of a network-wide vector into each layer's ``buffer``."""
        for layer, part in zip(self.layers, torch.split(vector, self._layer_sizes())):
            getattr(layer, buffer).copy_(part)

    def utility_vector(self) -> torch.Tensor:
        return torch.cat([layer.utility for layer in self.layers])

    @torch.no_grad()
    def select(self, *, force: bool = False) -> None:
        """Recompute the selection and write it into every layer's ``selected`` buffer.

        While exploring (``epoch < explore_epochs``) every channel is selected unless ``force``.
        """
        if self.exploring and not force:
            for layer in self.layers:
                layer.selected.fill_(True)
            return
        mask = select_channels(self.utility_vector(), self._layer_sizes(), self.keep, self.min_channels)
        self._scatter_to_layers(mask, "selected")

    @torch.no_grad()
    def sync_utilities(self) -> None:
        """Average the utilities over all ranks of the default process group (in place)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        vector = self.utility_vector()
        dist.all_reduce(vector)
        vector /= dist.get_world_size()
        self._scatter_to_layers(vector, "utility")

    def step(self) -> None:
        """One training step's selection (called automatically before each training forward)."""
        self.steps += 1
        if self.distributed:
            self.sync_utilities()
        self.select()

    def epoch_end(self) -> None:
        """Advance the epoch counter: ends exploration and moves the decay schedule."""
        self.epoch += 1
        self._apply_decay()

    # ----------------------------------------------------------------------------- inspection
    def utilities(self) -> dict[str, torch.Tensor]:
        return {n: l.utility.detach().clone() for n, l in zip(self.layer_names, self.layers)}

    def kept(self) -> dict[str, int]:
        """Selected channels per prunable layer (current selection)."""
        return {n: int(l.selected.sum()) for n, l in zip(self.layer_names, self.layers)}

    def flops_ratio(self) -> float:
        """Conv FLOPs with the current selection over dense conv FLOPs, over all converted convs.

        Uses each layer's output size from its most recent forward.
        """
        layers = self._all_dcp_layers()
        dense = active = 0
        for layer in layers:
            if layer.last_output_hw is None:
                raise RuntimeError("flops_ratio() needs one forward pass of the model first (it reads output sizes)")
            d, a = layer.conv_flops()
            dense += d
            active += a
        return active / dense

    def report(self) -> str:
        """A table of prunable layers: channels, kept, utility range."""
        rows = [f"{'layer':<32} {'channels':>8} {'kept':>6} {'min U':>9} {'max U':>9}"]
        for name, layer in zip(self.layer_names, self.layers):
            u = layer.utility
            rows.append(
                f"{name:<32} {layer.out_channels:>8} {int(layer.selected.sum()):>6} "
                f"{float(u.min()):>9.4f} {float(u.max()):>9.4f}"
            )
        if self.plan is not None:
            for name, reason in self.plan.skipped.items():
                rows.append(f"{name:<32} left dense: {reason}")
        return "\n".join(rows)

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Epoch, step count and schedule (utilities and selection are in ``model.state_dict()``)."""
        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "prune_ratio": self.prune_ratio,
            "min_channels": list(self.min_channels),
            "explore_epochs": self.explore_epochs,
            "schedule": asdict(self.schedule),
            "layers": list(self.layer_names),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("layers", [])) != self.layer_names:
            raise ValueError(
                "this state_dict was saved for other layers: "
                f"saved {state.get('layers')}, this model has {self.layer_names}"
            )
        check_prune_ratio(state["prune_ratio"])
        self.prune_ratio = float(state["prune_ratio"])
        self.keep = keep_count(self.total_channels, self.prune_ratio)
        self.min_channels = [int(m) for m in state["min_channels"]]
        self.explore_epochs = int(state["explore_epochs"])
        sched = dict(state["schedule"])
        self.schedule = DecaySchedule(**sched)
        self.epoch = int(state["epoch"])
        self.steps = int(state["steps"])
        self._apply_decay()

    # ----------------------------------------------------------------------------- the end
    def finalize(self) -> nn.Module:
        """Cut the unselected channels: a plain, smaller ``nn.Module`` (see :mod:`dcp_kernels.finalize`)."""
        from .finalize import finalize

        return finalize(self)

    def attach(self, model: nn.Module) -> None:
        """Select automatically before every training-mode forward of ``model``."""
        self.detach()
        self.model = model
        self._hook = model.register_forward_pre_hook(_SelectBeforeForward(self))

    @contextlib.contextmanager
    def without_hook(self) -> Iterator[None]:
        """Temporarily remove the selection hook (e.g. to deep-copy the model without it)."""
        if self._hook is None or self.model is None:
            yield
            return
        hooks = self.model._forward_pre_hooks
        saved = hooks.pop(self._hook.id)
        try:
            yield
        finally:
            hooks[self._hook.id] = saved

    def detach(self) -> None:
        """Stop selecting automatically (removes the forward pre-hook from the model)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class _SelectBeforeForward:
    """Forward pre-hook of the converted model: a fresh selection before each training forward.

    A small class rather than a closure so that ``torch.save(model)`` can pickle the hook.
    """

    def __init__(self, propagation: Propagation) -> None:
        self.propagation = propagation

    def __call__(self, module: nn.Module, args: Iterable[Any]) -> None:
        if module.training:
            self.propagation.step()
