"""Every Triton kernel compiles for a Hopper GPU (sm_90: Triton IR, PTX and a cubin by ptxas), on a
machine without one.

The rest of the suite runs the kernels in Triton's CPU interpreter, which executes the Python body
with NumPy and never meets Triton's compiler: a construct the interpreter accepts and the compiler
rejects (a type mismatch between the branches of a ``tl.where``, a loop bound of the wrong kind, a
``return`` where the code generator allows none) would first fail on a GPU. This test compiles each
kernel ahead of time for ``GPUTarget("cuda", 90, 32)`` in both modes (host kept widths, and ``COUNTED``:
kept counts read from device memory) and the static step's BatchNorm kernels, with small tiles and 1x1 taps to keep it quick (~25 s; the
kernel bodies' constructs are the same at every tile size). It runs in a subprocess because the
suite's process has decorated the kernels for the interpreter.
"""
import os
import subprocess
import sys

import pytest

from dcp_kernels import ops

pytestmark = pytest.mark.skipif(ops._TRITON_VERSION is None or ops._TRITON_VERSION < ops.MIN_TRITON,
                                reason="Triton unavailable: not installed, or older than ops.MIN_TRITON")


def _compile_all() -> list[str]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dcp_kernels.ops.triton import (
        batch_norm,
        batch_norm_compact,
        depthwise,
        forward,
        grad_input,
        grad_weight,
        utility,
    )

    index_types = {"in_idx_ptr": "*i64", "out_idx_ptr": "*i64", "idx_ptr": "*i64",
                   "in_count_ptr": "*i32", "out_count_ptr": "*i32", "count_ptr": "*i32"}
    float_args = {"inv_count", "decay", "momentum", "eps", "unbias", "inv_m"}

    def compile_for_hopper(kernel, constants) -> int:
        fn = kernel
        while not isinstance(fn, triton.runtime.jit.JITFunction):
            fn = fn.fn  # unwrap the autotuner
        signature = {p.name: index_types.get(p.name, "*fp32") if p.name.endswith("_ptr")
                     else "fp32" if p.name in float_args else "i32"
                     for p in fn.params if not p.is_constexpr}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        return len(compiled.asm["cubin"])

    gemm = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, KH=1, KW=1, ACC=tl.float32, DOT="tf32")
    taps = dict(BLOCK_M=32, BLOCK_C=32, KH=1, KW=1, ACC=tl.float32)
    done = []
    for counted in (False, True):
        cases = [
            ("forward", forward._conv_forward_kernel, dict(gemm, X_COMPACT=False, Y_COMPACT=False, HAS_BIAS=True)),
            ("grad_input", grad_input._conv_grad_input_kernel, dict(gemm, GY_COMPACT=False, GX_COMPACT=False)),
            ("grad_weight", grad_weight._conv_grad_weight_kernel,
             dict(gemm, GY_COMPACT=False, X_COMPACT=False, SPLIT=2)),
            ("depthwise_forward", depthwise._depthwise_forward_kernel, dict(taps, Y_COMPACT=False, HAS_BIAS=True)),
            ("depthwise_grad_input", depthwise._depthwise_grad_input_kernel, dict(taps, GY_COMPACT=False)),
            ("depthwise_grad_weight", depthwise._depthwise_grad_weight_kernel, dict(taps, GY_COMPACT=False)),
            ("channel_utility", utility._channel_utility_kernel, dict(HAS_AFFINE=True, BLOCK_M=32, BLOCK_C=32)),
            ("utility_update", utility._utility_update_kernel, dict(FULL=False, BLOCK=1024)),
        ]
        for name, kernel, constants in cases:
            assert compile_for_hopper(kernel, {**constants, "COUNTED": counted}) > 0, name
            done.append(f"{name}{'-counted' if counted else ''}")
    # The static step's BatchNorm + gate kernels (counted by construction).
    tiles = dict(BLOCK_M=32, BLOCK_C=16)
    for name, kernel, constants in (
        ("bn_stats", batch_norm._bn_stats_kernel, dict(tiles, TRACK=True)),
        ("bn_apply", batch_norm._bn_apply_kernel, tiles),
        ("bn_backward_reduce", batch_norm._bn_backward_reduce_kernel, dict(tiles, V_BY_CHANNEL=True)),
        ("bn_backward_reduce_slots", batch_norm._bn_backward_reduce_kernel, dict(tiles, V_BY_CHANNEL=False)),
        ("bn_backward_apply", batch_norm._bn_backward_apply_kernel, dict(tiles, INDEXED=True)),
        # The torch backend's fused BN backward on compact tensors (CUDA).
        ("bn_backward_partials", batch_norm_compact._partials_kernel, tiles),
        ("bn_backward_apply_compact", batch_norm._bn_backward_apply_kernel, dict(tiles, INDEXED=False)),
    ):
        assert compile_for_hopper(kernel, constants) > 0, name
        done.append(name)
    return done


def test_every_kernel_compiles_for_sm90_in_both_modes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [f"{name}{suffix}" for suffix in ("", "-counted") for name in (
        "forward", "grad_input", "grad_weight", "depthwise_forward", "depthwise_grad_input",
        "depthwise_grad_weight", "channel_utility", "utility_update")] + [
        "bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_reduce_slots", "bn_backward_apply",
        "bn_backward_partials", "bn_backward_apply_compact"]


if __name__ == "__main__":
    print("\n".join(_compile_all()))
