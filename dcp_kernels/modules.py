"""``DCPConv2d``: a drop-in ``nn.Conv2d`` whose unselected channels are never computed."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .conv_forward import OwnForward, adopt_tensors, conv_refusal, explicit_padding, has_own_forward
from .graph.optable import is_depthwise
from .ops.compact import block_rows, selects_all
from .ops.layer import Slots, _all_channels, _all_kept, counted_layer_step, layer_step
from .rule import kept_first


class SelectionCache:
    """An index tensor derived from one or more ``selected`` masks, rebuilt only when a mask changes.

    The one cache mechanism of the layers (a layer's selected indices, a concat's, a linear's
    columns). The key is each mask's identity and version: every write to a mask (the controller's
    selection, ``set_selection``, loading a state dict, moving the model) changes it. ``put`` stores
    a value built elsewhere (the controller builds every layer's indices in one batched computation).

    Under ``torch.compile`` the stored value is used as it is (building it may be a graph break, and
    comparing data pointers is one): the controller's forward pre-hook refreshes every cache eagerly
    before each forward (:meth:`~dcp_kernels.Propagation.refresh_indices`). ``rebuild_when_compiling``
    builds afresh instead, for values that are plain traceable tensor ops of already cached ones.

    ``derived``: the value is tensor ops of other caches' values (a concat's indices, a Linear's
    columns). Such a value is also built afresh while a CUDA graph is being captured, so the graph
    computes it from the layers' slot vectors (written in place by every selection under capacity
    widths) instead of holding the tensor one selection left behind.
    """

    __slots__ = ("_key", "_value", "_rebuild_when_compiling", "_derived")

    def __init__(self, *, rebuild_when_compiling: bool = False, derived: bool = False) -> None:
        self._key: tuple | None = None
        self._value: Any = None
        self._rebuild_when_compiling = rebuild_when_compiling or derived
        self._derived = derived

    @staticmethod
    def _key_of(masks: list[torch.Tensor]) -> tuple:
        return tuple((m.data_ptr(), m._version, m.device) for m in masks)

    def get(self, masks: list[torch.Tensor], build) -> Any:
        """The cached value for the masks' current contents, calling ``build()`` when they changed."""
        if torch.compiler.is_compiling():
            if self._rebuild_when_compiling or self._value is None:
                return build()
            return self._value
        if self._derived and _capturing():
            return build()
        key = self._key_of(masks)
        if self._value is None or key != self._key:
            self._value, self._key = build(), key
        return self._value

    def put(self, masks: list[torch.Tensor], value: Any) -> None:
        """Store ``value`` as what ``build()`` would return for the masks' current contents."""
        self._value, self._key = value, self._key_of(masks)


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class ConcatSource:
    """The input source of a layer that reads a channel concat (DenseNet): segments of channels,
    each the output of a prunable ``DCPConv2d`` group (read through its selection) or dense.

    Duck-types the parts of a prunable ``DCPConv2d`` a reader uses: ``out_channels``,
    ``selected``, ``selected_indices()``, ``dcp_name``. Not an ``nn.Module``: it owns nothing.
    """

    prunable = True

    def __init__(self, segments: list[tuple["DCPConv2d | None", int]], name: str = "") -> None:
        if not segments or any(width < 1 for _, width in segments):
            raise ValueError("a ConcatSource needs at least one segment, each at least one channel wide")
        for layer, width in segments:
            if layer is not None and (not getattr(layer, "prunable", False) or layer.out_channels != width):
                raise ValueError(f"segment {layer!r} must be a prunable DCPConv2d with {width} outputs")
        self.segments = list(segments)
        self.out_channels = sum(width for _, width in segments)
        self.dcp_name = name or "concat"
        self._indices = SelectionCache(derived=True)
        self._scale = SelectionCache(derived=True)

    def _device(self) -> torch.device:
        return next(layer.selected.device for layer, _ in self.segments if layer is not None)

    @property
    def selected(self) -> torch.Tensor:
        device = self._device()
        return torch.cat([layer.selected if layer is not None else torch.ones(width, dtype=torch.bool, device=device)
                          for layer, width in self.segments])

    def selection_masks(self) -> list[torch.Tensor]:
        """The ``selected`` masks this source's live channels depend on."""
        return [layer.selected for layer, _ in self.segments if layer is not None]

    @property
    def static_shapes(self) -> bool:
        """Whether the segments' layers run static-shape steps (see ``DCPConv2d.static_shapes``)."""
        return any(layer.static_shapes for layer, _ in self.segments if layer is not None)

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, count)`` of the live channels (:func:`~dcp_kernels.rule.kept_first`), built on
        the device from the segments' masks: two launches, no host read."""
        return kept_first(self.selected)

    def selected_indices(self) -> torch.Tensor:
        """Indices of the live channels of the concat (cached until a segment's selection changes)."""
        def build() -> torch.Tensor:
            device, offset, parts = self._device(), 0, []
            for layer, width in self.segments:
                idx = layer.selected_indices() if layer is not None else _all_channels(width, device)
                parts.append(idx + offset)
                offset += width
            return torch.cat(parts)

        return self._indices.get(self.selection_masks(), build)

    def slot_scale(self) -> torch.Tensor | None:
        """Under capacity widths: 1.0 / 0.0 per entry of :meth:`selected_indices` (selected / padding),
        the segments' scales side by side; None when no segment has capacity slots."""
        def build() -> torch.Tensor | None:
            scales = [layer.slot_scale() if layer is not None else None for layer, _ in self.segments]
            if all(scale is None for scale in scales):
                return None
            device = self._device()
            return torch.cat([
                scale if scale is not None else
                torch.ones((layer.selected_indices() if layer is not None else _all_channels(width, device)).numel(),
                           device=device)
                for scale, (layer, width) in zip(scales, self.segments)])

        return self._scale.get(self.selection_masks(), build)


