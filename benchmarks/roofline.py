"""A roofline **estimate** of one training step on a GPU, traced on the CPU. Not a measurement.

No GPU is needed. Each variant (dense; the ideal: the finalized network of DCP's selection; DCP's
``torch`` step at exact or capacity widths, ``round_to`` 1 or 8) is built by bench_step's builders
and brought to a steady state by real steps on the CPU at a small size (exploration, the first
selecting step, one more step: momentum buffers exist). One training step (the selection in the
model's forward pre-hook, forward and loss under autocast, backward with the utility update,
``optimizer.step()`` of SGD momentum 0.9 weight decay 1e-4 with multi-tensor kernels as on a GPU) is
then traced under a ``TorchDispatchMode`` that records every aten op: its FLOPs (PyTorch's
``torch.utils.flop_counter`` registry, counted as ``FlopCounterMode`` counts them), the bytes of its
tensor inputs and outputs (views and allocations free; in-place ops read and write their
destination; gathers read what they gather; partial writes write their source's size), the module
and layer it ran in (forward and backward) and the phase.

**The GPU size exactly**: the selection runs for real (it does not depend on the batch), and
forward, backward and optimizer step run on fake tensors (``FakeTensorMode``: shapes, dtypes and
layouts, no memory, no arithmetic) at the GPU's batch and pixels. Every size-dependent code path is
taken as at that size (DCP's compact conv keeps the weight or its block for backward by comparing
their sizes with the activation's, ops/compact.py), which is why no rule that scales a small trace up
could be exact. tests/test_roofline.py checks that the fake trace at a size equals the real step at
that size, op for op (PyTorch's meta kernel of batch norm returns bf16 statistics on bf16 inputs,
where the CPU and CUDA kernels return fp32: the tracer makes them fp32).

**The cost model**: each op is charged

    max(FLOPs * tile / (peak * eff_flops), bytes / (bandwidth * eff_bw[class])) + transposes + per_kernel * kernels

by class (conv/matmul, batch norm, elementwise, elementwise over mixed dtypes, gather/scatter/index,
copy/fill, sort, host reads; :data:`OP_CLASSES`) and the ops are summed (one stream, no overlap).
Kernels per op (:func:`kernels_of`: cuDNN's NCHW<->NHWC transposes, batch norm's two kernels,
multi_tensor_apply's launches) and convolution FLOPs with channels padded to a 64-channel tile
(:func:`tile_factor`) are rules fitted to the same profiles.

**Calibration** (:data:`CALIBRATION`, :data:`CALIBRATION_ERROR`): the per-class efficiencies and
the time per kernel were fitted to the NVIDIA H200 profiles of 2026-11-28 (ResNet-50 224 px batch
128 bf16 channels_last and VGG-16 CIFAR batch 128 fp32 (TF32); dense, DCP ``torch`` at round_to=8,
its ideal; residual groups dense) on traces of the code the H200 ran (commit a1b293fe, traced from
``git archive`` in a subprocess). Against the six GPU-busy times: ResNet-50 dense -4%, DCP -12%,
ideal -15%; VGG-16 dense -10%, DCP -30%, ideal -39%; DCP over its ideal +4% (ResNet-50) and +15%
(VGG-16). The largest miss: the H200 ran the pruned widths as slowly as dense (its ideal took 0.97x
and 1.00x dense's time where this estimate says 0.86x and 0.68x), so the ideal and with it every
pruned step is likely optimistic here. The H100 constants are the datasheet's with the H200's
efficiencies (same SM architecture), unverified on an H100. fp32 steps are NCHW as bench_step runs
them: cuDNN transposes every operand (counted), which a channels_last fp32 step would not pay.

The CPU's autocast policy stands in for CUDA's: these networks' ops agree (conv/linear in bf16, the
rest as it comes; DCP's compact path casts explicitly with autocast off); an op that CUDA would run
in fp32 and the CPU did not is listed in ``autocast_warnings``.

    python benchmarks/roofline.py --network resnet50 --gpu h100 --dtype bf16 --json out.json
    python benchmarks/roofline.py --network vgg16 --gpu h100 --dtype fp32 --variants dense,ideal,torch
    python benchmarks/roofline.py --code HEAD ...   # trace a commit's dcp_kernels, not the working tree
    python benchmarks/roofline.py --calibration --json calibration.json  # errors vs the H200, a refit

ResNet-50's state comes from steps at batch 2, 64 px (the process stays under 2 GB); each variant traces in
seconds to a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry
from torch.utils.module_tracker import ModuleTracker

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Constants. One table each; every number says where it comes from.

GPUS: dict[str, dict[str, float]] = {
    # Datasheet peaks (NVIDIA H100 SXM5 / H200 SXM datasheets, dense, no sparsity). The brief's
    # "realistic" 800 TFLOP/s bf16, 400 TFLOP/s TF32 and 3.0 TB/s are what the fitted efficiencies
    # below turn these peaks into; the efficiencies were fitted on the H200.
    "h100": {"bf16_flops": 989.4e12, "fp32_flops": 494.7e12, "bandwidth": 3.35e12},
    "h200": {"bf16_flops": 989.4e12, "fp32_flops": 494.7e12, "bandwidth": 4.8e12},
}
# fp32 convolutions and matmuls run on TF32 tensor cores (PyTorch's default for cuDNN convolutions;
# bench_step's fp32 runs used it); every other fp32 op is bandwidth-bound anyway.

CALIBRATION: dict[str, Any] = {
    # Fraction of the peak FLOP rate / bandwidth each op class reaches, fitted by fit_calibration()
    # (`python benchmarks/roofline.py --calibration`) to the H200 profile rows of MEASURED_H200, in
    # this order, on traces of the code the H200 ran (commit a1b293fe):
    "eff_flops": {
        "conv:bf16": 0.542,   # 4. ResNet-50 dense: cudnn_convolution + convolution_backward rows
        "conv:fp32": 0.399,   # 5. VGG-16 dense (TF32, NCHW: cuDNN's transposes included)
    },
    "eff_bw": {
        "conv": 0.6,          # not fitted: the convolutions here are FLOP-bound
        "batch_norm": 0.245,  # 2. ResNet-50 dense: native_batch_norm + backward rows
        # 1. ResNet-50 dense: add_ + threshold_backward + clamp_min_ rows (the fit wants more than
        # the 0.95 it is capped at: the row is estimated 5% high)
        "elementwise": 0.95,
        # 6. ResNet-50 DCP: the addcmul row (a bf16 activation times fp32 BN statistics: TensorIterator's
        # element-by-element casting kernel, elementwise_kernel<128, 4>, 62 us a call)
        "elementwise_mixed": 0.219,
        "copy_fill": 0.415,   # 3. ResNet-50 DCP: the copy_ row (299 calls a step, most of them small)
        # not fitted (no profile row): taken equal to copy_fill, the same kind of kernel
        "gather_scatter": 0.415,
        "sort": 1.0,          # latency-bound: see "sort_s"
        "host_read": 1.0,
    },
    # Time every kernel costs beyond its roofline time. 7. Fitted: ResNet-50 DCP's busy time over the
    # ideal's (7.48 ms, ~950 more kernels, most of them small) gives 3.05 us (the brief's prior: ~2 us,
    # the launch cost inside a captured CUDA graph; busy time also holds a small kernel's ramp).
    "per_kernel_s": 3.049e-06,
    # Convolution FLOPs are charged with their channels padded to this multiple (tile_factor): on
    # the H200 the ideal (widths in multiples of 8, conv FLOPs ~0.5x dense) spent as long in its
    # convolutions as dense (ResNet-50: 8.67 vs 8.58 ms/step; VGG-16: 2.85 vs 2.41), as did DCP
    # torch (8.68 ms). Padding to 64 (a tensor-core tile) accounts for part of that; larger tiles
    # would slow dense's 64-multiples too.
    "conv_channel_tile": 64,
    # GPU kernels per aten op where not 1 (see kernels_of).
    "kernels": {
        "convolution": 1,
        "convolution_backward_per_grad": 1,
        # bf16 channels_last: 5 more per layer than one per convolution and gradient, so that the
        # dense ResNet-50 count matches (958 vs 965; the profile's top rows do not name them:
        # cuDNN's split-K reductions and casts, presumably)
        "convolution:bf16": 2, "convolution_backward_per_grad:bf16": 3,
        "native_batch_norm": 2, "_native_batch_norm_legit": 2,   # H200 profile: collect statistics + transform
        "native_batch_norm_backward": 2,                         # H200 profile: backward reduce + elementwise
        "sort": 4,
    },
    # aten::sort of a few thousand utilities: 54 us a call on the H200 (VGG-16 DCP profile: 9 calls,
    # 485 us), several cub kernels; charged as a fixed time on top of its kernels.
    "sort_s": 50e-6,
}

# The estimate's error against the H200 (estimate / measured - 1) with the constants above, from
# `python benchmarks/roofline.py --calibration` (benchmarks/results/2026-12-07-roofline-calibration.json):
# GPU-busy time per step of each measured variant, the DCP step's time over its ideal's, the ideal's
# over dense's, and the kernel counts. Traced with the code the H200 ran (a1b293fe). What it misses
# most: the H200 ran the pruned widths as slowly as dense ("ideal over dense").
CALIBRATION_ERROR: dict[str, dict[str, float]] = {
    "resnet50-b128-224-bf16": {"dense": -0.044, "torch-round8": -0.121, "ideal-round8": -0.154,
                               "DCP over ideal": 0.038, "ideal over dense": -0.115,
                               "kernels dense": -0.007, "kernels torch-round8": -0.036, "kernels ideal-round8": -0.004},
    "vgg16-b128-32-fp32": {"dense": -0.104, "torch-round8": -0.302, "ideal-round8": -0.39,
                           "DCP over ideal": 0.145, "ideal over dense": -0.319,
                           "kernels dense": -0.062, "kernels torch-round8": -0.092, "kernels ideal-round8": -0.012},
}

# The H200 measurements (benchmarks/results/2026-11-28-gpu-h200: run.json and profile-step.txt;
# bench_step of commit a1b293fe: exact widths, round_to=8 on the GPU, residual groups dense, prune
# ratio 0.5, the ideal is the finalized round_to=8 selection). GPU busy = the sum of kernel times.
# "rows": profile rows (self CUDA time of 3 steps, / 3) -> (variant, ms per step); ROW_OPS says
# which traced ops each covers.
MEASURED_H200 = {
    "resnet50-b128-224-bf16": {
        "network": "resnet50", "dtype": "bf16", "batch": 128, "pixels": 224,
        "gpu_busy_ms": {"dense": 28.91, "torch-round8": 35.44, "ideal-round8": 27.96},
        "kernels": {"dense": 965, "torch-round8": 2026, "ideal-round8": 1012},
        "rows": {
            "conv": ("dense", (9.290 + 16.462) / 3), "batch_norm": ("dense", (21.025 + 17.133) / 3),
            "elementwise": ("dense", (5.958 + 5.278 + 3.442) / 3),
            "ideal conv": ("ideal-round8", (8.983 + 17.019) / 3),
            "ideal batch_norm": ("ideal-round8", (20.278 + 16.485) / 3),
            "addcmul": ("torch-round8", 6.312 / 3), "copy": ("torch-round8", 5.660 / 3),
        },
    },
    "vgg16-b128-32-fp32": {
        "network": "vgg16", "dtype": "fp32", "batch": 128, "pixels": 32,
        "gpu_busy_ms": {"dense": 4.16, "torch-round8": 5.95, "ideal-round8": 4.16},
        "kernels": {"dense": 274, "torch-round8": 699, "ideal-round8": 260},
        "rows": {
            "conv": ("dense", (2.025 + 5.199) / 3), "batch_norm": ("dense", (0.690 + 1.723) / 3),
            "ideal conv": ("ideal-round8", (1.722 + 6.843) / 3),
        },
    },
}
ROW_OPS: dict[str, Callable[["OpRecord"], bool]] = {
    "conv": lambda r: r.op.startswith("convolution"),
    "batch_norm": lambda r: r.cls == "batch_norm",
    # add_: residual sums and BN's num_batches_tracked; add: gradient sums; relu_ = clamp_min_
    "elementwise": lambda r: r.op in ("add_", "add", "threshold_backward", "relu_"),
    "addcmul": lambda r: r.op == "addcmul",
    "copy": lambda r: r.op in ("_to_copy", "copy_", "clone"),
}


# ----------------------------------------------------------------------------------------------
# Op classes.

# Ops that only make a new view of existing memory or allocate it (no kernel, no bytes). Ops whose
# schema says every output aliases an input (view, expand, permute, t, transpose, as_strided, slice,
# select, unsqueeze, squeeze, split, unbind, alias, detach, _reshape_alias, ...) are recognised from
# the schema; these are the ones the schema does not mark.
FREE_OPS = frozenset({
    "_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resize_",
    "set_", "lift_fresh", "_reshape_alias", "alias", "detach", "view", "expand", "permute", "t", "transpose",
    "as_strided", "slice", "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind",
})
# Query ops that never reach a kernel (dispatch plumbing).
_PASS_THROUGH = frozenset({
    "sym_is_contiguous", "is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "size",
    "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim",
    "layout", "device",
})
# Op name -> class (anything not listed is "elementwise": pointwise ops and reductions).
OP_CLASSES: dict[str, str] = {
    **dict.fromkeys(["convolution", "_convolution", "convolution_backward", "cudnn_convolution", "mm", "addmm",
                     "bmm", "baddbmm", "addbmm", "matmul", "linear"], "conv"),
    **dict.fromkeys(["native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
                     "_native_batch_norm_legit_functional", "_native_batch_norm_legit_no_training",
                     "cudnn_batch_norm", "cudnn_batch_norm_backward", "batch_norm_backward"], "batch_norm"),
    **dict.fromkeys(["index_select", "index_copy", "index_copy_", "index_put", "index_put_", "_index_put_impl_",
                     "index_add", "index_add_", "index_fill_", "index_fill", "scatter", "scatter_", "scatter_add",
                     "scatter_add_", "scatter_reduce", "scatter_reduce_", "gather", "take", "index",
                     "masked_scatter_", "masked_select", "embedding", "embedding_dense_backward"], "gather_scatter"),
    **dict.fromkeys(["copy_", "_to_copy", "clone", "fill_", "zero_", "zeros", "ones", "full", "zeros_like",
                     "ones_like", "full_like", "new_zeros", "new_ones", "new_full", "cat", "stack",
                     "constant_pad_nd", "_foreach_copy_", "_foreach_zero_", "scalar_tensor", "lift_fresh_copy",
                     "_copy_from", "_copy_from_and_resize"], "copy_fill"),
    **dict.fromkeys(["sort", "topk", "argsort", "kthvalue", "_unique2", "unique_dim", "unique_consecutive"], "sort"),
    # Ops whose result the host reads (a device-to-host copy and a stream sync on a GPU).
    **dict.fromkeys(["_local_scalar_dense", "nonzero", "equal", "is_nonzero", "allclose"], "host_read"),
}
# Ops that write only part of their destination: (destination arg, written = its source's bytes
# times this). index_add_/scatter_add_ read the rows they add into too.
PARTIAL_WRITES: dict[str, tuple[str, int]] = {
    "index_copy_": ("source", 1), "index_add_": ("source", 2), "index_put_": ("values", 1),
    "_index_put_impl_": ("values", 1), "scatter_": ("src", 1), "scatter_add_": ("src", 2),
    "masked_scatter_": ("source", 1),
}
# Gathers read only the elements they gather from their source (arg name), not all of it: that
# argument counts the output's bytes.
PARTIAL_READS: dict[str, str] = {"index_select": "self", "index": "self", "gather": "self", "take": "self",
                                 "embedding": "weight"}
# In-place ops that write their destination without reading it.
WRITE_ONLY = frozenset({"fill_", "zero_", "copy_", "_foreach_copy_", "_foreach_zero_", "normal_", "uniform_",
                        "random_", "bernoulli_", "exponential_", "_copy_from", "_copy_from_and_resize"})
# CUDA autocast runs these in float32 (at::autocast's fp32 list for CUDA); CPU autocast does not.
_CUDA_AUTOCAST_FP32 = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "norm", "linalg_vector_norm",
    "nll_loss", "nll_loss_forward", "_log_softmax", "_softmax", "sum", "prod", "cumsum", "cumprod", "logsumexp",
    "mse_loss", "l1_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits", "dist", "cdist", "renorm",
})


# ----------------------------------------------------------------------------------------------
# The trace.

@dataclass(frozen=True)
class TensorUse:
    """One tensor an op reads or writes: its element count and size, and its 4-D layout ("cl":
    channels_last, "nchw": plain contiguous with C > 1 and H*W > 1, "" otherwise)."""

    numel: int
    itemsize: int
    written: bool
    layout: str = ""

    @property
    def bytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class OpRecord:
    """One aten op of the step (views included, at zero cost)."""

    op: str                          # overload packet name: "convolution_backward", "dcp_torch::compact_conv2d"
    cls: str                         # op class (OP_CLASSES, "elementwise", "view")
    phase: str                       # "select", "forward", "backward", "optimizer"
    module: str                      # innermost module it ran in ("" outside any)
    flops: int
    tensors: tuple[TensorUse, ...]   # what it reads and writes (bytes = sum of their bytes)
    dtype: str = ""                  # its first floating tensor's dtype ("bf16", "fp32", ...)
    foreach_depth: int = 0           # _foreach_* ops: tensor lists read or written (multi_tensor_apply depth)
    foreach_len: int = 0             # ... and tensors per list
    conv_channels: tuple[int, int] = (0, 0)  # convolutions: (input, output) channels of a group-1 conv
    note: str = ""
    layer: str = ""                  # the conv/linear layer it belongs to (see _assign_layers)

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)


_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _layout(t: torch.Tensor) -> str:
    if t.dim() != 4 or t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1:
        return ""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "cl"
    return "nchw" if t.is_contiguous() else ""


def _use(t: torch.Tensor, written: bool) -> TensorUse:
    return TensorUse(t.numel(), t.element_size(), written, _layout(t))


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _is_free(func: torch._ops.OpOverload) -> bool:
    """A view or an allocation: every output aliases an input (and none is written), or FREE_OPS."""
    schema = func._schema
    if func._overloadpacket.__name__ in FREE_OPS:
        return True
    returns_alias = bool(schema.returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                                 for r in schema.returns)
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    return returns_alias and not writes


def tensor_uses(func: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], out: Any
                ) -> tuple[TensorUse, ...]:
    """What ``func(*args, **kwargs) -> out`` reads and writes, once each (a tensor passed twice is
    read once). Reads: its tensor arguments, except destinations written without being read
    (``out=``, ``fill_``/``zero_``/``copy_``'s self, the destination of a partial write). Writes: its
    fresh outputs and the arguments it mutates; a partial write (``index_copy_`` and friends) writes
    only its source's size."""
    name = func._overloadpacket.__name__
    reads: dict[int, torch.Tensor] = {}
    writes: dict[int, torch.Tensor] = {}
    partial = PARTIAL_WRITES.get(name)
    gathered_from = PARTIAL_READS.get(name)
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name)
        bound[arg.name] = value
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        if arg.name == gathered_from:
            reads.update((id(t), t) for t in _tensors(out))  # reads what it gathers: the output's size
            continue
        for t in _tensors(value):
            if mutated:
                if partial is None:
                    writes[id(t)] = t
                if arg.kwarg_only or name in WRITE_ONLY or partial is not None:
                    continue  # written, not read
            reads.setdefault(id(t), t)
    for ret, value in zip(func._schema.returns, out if isinstance(out, tuple) else (out,)):
        if ret.alias_info is None:  # a fresh output (an alias is an input already counted)
            for t in _tensors(value):
                writes.setdefault(id(t), t)
    uses = [_use(t, False) for t in reads.values()] + [_use(t, True) for t in writes.values()]
    if partial is not None:
        source, times = partial
        for t in _tensors(bound.get(source)):
            uses += [_use(t, True)] * times
    return tuple(uses)


def _dtype_of(tensors: Iterable[torch.Tensor]) -> str:
    for t in tensors:
        if t.is_floating_point():
            return _DTYPES.get(t.dtype, str(t.dtype))
    return ""


def _mixed_elementwise(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """An elementwise op (not a reduction: an output as large as its largest input) over floating
    tensors of more than one dtype (a bf16 activation with fp32 statistics): CUDA's TensorIterator
    casts element by element there, without its vectorized kernel."""
    floats = [t for t in inputs + outputs if t.is_floating_point()]
    if len({t.dtype for t in floats}) < 2 or not outputs:
        return False
    return max(t.numel() for t in outputs) >= max(t.numel() for t in inputs)


def _conv_channels(name: str, args: Sequence[Any]) -> tuple[int, int]:
    """(input, output) channels of an ungrouped 2-D convolution op, from its weight; (0, 0) else."""
    weight = {"convolution": 1, "convolution_backward": 2}.get(name)
    if weight is None:
        return (0, 0)
    w = args[weight]
    groups = args[8] if name == "convolution" else args[9]
    return (int(w.shape[1]), int(w.shape[0])) if w.dim() == 4 and groups == 1 else (0, 0)


def _python_impl(func: torch._ops.OpOverload) -> Callable | None:
    """The Python body of a ``torch.library.custom_op`` (to trace its aten ops), or None."""
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(func._name) if "::" in func._name else None
    return None if opdef is None else opdef._init_fn


# Custom ops that are one kernel on a GPU (a fused Triton or CUDA kernel): recorded as one op. Any
# other custom op is traced through its Python body (torch.library.custom_op) or, failing that,
# recorded as one opaque kernel with a note.
ONE_KERNEL_CUSTOM_OPS: frozenset[str] = frozenset({
    "dcp_triton::conv2d", "dcp_triton::channel_utility", "dcp::gathered_conv2d", "dcp::channel_utility",
    "dcp::implicit_gemm_conv2d", "dcp_triton::bn_backward_partials", "dcp_triton::bn_backward_apply",
})

# One-kernel custom ops charged otherwise than as "elementwise" (see op_seconds): the fused BN
# backward's two kernels do what cuDNN's two BN backward kernels do (a reduction reading g and y,
# then an elementwise pass reading them again and writing the input gradient).
CUSTOM_OP_CLASSES: dict[str, str] = {
    "dcp_triton::bn_backward_partials": "fused_bn", "dcp_triton::bn_backward_apply": "fused_bn",
}
# "fused_bn" is charged at the bandwidth cuDNN's BN kernels reached per byte they really move: the
# batch_norm efficiency was fitted to the forward and backward rows together on recorded bytes (forward
# y, out: 2 activation passes, where its two kernels move 3; backward g, y, grad: 3, where they move
# 5), so per real byte it is 8/5 of the fitted value. An assumption, not a fit: the Triton kernels have
# never run on a GPU, and hand-written kernels often reach less than cuDNN's.
FUSED_BN_PASSES_PER_RECORDED = 8 / 5


class _OrderedModuleTracker(ModuleTracker):
    """``ModuleTracker`` that also keeps the order modules were entered in: the op's module is the
    last one entered that is still running. (``parents`` is a set, and a module whose backward
    never reports its end, e.g. one whose input needs no gradient, stays in it.)"""

    def __init__(self) -> None:
        super().__init__()
        self.entered: list[str] = []
        self.forward_entries: list[tuple[str, int]] = []  # (module, ops recorded before it entered)
        self.recorded: Callable[[], int] = lambda: 0

    def _get_append_fn(self, name, is_bw):
        enter = super()._get_append_fn(name, is_bw)

        def fn(*args) -> None:
            enter(*args)
            self.entered.append(name)
            if not is_bw:
                self.forward_entries.append((name.partition(".")[2], self.recorded()))

        return fn

    def _get_pop_fn(self, name, is_bw):
        leave = super()._get_pop_fn(name, is_bw)

        def fn(*args) -> None:
            leave(*args)
            if name in self.entered:
                del self.entered[len(self.entered) - 1 - self.entered[::-1].index(name)]

        return fn

    def innermost(self) -> str:
        """The running module entered last, without the root's class name ("" outside modules)."""
        name = next((n for n in reversed(self.entered) if n in self.parents), "")
        return name.partition(".")[2]


class _HostReads(TorchFunctionMode):
    """``Tensor.tolist()`` and ``.numpy()`` read a tensor on the host without an aten op on the CPU
    (on a GPU: a device-to-host copy and a sync): recorded as ``host_read`` ops of the tracer."""

    def __init__(self, tracer: StepTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and isinstance(args[0], torch.Tensor):
            t = args[0]
            self.tracer.records.append(OpRecord(
                func.__name__, "host_read", self.tracer.current_phase(), self.tracer._module(), 0,
                (_use(t, False), _use(t, True)), _dtype_of([t]),
                note="host read: a device-to-host copy and a sync on a GPU"))
        return func(*args, **(kwargs or {}))


_BATCH_NORM_WITH_STATISTICS = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional"}


def _batch_norm_statistics_in_float32(func: torch._ops.OpOverload, out: Any) -> Any:
    """PyTorch's meta kernel of batch norm returns the saved mean and invstd in the input's low
    precision where the CPU and CUDA kernels return float32; on fake tensors they are made float32,
    so the ops that read them (DCP's utility casts the mean) run as in the real step."""
    if func._overloadpacket.__name__ not in _BATCH_NORM_WITH_STATISTICS or not isinstance(out, tuple):
        return out
    stats = out[1:3]
    if not all(isinstance(t, FakeTensor) and t.dtype in (torch.bfloat16, torch.float16) for t in stats):
        return out
    return (out[0], *(t.to(torch.float32) for t in stats), *out[3:])


class StepTracer(TorchDispatchMode):
    """Records every aten op run inside it as an :class:`OpRecord` (in :attr:`records`).

    FLOPs are counted as ``FlopCounterMode`` counts them: an op without a formula in
    ``flop_registry`` is first decomposed (CompositeImplicit) and its parts recorded, as the flop
    counter does; custom ops are traced through (see ONE_KERNEL_CUSTOM_OPS). ``phase`` is set by the
    caller (select / forward / optimizer); backward is read from the autograd engine."""

    def __init__(self, tracker: _OrderedModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.phase = "forward"
        self.records: list[OpRecord] = []
        tracker.recorded = lambda: len(self.records)
        self.autocast_warnings: set[str] = set()

    def current_phase(self) -> str:
        return "backward" if self.tracker.is_bw else self.phase

    def _module(self) -> str:
        return self.tracker.innermost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return NotImplemented
        name = func._overloadpacket.__name__
        if name in _PASS_THROUGH or func is torch.ops.prim.device.default or func.namespace == "profiler":
            return func(*args, **kwargs)
        # As FlopCounterMode: no formula -> try the CompositeImplicit decomposition first (not for
        # views: their decomposition may copy, and has no FLOPs either way).
        if func._overloadpacket not in flop_registry and not _is_free(func):
            with self:
                result = func.decompose(*args, **kwargs)
            if result is not NotImplemented:
                return result
        if _is_custom(func) and func._name not in ONE_KERNEL_CUSTOM_OPS:
            body = _python_impl(func)
            if body is not None:
                with self:
                    return body(*args, **kwargs)
        out = _batch_norm_statistics_in_float32(func, func(*args, **kwargs))
        self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name, phase, module = func._overloadpacket.__name__, self.current_phase(), self._module()
        if _is_free(func):
            self.records.append(OpRecord(name, "view", phase, module, 0, ()))
            return
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        cls, name, note = _classify(func, inputs, outputs)
        packet = func._overloadpacket
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        if phase == "forward" and name in _CUDA_AUTOCAST_FP32 and torch.is_autocast_enabled("cpu") and any(
                t.dtype in (torch.bfloat16, torch.float16) for t in inputs):
            self.autocast_warnings.add(name)
        self.records.append(OpRecord(name, cls, phase, module, flops, tensor_uses(func, args, kwargs, out),
                                     _dtype_of(inputs + outputs), *_foreach_lists(name, args),
                                     _conv_channels(name, args), note))


def _is_custom(func: torch._ops.OpOverload) -> bool:
    return not func._name.startswith(("aten::", "prim::"))


def _classify(func: torch._ops.OpOverload, inputs: list[torch.Tensor], outputs: list[torch.Tensor]
              ) -> tuple[str, str, str]:
    """(class, name, note) of a recorded op."""
    name = func._overloadpacket.__name__
    if _is_custom(func):
        op = func._name.split(".")[0]
        return CUSTOM_OP_CLASSES.get(op, "custom"), op, "custom op counted as one kernel"
    cls = OP_CLASSES.get(name, "elementwise")
    if cls == "elementwise" and _mixed_elementwise(inputs, outputs):
        cls = "elementwise_mixed"
    return cls, name, "host read: a device-to-host copy and a sync on a GPU" if cls == "host_read" else ""


def _foreach_lists(name: str, args: Sequence[Any]) -> tuple[int, int]:
    """A ``_foreach_*`` op's (depth, tensors per list): the tensor lists multi_tensor_apply walks,
    its output list included when it makes one; (0, 0) for other ops."""
    if not name.startswith("_foreach_"):
        return 0, 0
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    return len(lists) + (0 if name.endswith("_") else 1), len(lists[0]) if lists else 0


@dataclass
class Trace:
    """The ops of one training step at (batch, pixels)."""

    records: list[OpRecord]
    batch: int
    pixels: int
    autocast_warnings: list[str] = field(default_factory=list)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                amp_dtype: torch.dtype | None, tracer: StepTracer | None = None) -> None:
    """bench_step's training step (forward and loss under autocast, backward, SGD step), with the
    phases marked for the tracer. Not bench_step._sgd_step itself: that one builds its optimizer
    inside, and a trace needs one whose momentum buffers can be saved and restored."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if tracer is not None:
        tracer.phase = "optimizer"
    opt.step()


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """bench_step's SGD, with multi-tensor (foreach) kernels: the default on a GPU, which the CPU's
    default (a loop over the parameters) would not show."""
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, foreach=True)


@dataclass
class Prepared:
    """A model ready to trace: its state after one steady step (model, DCP controller, optimizer),
    restored before every trace so that every trace runs the same selection and the same ops."""

    model: nn.Module
    prop: Any
    opt: torch.optim.Optimizer
    state: dict[str, Any]
    amp_dtype: torch.dtype | None
    channels_last: bool

    def restore(self) -> None:
        self.model.load_state_dict(self.state["model"])
        if self.prop is not None:
            self.prop.load_state_dict(self.state["prop"])
        self.opt.load_state_dict(self.state["opt"])


def prepare(model: nn.Module, prop: Any, batch: int, pixels: int, dtype: torch.dtype = torch.float32) -> Prepared:
    """Run one untraced step at (batch, pixels) (momentum buffers created, the DCP selection past
    its first step) and save the state every trace starts from."""
    amp_dtype, channels_last = _bench_step()._precision(dtype)
    model.train()
    opt = _optimizer(model)
    _train_step(model, opt, *_batch(batch, pixels, channels_last, seed=5), amp_dtype)
    state = copy.deepcopy({"model": model.state_dict(), "prop": None if prop is None else prop.state_dict(),
                           "opt": opt.state_dict()})
    return Prepared(model, prop, opt, state, amp_dtype, channels_last)


def _batch(batch: int, pixels: int, channels_last: bool, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return _bench_step()._batch(batch, pixels, torch.device("cpu"), seed, channels_last)


def trace_step(prepared: Prepared, batch: int, pixels: int, *, fake: bool = True) -> Trace:
    """The ops of one training step at (batch, pixels), from the prepared state.

    ``fake=True`` (the estimate): the selection runs for real (it reads the utilities on the host;
    its ops do not depend on the batch), then forward, backward and the optimizer step run on fake
    tensors (``FakeTensorMode``: shapes, dtypes and layouts without memory or arithmetic), so a
    GPU-size step traces in seconds on any CPU, every size-dependent code path taken as at that
    size. ``fake=False`` runs it all for real (what the tests compare the fake trace with)."""
    prepared.restore()
    x, y = _batch(batch, pixels, prepared.channels_last)
    try:
        with _cuda_code_paths(real_kernels=not fake):
            return _trace(prepared, x, y, fake)
    finally:  # fake gradients must not outlive the trace (deep copies of the model would meet them)
        prepared.opt.zero_grad(set_to_none=True)


def _cuda_code_paths(real_kernels: bool) -> contextlib.AbstractContextManager:
    """The step's CUDA code paths on CPU tensors, where dcp_kernels chooses by device: the ``torch``
    backend's fused Triton BN backward (``ops.layer.fused_bn_backward_applies``). Where its kernels
    must really run (``real_kernels``), only under ``TRITON_INTERPRET=1``; code older than the fused
    backward (``--code``, the calibration's commit) has no switch and is traced as it is."""
    import dcp_kernels.ops as ops

    forced = getattr(importlib.import_module("dcp_kernels.ops.layer"), "forced_fused_bn_backward", None)
    if forced is None or not ops._triton_installed() or (real_kernels and not ops.triton_interpreting()):
        return contextlib.nullcontext()
    return forced(True)


def _trace(prepared: Prepared, x: torch.Tensor, y: torch.Tensor, fake: bool) -> Trace:
    batch, pixels = x.shape[0], x.shape[-1]
    model, prop = prepared.model, prepared.prop
    with _OrderedModuleTracker() as tracker:
        tracer = StepTracer(tracker)
        if not fake:
            with _phase_hooks(model, tracer), tracer, _HostReads(tracer):
                _train_step(model, prepared.opt, x, y, prepared.amp_dtype, tracer)
            return _finished(tracer, batch, pixels)
        select = _selection_hook(model)
        if select is not None:  # what the model's forward pre-hook does, for real
            tracer.phase = "select"
            with tracer, _HostReads(tracer):
                select(model, (x,))
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, _without_dcp_hooks(prop):
            x, y = fake_mode.from_tensor(x), fake_mode.from_tensor(y)
            tracer.phase = "forward"
            with tracer, _HostReads(tracer):
                _train_step(model, prepared.opt, x, y, prepared.amp_dtype, tracer)
    return _finished(tracer, batch, pixels)


def _finished(tracer: StepTracer, batch: int, pixels: int) -> Trace:
    _assign_layers(tracer.records, tracer.tracker.forward_entries)
    return Trace(tracer.records, batch, pixels, sorted(tracer.autocast_warnings))


_LAYER_OPS = frozenset({"convolution", "addmm", "mm"})


def _assign_layers(records: list[OpRecord], entries: Sequence[tuple[str, int]]) -> None:
    """Each op's layer: the conv (or linear) layer it belongs to, to compare networks layer by layer
    (a DCP layer runs its BatchNorm inside, the ideal after it). In forward, an op belongs to the
    module it runs in if that module runs a convolution, else to the last such module that ran; in
    backward, to the layer of its module's last forward op (a module without forward ops, such as
    the Identity where a DCP layer's BatchNorm was: the layer current when it was entered). Approximate
    where a module runs more than once (a block's shared ReLU)."""
    conv_modules = {r.module for r in records if r.phase == "forward" and r.op in _LAYER_OPS}
    layer_of: dict[str, str] = {}
    entered = iter(entries)
    entry = next(entered, None)
    current = ""
    for i, rec in enumerate(records):
        while entry is not None and entry[1] <= i:
            layer_of.setdefault(entry[0], current)
            entry = next(entered, None)
        if rec.phase in ("select", "optimizer"):
            rec.layer = "(selection)" if rec.phase == "select" else "(optimizer)"
        elif rec.phase == "forward":
            if rec.module in conv_modules:
                current = rec.module
            rec.layer = current if rec.module else "(outside modules)"
            if rec.module:
                layer_of[rec.module] = rec.layer
        else:
            rec.layer = layer_of.get(rec.module, rec.module) or "(outside modules)"


def trace_call(fn: Callable[[], Any]) -> list[OpRecord]:
    """The ops ``fn()`` runs, recorded as a step's are (phase "forward", module "" outside modules)."""
    with _OrderedModuleTracker() as tracker:
        tracer = StepTracer(tracker)
        with tracer, _HostReads(tracer):
            fn()
    return _finished(tracer, 0, 0).records


@contextlib.contextmanager
def _phase_hooks(model: nn.Module, tracer: StepTracer) -> Iterator[None]:
    """The DCP selection runs in the model's forward pre-hook: a hook before it and one after it
    mark its ops (a model without DCP goes straight to "forward")."""
    handles = [model.register_forward_pre_hook(lambda *_: setattr(tracer, "phase", "select"), prepend=True),
               model.register_forward_pre_hook(lambda *_: setattr(tracer, "phase", "forward"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _selection_hook(model: nn.Module) -> Callable | None:
    """The DCP controller's forward pre-hook on ``model`` (the selection), if it has one."""
    from dcp_kernels.propagation import _SelectBeforeForward

    return next((h for h in model._forward_pre_hooks.values() if isinstance(h, _SelectBeforeForward)), None)


def _without_dcp_hooks(prop: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if prop is None else prop.without_hook()


def _bench_step():
    """benchmarks/bench_step.py, whose builders make every variant. It imports ``conftest`` by name
    (benchmarks/conftest.py); imported from tests/ that name is tests/conftest.py, so the benchmarks'
    one stands in while bench_step imports."""
    if "bench_step" in sys.modules:
        return sys.modules["bench_step"]
    if str(HERE) not in sys.path:  # appended: a bench_step earlier on the path (--import-root) wins
        sys.path.append(str(HERE))
    saved = sys.modules.get("conftest")
    with warnings.catch_warnings():  # its benchmark marks are registered by benchmarks/conftest.py only
        warnings.filterwarnings("ignore", message="Unknown pytest.mark")
        if saved is not None and not hasattr(saved, "backend_skip_reason"):
            spec = importlib.util.spec_from_file_location("conftest", HERE / "conftest.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["conftest"] = module
            try:
                import bench_step
            finally:
                sys.modules["conftest"] = saved
        else:
            import bench_step
    return bench_step


# ----------------------------------------------------------------------------------------------
# Networks and variants (built by bench_step's builders).

@dataclass(frozen=True)
class Network:
    """A network, the GPU configuration it is estimated at, and the CPU size of the real steps that
    make its state (exploration, selection, momentum) before the step is traced at the GPU size."""

    factory: Callable[[], nn.Module]
    gpu_batch: int
    gpu_pixels: int
    base_batch: int
    base_pixels: int


def networks() -> dict[str, Network]:
    """The networks, from bench_step's tables."""
    bs = _bench_step()
    return {
        "resnet50": Network(bs._resnet50, 128, 224, 2, 64),
        "vgg16": Network(bs.NETWORKS["vgg16-cifar"][0], 128, 32, 4, 32),
        "resnet56": Network(bs.NETWORKS["resnet56-cifar"][0], 128, 32, 4, 32),
        "tiny-vgg": Network(bs.QUICK_NETWORKS["tiny-vgg"][0], 128, 32, 2, 8),
    }


# Variant -> (bench_step variant it is built from, finalized?). An ideal is the finalized network
# of the selection its DCP variant traces: each DCP variant has its own (the capacity conversions
# explore on their own, and their selections can differ from the exact ones').
VARIANTS: dict[str, tuple[str, bool]] = {
    "dense": ("dense", False),
    "ideal": ("torch", True),
    "ideal-round8": ("torch-round8", True),
    "ideal-capacity": ("torch-capacity", True),
    "ideal-capacity-round8": ("torch-capacity-round8", True),
    "torch": ("torch", False),
    "torch-round8": ("torch-round8", False),
    "torch-capacity": ("torch-capacity", False),
    "torch-capacity-round8": ("torch-capacity-round8", False),
}
# Each variant against its ideal (dense against the exact variant's).
IDEAL_OF = {"dense": "ideal", **{v: v for v in VARIANTS if v.startswith("ideal")},
            **{v: "ideal" + v.removeprefix("torch") for v in VARIANTS if v.startswith("torch")}}
DEFAULT_VARIANTS = tuple(VARIANTS)


def _register(network: str, prune_residual: bool) -> str:
    """bench_step's name for this network at its traced size (added to its table, as bench_step's
    own networks: ``-residual`` converts with ``prune_residual=True``), and the capacity variant at
    round_to=8 (the GPU default; bench_step sets round_to=8 only on a GPU)."""
    bs = _bench_step()
    net = networks()[network]
    name = f"roofline-{network}-b{net.base_batch}-{net.base_pixels}px" + ("-residual" if prune_residual else "")
    bs.ALL_NETWORKS.setdefault(name, (net.factory, net.base_batch, net.base_pixels))
    if hasattr(bs, "CONVERSIONS"):  # (bench_step before static shapes had none)
        bs.CONVERSIONS.setdefault("torch-capacity-round8", ("torch", True, 8))
    return name


def build_variant(network: str, variant: str, *, prune_ratio: float = 0.5, prune_residual: bool = True,
                  dtype: torch.dtype = torch.float32, round_to: int | None = None) -> Prepared:
    """A variant ready to trace: bench_step builds it at the network's CPU size (exploration steps,
    then the first selecting step); one more step makes the state every trace restores.
    ``round_to`` overrides a DCP variant's width multiple before that step (through the
    controller's state dict: for code whose bench_step has no round_to=8 variant on a CPU)."""
    bs = _bench_step()
    name = _register(network, prune_residual)
    source, finalized = VARIANTS[variant]
    cpu = torch.device("cpu")
    net = networks()[network]
    if source == "dense":
        model, _ = bs._variant_model(name, prune_ratio, "dense", cpu, dtype)
        return prepare(model, None, net.base_batch, net.base_pixels, dtype)
    model, prop = bs._prepared(name, prune_ratio, source, cpu, dtype)
    if round_to is not None and prop.round_to != round_to:
        prop.load_state_dict({**prop.state_dict(), "round_to": round_to})
        _PREPARED.pop((id(model), dtype), None)
    prepared = _prepared_dcp(model, prop, net, dtype)
    if not finalized:
        return prepared
    # The selection every trace of the DCP variant makes (its pre-hook selects from the restored
    # utilities), finalized as bench_step finalizes (the layout is kept: channels_last stays).
    prepared.restore()
    prop.select()
    return prepare(copy.deepcopy(prop.finalize()), None, net.base_batch, net.base_pixels, dtype)


_PREPARED: dict[tuple, Prepared] = {}


def _prepared_dcp(model: nn.Module, prop: Any, net: Network, dtype: torch.dtype) -> Prepared:
    """One Prepared per bench_step model (the ideal and its DCP variant share it)."""
    key = (id(model), dtype)
    if key not in _PREPARED or _PREPARED[key].model is not model:
        _PREPARED[key] = prepare(model, prop, net.base_batch, net.base_pixels, dtype)
    return _PREPARED[key]


# ----------------------------------------------------------------------------------------------
# The cost model.

# CUDA's multi_tensor_apply (ATen/native/cuda/MultiTensorApply.cuh): tensors per launch by depth,
# blocks per launch, elements per block.
_MTA_MAX_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
_MTA_MAX_BLOCKS = 320
_MTA_CHUNK = 65536


def multi_tensor_launches(numels: Sequence[int], depth: int) -> int:
    """Kernel launches of one ``_foreach_*`` op on CUDA, as multi_tensor_apply packs them."""
    max_tensors = _MTA_MAX_TENSORS[min(depth, 5)]
    launches = tensors = blocks = 0
    numels = [n for n in numels if n > 0]
    for t, n in enumerate(numels):
        tensors += 1
        chunks = -(-n // _MTA_CHUNK)
        for chunk in range(chunks):
            blocks += 1
            last_of_tensor = chunk == chunks - 1
            if (tensors == max_tensors and last_of_tensor) or blocks == _MTA_MAX_BLOCKS or (
                    t == len(numels) - 1 and last_of_tensor):
                launches += 1
                blocks = 0
                tensors = 0 if last_of_tensor else 1
    return launches


def _conv_transposes(rec: OpRecord) -> list[TensorUse]:
    """The NCHW operands of a convolution: cuDNN runs NHWC (tensor cores), so each one is transposed
    by a kernel of its own (the H200 profile of VGG-16 fp32: ~100 nchwToNhwc/nhwcToNchw kernels a
    step for 13 convs, ~3 per forward and ~5 per backward); a channels_last step has none."""
    if rec.op not in ("convolution", "convolution_backward"):
        return []
    return [t for t in rec.tensors if t.layout == "nchw"]


def kernels_of(rec: OpRecord, cal: dict[str, Any] = CALIBRATION) -> int:
    """GPU kernels one op launches (memsets and copies included, as the profiler counts them)."""
    if rec.cls == "view":
        return 0
    if rec.foreach_depth:
        return multi_tensor_launches([t.numel for t in rec.tensors[:rec.foreach_len]], rec.foreach_depth)
    per_op, precision = cal["kernels"], _precision(rec)

    def count(name: str) -> int:
        return per_op.get(f"{name}:{precision}", per_op.get(name, 1))

    if rec.op == "convolution_backward":  # per gradient asked for (dgrad, wgrad, bias)
        n = count("convolution_backward_per_grad") * sum(t.written for t in rec.tensors)
    else:
        n = count(rec.op)
    return n + len(_conv_transposes(rec))


def tile_factor(rec: OpRecord, tile: int) -> float:
    """How many more FLOPs a convolution's tensor-core tiles execute than it needs: input and output
    channels padded to a multiple of ``tile`` (below 16 channels, e.g. an RGB input, cuDNN has
    kernels of their own: not padded). Dense ResNet-50's and VGG-16's widths are multiples of 64;
    pruned ones (48, 88, 136, ...) are not, and the H200 ran them no faster than dense (see
    CALIBRATION["conv_channel_tile"])."""
    padded = 1.0
    for c in rec.conv_channels:
        if c >= 16:
            padded *= -(-c // tile) * tile / c
    return padded


def _precision(rec: OpRecord) -> str:
    return "bf16" if rec.dtype in ("bf16", "fp16") else "fp32"


def op_seconds(rec: OpRecord, gpu: dict[str, float], cal: dict[str, Any] = CALIBRATION) -> float:
    """``max(FLOPs / (peak * eff), bytes / (bandwidth * eff)) + per_kernel * kernels`` (+ the fixed
    time of a sort)."""
    if rec.cls == "view":
        return 0.0
    cls = "elementwise" if rec.cls == "custom" else rec.cls
    compute = 0.0
    if rec.flops:
        precision = _precision(rec)
        compute = rec.flops * tile_factor(rec, cal["conv_channel_tile"]) / (
            gpu[f"{precision}_flops"] * cal["eff_flops"][f"conv:{precision}"])
    efficiency = (cal["eff_bw"]["batch_norm"] * FUSED_BN_PASSES_PER_RECORDED if cls == "fused_bn"
                  else cal["eff_bw"][cls])
    memory = rec.bytes / (gpu["bandwidth"] * efficiency)
    # cuDNN's layout transposes are kernels of their own, after or before the convolution's.
    transposes = 2 * sum(t.bytes for t in _conv_transposes(rec)) / (gpu["bandwidth"] * cal["eff_bw"]["copy_fill"])
    fixed = cal["sort_s"] if cls == "sort" else 0.0
    return max(compute, memory) + transposes + fixed + cal["per_kernel_s"] * kernels_of(rec, cal)


# ----------------------------------------------------------------------------------------------
# Estimates and their breakdowns.

def _add(table: dict[str, dict[str, float]], key: str, seconds: float, rec: OpRecord, kernels: int) -> None:
    row = table.setdefault(key, {"ms": 0.0, "ops": 0, "kernels": 0, "gb": 0.0, "gflop": 0.0})
    row["ms"] += seconds * 1e3
    row["ops"] += 1
    row["kernels"] += kernels
    row["gb"] += rec.bytes / 1e9
    row["gflop"] += rec.flops / 1e9


def _rounded(table: dict[str, dict[str, float]], top: int | None = None) -> dict[str, dict[str, float]]:
    rows = sorted(table.items(), key=lambda kv: -kv[1]["ms"])[:top]
    return {k: {f: round(v, 4) if isinstance(v, float) else v for f, v in row.items()} for k, row in rows}


def estimate(trace: Trace, gpu: str, cal: dict[str, Any] = CALIBRATION) -> dict[str, Any]:
    """The step's estimated time on ``gpu`` (a GPUS key) and where it goes: by op class, op, layer
    and phase (ms, ops, kernels, GB moved, GFLOP)."""
    constants = GPUS[gpu]
    tables: dict[str, dict[str, dict[str, float]]] = {k: {} for k in ("by_class", "by_op", "by_layer", "by_phase")}
    notes: set[str] = set()
    for rec in trace.records:
        if rec.cls == "view":
            continue
        seconds, kernels = op_seconds(rec, constants, cal), kernels_of(rec, cal)
        for table, key in (("by_class", rec.cls), ("by_op", rec.op), ("by_layer", rec.layer),
                           ("by_phase", rec.phase)):
            _add(tables[table], key, seconds, rec, kernels)
        if rec.note:
            notes.add(f"{rec.op}: {rec.note}")
    totals = tables["by_phase"].values()
    return {
        "ms": round(sum(r["ms"] for r in totals), 4),
        "kernels": sum(r["kernels"] for r in totals),
        "gb": round(sum(r["gb"] for r in totals), 3),
        "tflop": round(sum(r["gflop"] for r in totals) / 1e3, 4),
        **{name: _rounded(table) for name, table in tables.items()},
        "notes": sorted(notes),
    }


def _difference(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], top: int
                ) -> dict[str, dict[str, float]]:
    """Row by row ``a - b`` (ms, kernels, GB), largest extra time first."""
    keys = set(a) | set(b)
    zero = {"ms": 0.0, "kernels": 0, "gb": 0.0}
    rows = {k: {f: round(a.get(k, zero)[f] - b.get(k, zero)[f], 4) for f in ("ms", "kernels", "gb")} for k in keys}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"])[:top])


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def traced_variants(network: str, dtype: str, variants: Iterable[str], *, prune_ratio: float = 0.5,
                    prune_residual: bool = True, batch: int | None = None, pixels: int | None = None,
                    round_to: int | None = None) -> tuple[dict[str, Trace], dict[str, dict]]:
    """Each variant's step traced at (batch, pixels) (default: the network's GPU configuration), and
    each DCP variant's kept widths (bench_step's ``_widths``)."""
    bs = _bench_step()
    net = networks()[network]
    batch, pixels = batch or net.gpu_batch, pixels or net.gpu_pixels
    traces, widths = {}, {}
    try:
        for variant in variants:
            prepared = build_variant(network, variant, prune_ratio=prune_ratio, prune_residual=prune_residual,
                                     dtype=DTYPES[dtype], round_to=round_to)
            traces[variant] = trace_step(prepared, batch, pixels)
            if prepared.prop is not None and hasattr(bs, "_widths"):
                widths[variant] = bs._widths(prepared.prop)
    finally:  # the models of one configuration are not needed by the next
        _PREPARED.clear()
        bs._CACHE.clear()
    return traces, widths


def compare(estimates: dict[str, dict[str, Any]], top: int = 15) -> dict[str, Any]:
    """Ratios to dense and to each variant's ideal, and what each DCP variant adds over its ideal
    (by op and by layer)."""
    for name, est in estimates.items():
        ideal = estimates.get(IDEAL_OF.get(name, ""))
        est["vs_dense"] = round(est["ms"] / estimates["dense"]["ms"], 4) if "dense" in estimates else None
        est["vs_ideal"] = round(est["ms"] / ideal["ms"], 4) if ideal else None
    over = {}
    for name, est in estimates.items():
        ideal = estimates.get(IDEAL_OF.get(name, ""))
        if name.startswith("torch") and ideal:
            over[name] = {"ideal": IDEAL_OF[name], "ms": round(est["ms"] - ideal["ms"], 4),
                          "kernels": est["kernels"] - ideal["kernels"], "gb": round(est["gb"] - ideal["gb"], 3),
                          "by_op": _difference(est["by_op"], ideal["by_op"], top),
                          "by_layer": _difference(est["by_layer"], ideal["by_layer"], top)}
    return over


def run(network: str, gpu: str = "h100", dtype: str = "fp32", variants: Sequence[str] = DEFAULT_VARIANTS, *,
        prune_ratio: float = 0.5, prune_residual: bool = True, batch: int | None = None, pixels: int | None = None,
        top: int = 15, cal: dict[str, Any] = CALIBRATION, code: str | None = None) -> dict[str, Any]:
    """The roofline report of one configuration (a JSON-ready dict). ``code``: the commit whose
    dcp_kernels is imported (labels the report; see --code), None: this checkout."""
    net = networks()[network]
    batch, pixels = batch or net.gpu_batch, pixels or net.gpu_pixels
    traces, widths = traced_variants(network, dtype, variants, prune_ratio=prune_ratio,
                                     prune_residual=prune_residual, batch=batch, pixels=pixels)
    estimates = {name: estimate(trace, gpu, cal) for name, trace in traces.items()}
    over = compare(estimates, top)
    for name, est in estimates.items():
        est["top_ops"] = dict(list(est.pop("by_op").items())[:top])
        est["by_layer"] = dict(list(est["by_layer"].items())[:top])
        if name in widths:
            est["widths"] = widths[name]
    return {
        "what": "roofline ESTIMATE of one training step on a GPU, traced on the CPU (benchmarks/roofline.py); "
                "not a measurement",
        "date": datetime.date.today().isoformat(),
        "commit": _commit(code),
        "traced_on": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads()},
        "config": {"network": network, "gpu": gpu, "dtype": dtype, "batch": batch, "pixels": pixels,
                   "prune_ratio": prune_ratio, "prune_residual": prune_residual,
                   "channels_last": dtype != "fp32",
                   "state_from": f"real CPU steps at batch {net.base_batch}, {net.base_pixels} px; "
                                 f"the step traced on fake tensors at batch {batch}, {pixels} px"},
        "constants": {"gpu": GPUS[gpu], "calibration": cal, "calibration_error": CALIBRATION_ERROR},
        "autocast_warnings": sorted({w for t in traces.values() for w in t.autocast_warnings}),
        "variants": estimates,
        "dcp_over_ideal": over,
    }


def _commit(code: str | None = None) -> str:
    """The traced code: commit ``code`` (see --code), or this checkout's HEAD (``-dirty`` with
    uncommitted changes)."""
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", code or "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if code:
            return out
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Printing.

def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """The summary table, each variant's top ops, and what DCP adds over its ideal (Markdown)."""
    c = report["config"]
    out = [f"Roofline ESTIMATE: {c['network']} batch {c['batch']} {c['pixels']} px {c['dtype']} on {c['gpu']} "
           f"(prune {c['prune_ratio']}, prune_residual={c['prune_residual']}; {c['state_from']})", ""]
    out.append(_table(["variant", "ms", "vs dense", "vs ideal", "kernels", "GB", "TFLOP"],
                      [(n, f"{e['ms']:.2f}", _x(e["vs_dense"]), _x(e["vs_ideal"]), e["kernels"], f"{e['gb']:.1f}",
                        f"{e['tflop']:.3f}") for n, e in report["variants"].items()]))
    out += [line for name, est in report["variants"].items() for line in _top_ops(name, est)]
    out += [line for name, over in report["dcp_over_ideal"].items() for line in _over_ideal(name, over)]
    if report["autocast_warnings"]:
        out += ["", "CUDA autocast would run these in fp32, the CPU trace did not: "
                + ", ".join(report["autocast_warnings"])]
    return "\n".join(out)


def _top_ops(name: str, est: dict[str, Any]) -> list[str]:
    classes = ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in est["by_class"].items())
    rows = [(op, f"{r['ms']:.3f}", r["ops"], r["kernels"], f"{r['gb']:.2f}", f"{r['gflop']:.1f}")
            for op, r in est["top_ops"].items()]
    return ["", f"{name}: top ops (by class: {classes})", _table(["op", "ms", "ops", "kernels", "GB", "GFLOP"], rows)]


def _over_ideal(name: str, over: dict[str, Any]) -> list[str]:
    out = []
    for what in ("by_op", "by_layer"):
        rows = [(k, f"{r['ms']:+.3f}", f"{r['kernels']:+d}", f"{r['gb']:+.2f}") for k, r in over[what].items()]
        out += ["", f"{name} over {over['ideal']} ({over['ms']:+.2f} ms, {over['kernels']:+d} kernels, "
                    f"{over['gb']:+.1f} GB), {what[3:]}:", _table([what[3:], "ms", "kernels", "GB"], rows)]
    return out


# ----------------------------------------------------------------------------------------------
# Calibration on the H200 measurements.

def calibration_traces(code: str | None = "a1b293fe") -> dict[str, dict[str, Trace]]:
    """The measured configurations' steps (:data:`MEASURED_H200`), traced with the DCP code of
    commit ``code`` (the one the H200 ran, in a subprocess: see :func:`_at_commit`) or, with
    ``code=None``, with the code of this checkout."""
    if code is None:
        return _trace_measured()
    with _at_commit(code) as root:
        out = Path(root) / "traces.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--import-root", root,
                        "--trace-calibration", str(out)], check=True)
        return {key: {v: trace_from_json(t) for v, t in variants.items()}
                for key, variants in json.loads(out.read_text()).items()}


@contextlib.contextmanager
def _at_commit(code: str) -> Iterator[str]:
    """A temporary directory holding dcp_kernels and bench_step (with what it imports) as of commit
    ``code`` (``git archive``): a process that puts it first on its path (``--import-root``) traces
    that code, whatever the working tree holds."""
    with tempfile.TemporaryDirectory() as root:
        files = ["dcp_kernels", "benchmarks/bench_step.py", "benchmarks/conftest.py", "benchmarks/peak_memory.py"]
        archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", code, *files], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", root], input=archive.stdout, check=True)
        yield root


def _trace_measured() -> dict[str, dict[str, Trace]]:
    """MEASURED_H200's variants: dense, and the "torch" conversion and its ideal at round_to=8."""
    out: dict[str, dict[str, Trace]] = {}
    for key, m in MEASURED_H200.items():
        # (the ideal first: it is finalized before any fake step ran on the DCP model; a fake step
        # leaves a fake tensor in a cache of a1b293fe's layers, harmless but deep-copied by finalize)
        traces, _ = traced_variants(m["network"], m["dtype"], ["dense", "ideal", "torch"], prune_residual=False,
                                    batch=m["batch"], pixels=m["pixels"], round_to=8)
        out[key] = {"dense": traces["dense"], "torch-round8": traces["torch"], "ideal-round8": traces["ideal"]}
    return out


def trace_to_json(trace: Trace) -> dict[str, Any]:
    return asdict(trace)


def trace_from_json(data: dict[str, Any]) -> Trace:
    records = [OpRecord(**{**r, "tensors": tuple(TensorUse(**t) for t in r["tensors"]),
                           "conv_channels": tuple(r["conv_channels"])}) for r in data["records"]]
    return Trace(records, data["batch"], data["pixels"], data["autocast_warnings"])


def _modeled_ms(records: Iterable[OpRecord], cal: dict[str, Any], gpu: str = "h200") -> float:
    return 1e3 * sum(op_seconds(r, GPUS[gpu], cal) for r in records)


def _solve(modeled: Callable[[float], float], target: float, lo: float = 0.02, hi: float = 0.95) -> float:
    """The efficiency in [lo, hi] at which the (decreasing) modeled time equals ``target`` (the
    nearer end where none does; no kernel streams faster than ~95% of the datasheet bandwidth)."""
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if modeled(mid) > target else (lo, mid)
    return round((lo + hi) / 2, 3)


def _row_ms(trace: Trace, row: str, cal: dict[str, Any]) -> float:
    """The estimate of one profile row: the traced ops it covers."""
    return _modeled_ms([r for r in trace.records if ROW_OPS[row.split()[-1]](r)], cal)


def fit_calibration(traces: dict[str, dict[str, Trace]], cal: dict[str, Any] = CALIBRATION) -> dict[str, Any]:
    """Efficiencies that make each class's estimate equal the H200's profile row, and the time per
    kernel that makes DCP's estimated time over its ideal's equal the H200's (the order and sources
    are CALIBRATION's comments). Gathers and scatters have no row: they get the copies' efficiency."""
    fitted = copy.deepcopy(cal)
    for _ in range(8):  # the per-kernel time and the efficiencies depend on each other: iterate
        fitted = _fit_once(traces, fitted)
    return fitted


def _fit_once(traces: dict[str, dict[str, Trace]], cal: dict[str, Any]) -> dict[str, Any]:
    fitted = copy.deepcopy(cal)
    r50 = traces["resnet50-b128-224-bf16"]
    rows = MEASURED_H200["resnet50-b128-224-bf16"]["rows"]

    def fit(table: str, key: str, modeled: Callable[[], float], target_ms: float) -> None:
        def at(eff: float) -> float:
            fitted[table][key] = eff
            return modeled()
        fitted[table][key] = _solve(at, target_ms)

    def fit_per_kernel(modeled: Callable[[], float], target_ms: float) -> None:
        def at(inverse: float) -> float:  # (decreasing in its argument, as _solve wants)
            fitted["per_kernel_s"] = 1e-6 / inverse
            return modeled()
        fitted["per_kernel_s"] = round(1e-6 / _solve(at, target_ms, 1 / 20, 1.0), 9)

    for table, key, row in (("eff_bw", "elementwise", "elementwise"), ("eff_bw", "batch_norm", "batch_norm"),
                            ("eff_bw", "copy_fill", "copy"), ("eff_flops", "conv:bf16", "conv")):
        variant, target = rows[row]
        fit(table, key, lambda v=variant, w=row: _row_ms(r50[v], w, fitted), target)
    variant, target = MEASURED_H200["vgg16-b128-32-fp32"]["rows"]["conv"]
    fit("eff_flops", "conv:fp32", lambda: _row_ms(traces["vgg16-b128-32-fp32"][variant], "conv", fitted), target)
    variant, target = rows["addcmul"]
    fit("eff_bw", "elementwise_mixed", lambda: _row_ms(r50[variant], "addcmul", fitted), target)
    busy = MEASURED_H200["resnet50-b128-224-bf16"]["gpu_busy_ms"]
    fitted["eff_bw"]["gather_scatter"] = fitted["eff_bw"]["copy_fill"]
    fit_per_kernel(lambda: _modeled_ms(r50["torch-round8"].records, fitted)
                   - _modeled_ms(r50["ideal-round8"].records, fitted), busy["torch-round8"] - busy["ideal-round8"])
    return fitted


def calibration_error(traces: dict[str, dict[str, Trace]], cal: dict[str, Any] = CALIBRATION
                      ) -> dict[str, dict[str, dict[str, float]]]:
    """Estimate vs the H200's GPU-busy time, kernel count and profile rows, per configuration
    (error = estimate / measured - 1)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, variants in traces.items():
        m, rows = MEASURED_H200[key], out.setdefault(key, {})
        for variant, trace in variants.items():
            est = estimate(trace, "h200", cal)
            rows[variant] = {"estimate_ms": round(est["ms"], 2), "measured_ms": m["gpu_busy_ms"][variant],
                             "error": round(est["ms"] / m["gpu_busy_ms"][variant] - 1, 3),
                             "kernels": est["kernels"], "measured_kernels": m["kernels"][variant]}
        extra = rows["torch-round8"]["estimate_ms"] - rows["ideal-round8"]["estimate_ms"]
        extra_measured = m["gpu_busy_ms"]["torch-round8"] - m["gpu_busy_ms"]["ideal-round8"]
        rows["DCP minus ideal"] = {"estimate_ms": round(extra, 2), "measured_ms": round(extra_measured, 2),
                                   "error": round(extra / extra_measured - 1, 3)}
        for variant, name in (("torch-round8", "DCP over ideal"), ("ideal-round8", "ideal over dense")):
            base = "ideal-round8" if variant.startswith("torch") else "dense"
            ratio = rows[variant]["estimate_ms"] / rows[base]["estimate_ms"]
            measured = m["gpu_busy_ms"][variant] / m["gpu_busy_ms"][base]
            rows[name] = {"estimate": round(ratio, 3), "measured": round(measured, 3),
                          "error": round(ratio / measured - 1, 3)}
        for row, (variant, measured) in m["rows"].items():
            est_ms = _row_ms(variants[variant], row, cal)
            rows[f"row {row} ({variant})"] = {"estimate_ms": round(est_ms, 2), "measured_ms": round(measured, 2),
                                             "error": round(est_ms / measured - 1, 3)}
    return out


# ----------------------------------------------------------------------------------------------
# Command line.

def calibrate(code: str | None = "a1b293fe", today: str = "HEAD") -> dict[str, Any]:
    """The estimate's error against the H200 with the constants in use (CALIBRATION) on traces of
    the measured code (commit ``code``; None: this checkout), the constants a fit gives now, and
    the same error on traces of commit ``today``'s code (what the step is now)."""
    measured_code = calibration_traces(code)
    return {"what": "roofline estimate vs the H200's GPU-busy time (benchmarks/results/2026-11-28-gpu-h200); "
                    "error = estimate / measured - 1",
            "code": _commit(code) if code else _commit(), "calibration": CALIBRATION,
            "error": calibration_error(measured_code, CALIBRATION), "refit": fit_calibration(measured_code),
            "todays_code": _commit(today),
            "error_with_todays_code": calibration_error(calibration_traces(today), CALIBRATION)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See the module docstring.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="resnet50", choices=NETWORK_NAMES)
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="fp32 (TF32 convolutions) or bf16 (autocast, channels_last, as bench_step --dtype bf16)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--no-prune-residual", dest="prune_residual", action="store_false",
                   help="residual groups stay dense (the default prunes them: prune_residual=True)")
    p.add_argument("--batch", type=int, help="GPU batch (default: the network's, 128)")
    p.add_argument("--pixels", type=int, help="GPU image size (default: the network's, 224 or 32)")
    p.add_argument("--top", type=int, default=15, help="rows per breakdown table")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--calibration", action="store_true",
                   help="trace the H200-measured configurations (the code of --measured-code) and print the "
                        "estimate's error with the constants in use, and the constants a fit gives")
    p.add_argument("--measured-code", default="a1b293fe",
                   help="commit whose dcp_kernels the H200 ran (default a1b293fe); 'none': this checkout")
    p.add_argument("--code", help="trace dcp_kernels and bench_step as of this commit (git archive, in a "
                                  "subprocess) instead of the working tree")
    p.add_argument("--import-root", help=argparse.SUPPRESS)        # internal: dcp_kernels/bench_step from here
    p.add_argument("--trace-calibration", help=argparse.SUPPRESS)  # internal: write calibration traces (JSON)
    return p


NETWORK_NAMES = ("resnet50", "vgg16", "resnet56", "tiny-vgg")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.code and not args.import_root:  # the same command on that commit's code
        with _at_commit(args.code) as root:
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--import-root", root], check=True)
        return {}
    if args.import_root:  # before anything imports dcp_kernels or bench_step
        sys.path[:0] = [args.import_root, str(Path(args.import_root) / "benchmarks")]
    if args.trace_calibration:
        traces = _trace_measured()
        Path(args.trace_calibration).write_text(json.dumps(
            {k: {v: trace_to_json(t) for v, t in vs.items()} for k, vs in traces.items()}))
        return {}
    if args.calibration:
        result = calibrate(None if args.measured_code == "none" else args.measured_code)
        print(json.dumps(result, indent=1))
    else:
        result = run(args.network, args.gpu, args.dtype, [v.strip() for v in args.variants.split(",") if v.strip()],
                     prune_ratio=args.prune_ratio, prune_residual=args.prune_residual, batch=args.batch,
                     pixels=args.pixels, top=args.top, code=args.code)
        print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