def _check_source(label: str, source: Any, channels: int, what: str) -> None:
    if source is None:
        return
    if not isinstance(source, (DCPConv2d, ConcatSource)) or not source.prunable:
        raise TypeError(f"{label}: the input source must be a prunable DCPConv2d or a ConcatSource")
    if source.out_channels != channels:
        raise ValueError(f"{label}: input source has {source.out_channels} outputs, this layer reads {channels} {what}")


class DCPConv2d(nn.Conv2d):
    """``nn.Conv2d`` with Dynamic Channel Propagation: unselected channels are skipped, not masked.

    Takes every ``nn.Conv2d`` argument (same names and defaults, same ``weight``/``bias``
    parameters, so an ``nn.Conv2d`` state dict loads into it) plus:

    Args:
        groups: as in ``nn.Conv2d``. A grouped conv (1 < groups, not depthwise) keeps the same
            number of output channels in every group, and its input source must keep the same number
            of input channels in every group (the controller's rule does both; docs/algorithm.md
            "Grouped convolutions"). Runs on ``reference`` and ``torch``.
        norm: the ``BatchNorm2d`` that follows this conv. The layer then computes
            ``gate(BN(conv(x)))``: the gate sits after the BN, as in the paper.
        prunable: whether output channels carry utilities and can be switched off. A
            non-prunable layer still reads only the live channels of its input source.
        backend: ``auto`` | ``reference`` | ``torch`` | ``triton`` (see :func:`dcp_kernels.backends`).
        name: a label used in error messages (``convert`` sets the module path).

    Input and output are full-width NCHW tensors; unselected output channels are exact zeros.
    Buffers ``utility`` (float32) and ``selected`` (bool), one entry per output channel, hold the
    layer's DCP state and are part of ``state_dict()``. Standalone, every channel is selected until
    :meth:`set_selection` or a :class:`~dcp_kernels.Propagation` changes it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        norm: nn.BatchNorm2d | None = None,
        prunable: bool = True,
        backend: str = "auto",
        name: str | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        ops.resolve_backend(backend)  # fail early on a misspelt backend
        self.dcp_name = name or ""
        self.backend = backend
        self.prunable = bool(prunable)
        # Set by convert() when every reader of this layer's output is a converted conv: the
        # output then stays compact (only the selected channels) on the fast backends.
        self.compact_output = False
        # Set by convert() when a GroupNorm normalises this layer's output alone: the utility is
        # measured at that norm's output (ops.layer.norm_gate), as at an owned BatchNorm's.
        self.utility_at_norm = False
        self.decay = 0.6
        # (controller's network-wide utility update, this layer's row): set by Propagation. Without
        # one (a layer used on its own) the backward updates the utilities at once.
        self._utility_updates: tuple[Any, int] | None = None
        self.last_output_hw: tuple[int, int] | None = None
        if norm is not None:
            self._check_norm(norm)
        self.norm = norm
        if self.prunable:
            dev = self.weight.device
            self.register_buffer("utility", torch.zeros(out_channels, dtype=torch.float32, device=dev))
            self.register_buffer("selected", torch.ones(out_channels, dtype=torch.bool, device=dev))
            # The selection as the static-shape step reads it (rule.kept_first): the channels with
            # the selected ones first, and their number. Derived from ``selected`` (not saved).
            self.register_buffer("kept_order", torch.arange(out_channels, device=dev), persistent=False)
            self.register_buffer("kept_count", torch.full((1,), out_channels, dtype=torch.int32, device=dev),
                                 persistent=False)
        # Static-shape steps (set by Propagation(static_shapes=True)): the selection is read on the
        # device only, every tensor is full width, and no host value depends on it.
        self.static_shapes = False
        # The producer whose selection tells which input channels are live. Kept out of
        # ``_modules`` on purpose: it is another layer of the same model, not a child.
        self.__dict__["_input_source"] = None
        self.__dict__["_indices"] = SelectionCache()
        # Capacity widths: the Slots of the index vector in the cache above, valid while the mask is
        # the one they were written for (else None: the exact index vector is rebuilt instead).
        self.__dict__["_slots"] = SelectionCache()

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_modules(
        cls,
        conv: nn.Conv2d,
        norm: nn.BatchNorm2d | None = None,
        *,
        prunable: bool = True,
        backend: str = "auto",
        name: str | None = None,
    ) -> DCPConv2d:
        """Wrap an existing conv (and the BN after it); the same Parameter objects are reused.

        A subclass with its own ``forward`` (weight standardization, run-time 'SAME' padding) keeps it:
        the layer convolves the operands that forward would (:mod:`dcp_kernels.conv_forward`), and the
        subclass's other tensors (a gain) are registered on the layer under their own names."""
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, DCPConv2d):
            raise TypeError(f"from_modules expects an nn.Conv2d, got {type(conv).__name__}")
        why = conv_refusal(conv)
        if why is not None:
            raise TypeError(f"from_modules: {why}")
        own = OwnForward(conv) if has_own_forward(conv) else None
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
            dtype=conv.weight.dtype, norm=norm, prunable=prunable, backend=backend, name=name,
        )
        layer.weight = conv.weight
        layer.bias = conv.bias
        if own is not None:
            adopt_tensors(layer, conv, skip=("weight", "bias"))
            layer.__dict__["_own_forward"] = own
        layer.train(conv.training)
        return layer

    @property
    def own_forward(self) -> OwnForward | None:
        """The original conv subclass's forward this layer runs (None: ``nn.Conv2d``'s)."""
        return self.__dict__.get("_own_forward")

    def _label(self) -> str:
        return f"DCPConv2d {self.dcp_name!r}" if self.dcp_name else "DCPConv2d"

    def _check_norm(self, norm: nn.Module) -> None:
        if not isinstance(norm, nn.BatchNorm2d):
            raise TypeError(f"{self._label()}: norm must be an nn.BatchNorm2d, got {type(norm).__name__}")
        if norm.num_features != self.out_channels:
            raise ValueError(
                f"{self._label()}: norm has {norm.num_features} features but the conv has {self.out_channels} outputs"
            )

    # ----------------------------------------------------------------------------- selection state
    @property
    def depthwise(self) -> bool:
        """``groups == in_channels == out_channels > 1``: channel ``c`` reads only channel ``c``."""
        return is_depthwise(self)

    @property
    def grouped(self) -> bool:
        """A grouped conv that is not depthwise (each output group reads its own input group)."""
        return self.groups > 1 and not self.depthwise

    @property
    def input_source(self) -> DCPConv2d | ConcatSource | None:
        return self.__dict__["_input_source"]

    def set_input_source(self, producer: DCPConv2d | ConcatSource | None) -> None:
        """Read only the channels ``producer`` selects (``None``: read all input channels)."""
        _check_source(self._label(), producer, self.in_channels, "channels")
        self.__dict__["_input_source"] = producer

    @torch.no_grad()
    def set_selection(self, selected: torch.Tensor) -> None:
        """Set the selected output channels from a bool mask of length ``out_channels``.

        A layer coupled with others (a residual or SE group, whose outputs are summed or multiplied
        channel by channel, compact tensors slot by slot) shares their selection: the mask is set on
        every member (``coupled_layers``)."""
        members = [self, *self.coupled_layers]
        for layer in members:
            layer._check_selection(selected)
        for layer in members:
            layer.selected.copy_(selected)
            layer._refresh_kept()

    @property
    def coupled_layers(self) -> list["DCPConv2d"]:
        """The other members of this layer's selection group (set by the controller; [] alone)."""
        return self.__dict__.get("_coupled_layers", [])

    def _check_selection(self, selected: torch.Tensor) -> None:
        if not self.prunable:
            raise RuntimeError(f"{self._label()} is not prunable")
        if selected.dtype != torch.bool or selected.shape != (self.out_channels,):
            raise ValueError(f"{self._label()}: selection must be a bool tensor of shape ({self.out_channels},)")
        if not bool(selected.any()):
            raise ValueError(f"{self._label()}: the selection is empty; at least one channel must stay")
        if self.grouped:
            per_group = selected.view(self.groups, -1).sum(1)
            if bool((per_group != per_group[0]).any()):
                raise ValueError(f"{self._label()}: a grouped conv (groups={self.groups}) must keep the same number of "
                                 f"channels in every group, got {per_group.tolist()}")

    @torch.no_grad()
    def _refresh_kept(self) -> None:
        """Rebuild ``kept_order``/``kept_count`` from ``selected`` (in place: their storage stays,
        as a captured CUDA graph needs)."""
        order, count = kept_first(self.selected)
        self.kept_order.copy_(order)
        self.kept_count.copy_(count)

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, count)`` of the selected output channels, as the static-shape step reads them."""
        return self.kept_order, self.kept_count

    def selection_masks(self) -> list[torch.Tensor]:
        """The ``selected`` masks this layer's live output channels depend on: its own."""
        return [self.selected]

    def selected_indices(self) -> torch.Tensor:
        """Sorted int64 indices of the selected output channels (cached until ``selected`` changes;
        see :class:`SelectionCache` for ``torch.compile``)."""
        def build() -> torch.Tensor:
            idx = self.selected.nonzero().squeeze(1)
            if idx.numel() == 0:
                raise RuntimeError(f"{self._label()}: no output channel is selected")
            return idx

        return self.__dict__["_indices"].get(self.selection_masks(), build)

    def _adopt_indices(self, idx: torch.Tensor | None, slots: Slots | None = None) -> None:
        """Take the selected indices from the controller, which built every layer's in one batched
        computation right after writing ``selected`` (``None``: every channel). Valid until
        ``selected`` changes again, exactly like an index vector computed here.

        ``slots``: capacity widths (docs/algorithm.md, "Static capacity widths"): ``idx`` is then the
        layer's fixed-length slot vector, selected channels and padding, and ``slots`` says which is
        which; its length stays the same from step to step (no dynamic-size marking)."""
        sel = self.selected
        self.__dict__["_slots"].put(self.selection_masks(), slots)
        if idx is None:
            # The layer's own tensor, not the shared cached arange: a conv whose input and output
            # widths are equal would otherwise get one tensor as both in_idx and out_idx, which
            # torch.compile cannot trace through an autograd.Function (a graph break).
            idx = torch.arange(self.out_channels, device=sel.device)
        elif slots is None:
            # Kept widths change on nearly every step: let torch.compile trace them as symbolic
            # sizes from the start instead of recompiling for each new width.
            torch._dynamo.maybe_mark_dynamic(idx, 0)
        self.__dict__["_indices"].put(self.selection_masks(), idx)

    def slot_state(self) -> Slots | None:
        """The capacity slots of :meth:`selected_indices` (None: it holds the selected channels only)."""
        return self.__dict__["_slots"].get(self.selection_masks(), lambda: None)

    def slot_scale(self) -> torch.Tensor | None:
        """1.0 / 0.0 per entry of :meth:`selected_indices` under capacity widths, else None."""
        slots = self.slot_state() if self.prunable else None
        return None if slots is None else slots.scale

    def _apply(self, fn, recurse=True):
        # .half()/.double()/.to(dtype) convert floating buffers; utilities stay float32 by definition.
        super()._apply(fn, recurse)
        if self.prunable and self.utility.dtype != torch.float32:
            self.utility = self.utility.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # An nn.Conv2d state dict has no DCP buffers: keep the current ones instead of failing.
        if self.prunable:
            for key in ("utility", "selected"):
                state_dict.setdefault(prefix + key, getattr(self, key))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if self.prunable:
            self._refresh_kept()

    # ----------------------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor, in_idx: torch.Tensor | None) -> bool:
        """Validate ``x``; return True when it is compact (only the source's selected channels)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self._label()}: expected a 4-D (N, C, H, W) input, got {shape}")
        compact = in_idx is not None and x.shape[1] == in_idx.numel() and not selects_all(in_idx, self.in_channels)
        if not compact and x.shape[1] != self.in_channels:  # this order: no guard on a compact width under compile
            also = f" (or the {in_idx.numel()} live channels of its input source)" if in_idx is not None else ""
            raise ValueError(f"{self._label()}: expected {self.in_channels} input channels{also}, got {x.shape[1]}")
        if x.device != self.weight.device:
            raise ValueError(f"{self._label()}: input is on {x.device} but the weights are on {self.weight.device}")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{self._label()}: input dtype {x.dtype} does not match weight dtype {self.weight.dtype}")
        return compact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_shapes:
            return self._static_forward(x)
        source = self.input_source
        in_idx = source.selected_indices() if source is not None else None
        x_compact = self._check_input(x, in_idx)
        x, weight, bias, padding = self._conv_operands(x)
        out_idx = self.selected_indices() if self.prunable else None
        # Capacity widths: fixed-length index vectors padded with unselected channels, run on ATen.
        in_scale = source.slot_scale() if source is not None else None
        slots = self.slot_state() if self.prunable else None
        if in_idx is None and out_idx is None:
            y = F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
            self.last_output_hw = (y.shape[2], y.shape[3])
            return y if self.norm is None else self.norm(y)
        backend = (ops.CAPACITY_BACKEND if (in_scale is not None or slots is not None)
                   else ops.resolve_backend(self.backend, x.device))
        ops.check_groups_supported(backend, self.groups, weight, self._label())
        if not ops.REGISTRY[backend].dense_ops and torch.is_autocast_enabled(x.device.type):
            # Autocast does not look inside custom autograd Functions: cast here what it would cast
            # for a conv (input, weight, bias), then run the compact path with autocast off.
            # BatchNorm takes the low-precision activation with fp32 statistics, as under autocast;
            # utilities are reduced in fp32 by channel_utility.
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return layer_step(
                    self, x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                    padding, in_idx, out_idx, x_compact, backend, in_scale, slots,
                )
        return layer_step(self, x, weight, bias, padding, in_idx, out_idx, x_compact, backend, in_scale, slots)

    def _conv_operands(
        self, x: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """What the conv convolves: the input, weight, bias and integer padding. 'same'/'valid' and
        non-zero padding modes are padded explicitly here (then the conv runs unpadded); a subclass's
        own forward gives its padded input and transformed weight (:attr:`own_forward`)."""
        own = self.own_forward
        if own is not None:
            call = own.call(self, x)
            x, padding = explicit_padding(call, self)
            return x, call.weight, call.bias, padding
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            return F.pad(x, self._reversed_padding_repeated_twice, mode=mode), self.weight, self.bias, (0, 0)
        return x, self.weight, self.bias, self.padding

    def _static_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The static-shape step: full-width input and output, the selection read on the device."""
        self._check_input(x, None)
        x, weight, bias, padding = self._conv_operands(x)
        source = self.input_source
        if source is None and not self.prunable:  # a dense layer: nothing to skip, nothing selected
            y = F.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups)
            self.last_output_hw = (y.shape[2], y.shape[3])
            return y if self.norm is None else self.norm(y)
        in_kept = source.kept() if source is not None else _all_kept(self.in_channels, x.device)
        backend = ops.resolve_backend(self.backend, x.device)
        if ops.REGISTRY[backend].static_shapes != "full width":
            raise RuntimeError(f"{self._label()}: full-width static shapes need backend 'triton' (this layer resolves "
                               f"to {backend!r}); call prop.set_backend('triton') or leave static_shapes off")
        ops.check_groups_supported(backend, self.groups, weight, self._label())
        if torch.is_autocast_enabled(x.device.type):
            # As in forward(): cast what autocast would cast for a conv, then run with it off.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                return counted_layer_step(self, x, weight, bias, padding, in_kept)
        return counted_layer_step(self, x, weight, bias, padding, in_kept)

    # ----------------------------------------------------------------------------- accounting
    def conv_flops(self) -> tuple[int, int]:
        """(dense, active) multiply-accumulates per sample of the most recent forward's shape."""
        if self.last_output_hw is None:
            raise RuntimeError(f"{self._label()}: no forward has run yet")
        h, w = self.last_output_hw
        per_pair = self.kernel_size[0] * self.kernel_size[1] * h * w
        k_out = int(self.selected.sum()) if self.prunable else self.out_channels
        source = self.input_source
        k_in = int(source.selected.sum()) if source is not None else self.in_channels
        if self.depthwise:
            return self.out_channels * per_pair, k_out * per_pair
        # Each output reads the inputs of its own group: C_in / groups of them (k_in / groups kept).
        return (self.out_channels * (self.in_channels // self.groups) * per_pair,
                k_out * (k_in // self.groups) * per_pair)

    def extra_repr(self) -> str:
        extra = f", prunable={self.prunable}, backend={self.backend!r}"
        if self.input_source is not None:
            extra += f", input_source={self.input_source.dcp_name or 'set'!r}"
        return super().extra_repr() + extra


class DCPTokenLinear(DCPConv2d):
    """An ``nn.Linear`` on tokens (``(N, ..., in_features)``, features last) whose output features are a
    DCP channel space: ConvNeXt's and the transformers' MLP expansion. It runs as the 1x1
    :class:`DCPConv2d` it equals on ``(N, in_features, tokens, 1)`` (a channels-last view, no copy),
    so every backend, the gate, capacity widths and the selection machinery are the conv's, and the
    utility is the conv's (per sample, summed over its tokens); unselected features are never
    computed. The output is ``(N, ..., out_features)``, or ``(N, ..., k)`` when it travels compact.

    The weight is the Linear's own Parameter, reshaped in place to ``(out_features, in_features, 1, 1)``
    (an optimizer made before ``convert()`` still holds it; one that has already stepped holds 2-D
    state for it: make optimizers after ``convert()``). A Linear's 2-D weight in a state dict loads
    into it. ``finalize()`` turns it back into an ``nn.Linear``. No norm.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, prunable: bool = True, backend: str = "auto",
                    name: str | None = None) -> "DCPTokenLinear":
        if type(linear) is not nn.Linear:
            raise TypeError(f"from_linear expects a plain nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, 1, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, prunable=prunable, backend=backend,
                    name=name)
        weight = linear.weight
        weight.data = weight.data.view(*weight.shape, 1, 1)  # the same Parameter object, conv-shaped
        layer.weight = weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self._label()}: expected tokens (..., features), got {shape}")
        lead = x.shape[:-1]
        # (N, tokens, 1, features) seen as NCHW: (N, features, tokens, 1) in channels-last strides.
        y = super().forward(x.reshape(x.shape[0], -1, 1, x.shape[-1]).permute(0, 3, 1, 2))
        return y.permute(0, 2, 3, 1).reshape(*lead, y.shape[1])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:  # an nn.Linear's
            state_dict[prefix + "weight"] = weight.view(*weight.shape, 1, 1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _label(self) -> str:
        return f"DCPTokenLinear {self.dcp_name!r}" if self.dcp_name else "DCPTokenLinear"


class DCPLinear(nn.Linear):
    """``nn.Linear`` after a flatten of pruned channels: reads only the features of the selected ones.

    ``block`` is the number of input features per channel (H*W of the flattened map). The input
    stays full width; the columns of unselected channels are neither read nor multiplied, so their
    content does not matter (it need not be zero). ``finalize()`` turns this into a plain
    ``nn.Linear`` without those columns.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, block: int = 1, name: str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if block < 1 or in_features % block:
            raise ValueError(f"DCPLinear: block={block} does not divide in_features={in_features}")
        self.block = block
        self.dcp_name = name or ""
        # Input rows per sample in the most recent forward (1 for (N, F), the tokens for (N, ..., F)),
        # for linear_flops().
        self.last_rows: int | None = None
        self.__dict__["_input_source"] = None
        # Under torch.compile the columns are rebuilt in the graph: two traceable tensor ops on the
        # source's (eagerly refreshed) indices.
        self.__dict__["_columns"] = SelectionCache(derived=True)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block: int = 1, name: str | None = None) -> "DCPLinear":
        """Wrap an existing ``nn.Linear``; the same Parameter objects are reused."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"from_linear expects a plain nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, block=block, name=name)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        return layer

    def _label(self) -> str:
        return f"DCPLinear {self.dcp_name!r}" if self.dcp_name else "DCPLinear"

    @property
    def input_source(self) -> DCPConv2d | ConcatSource | None:
        return self.__dict__["_input_source"]

    def set_input_source(self, source: DCPConv2d | ConcatSource | None) -> None:
        """Read only the features of the channels ``source`` selects (``None``: all features)."""
        _check_source(self._label(), source, self.in_features // self.block, f"channels (block={self.block})")
        self.__dict__["_input_source"] = source

    def selected_features(self) -> torch.Tensor | None:
        """Indices of the input features read (None: all)."""
        source = self.input_source
        if source is None:
            return None
        idx = source.selected_indices()
        if selects_all(idx, source.out_channels) and source.slot_scale() is None:
            return None
        if self.block == 1:  # one feature per channel: the channel indices themselves
            return idx
        # Channel c owns features [c * block, (c + 1) * block): the same flat-index arithmetic as a
        # weight block's rows.
        def columns() -> torch.Tensor:
            return block_rows(idx, torch.arange(self.block, device=idx.device), self.block)

        return self.__dict__["_columns"].get(source.selection_masks(), columns)

    def linear_flops(self) -> tuple[int, int]:
        """(dense, active) multiply-accumulates per sample of the most recent forward's shape: the
        active ones read only the features of the source's selected channels."""
        if self.last_rows is None:
            raise RuntimeError(f"{self._label()}: no forward has run yet")
        source = self.input_source
        k_in = int(source.selected.sum()) * self.block if source is not None else self.in_features
        return (self.out_features * self.in_features * self.last_rows,
                self.out_features * k_in * self.last_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = self.input_source
        self.last_rows = math.prod(x.shape[1:-1])
        if x.shape[-1] != self.in_features:
            # The source's output may travel compact (only its selected channels' features), as
            # between converted convs: then only the matching weight columns are read.
            cols = self.selected_features() if source is not None and not source.static_shapes else None
            if cols is None or x.shape[-1] != cols.numel():
                also = f" (or the {cols.numel()} features of its source's selected channels)" if cols is not None else ""
                raise ValueError(f"{self._label()}: expected {self.in_features} input features{also}, "
                                 f"got {x.shape[-1]}")
            return F.linear(x, self._weight_columns(cols), self.bias)
        if source is not None and source.static_shapes:
            # Static shapes: full width, the unselected channels' features zeroed (a mask, no index read).
            keep = source.selected.to(x.dtype).unsqueeze(-1)  # (channels, 1) against (..., channels, block)
            return F.linear((x.unflatten(-1, (-1, self.block)) * keep).flatten(-2), self.weight, self.bias)
        cols = self.selected_features()
        if cols is None:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.index_select(-1, cols), self._weight_columns(cols), self.bias)

    def _weight_columns(self, cols: torch.Tensor) -> torch.Tensor:
        """The weight columns ``cols``; under capacity widths those of padding channels zeroed (their
        features may be non-zero, and the reference does not read them)."""
        w = self.weight.index_select(1, cols)
        scale = self.input_source.slot_scale()
        if scale is None:
            return w
        if self.block > 1:
            scale = scale.repeat_interleave(self.block)
        return w * scale.to(w.dtype)

    def extra_repr(self) -> str:
        source = self.input_source
        extra = f", block={self.block}"
        if source is not None:
            extra += f", input_source={source.dcp_name or 'set'!r}"
        return super().extra_repr() + extra
