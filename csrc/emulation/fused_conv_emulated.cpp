// `dcp::implicit_gemm_conv2d[_backward]` on CPU tensors: the CUDA kernels of the fused gather
// convolution (csrc/fused_conv_kernels.cuh), their own source compiled by the host compiler and run
// under the CPU emulation of the CUDA execution model (csrc/emulation/cuda_emulation.h): every thread
// a fiber, shared memory, barriers (checked for divergence, run in two thread orders to expose races),
// device-side asserts and emulated WMMA fragments. With the host side of csrc/fused_conv.h unchanged
// (checks, allocation, tile and split-K choice), this is what the tests check the kernels with on a
// machine without a GPU. Not checked here: anything about speed, and what nvcc compiles differently.
// Slow (a fiber switch per thread per barrier): for tests at small sizes.
//
// On CUDA tensors the same two ops run the kernels on the GPU with the configuration forced (tile
// family, split count), so the tests cover every path the heuristics might choose on both.
#define DCP_EMULATE_CUDA 1

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../fused_conv_kernels.cuh"

namespace dcp {
namespace {

// The device the emulation stands for: sm_80+ with 132 multiprocessors (an H100 SXM), so the tile and
// split-K choices are those of a GPU users train on.
struct EmulatedDevice {
  static bool mma_supported(const at::Tensor&) { return true; }
  static int64_t multiprocessors(const at::Tensor&) { return 132; }

  template <typename... Params, typename... Args>
  static void launch(const char* name, void (*kernel)(Params...), emu::dim3 grid, emu::dim3 block,
                     const Args&... args) {
    emu::launch(name, kernel, grid, block, args...);
  }
};

using EmulatedExecutor = KernelExecutor<EmulatedDevice>;

at::Tensor implicit_gemm_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise, bool x_compact,
                                bool y_compact, int64_t mma, int64_t wgrad_splits) {
  return fused_conv2d<EmulatedExecutor>(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise,
                                        x_compact, y_compact, FusedConfig{mma, wgrad_splits});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> implicit_gemm_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, bool x_compact, bool y_compact, std::array<bool, 3> output_mask, int64_t mma,
    int64_t wgrad_splits) {
  return fused_conv2d_backward<EmulatedExecutor>(grad_y, x, weight, in_idx, out_idx, stride, padding, dilation,
                                                 depthwise, x_compact, y_compact, output_mask,
                                                 FusedConfig{mma, wgrad_splits});
}

}  // namespace
}  // namespace dcp

TORCH_LIBRARY_IMPL(dcp, CPU, m) {
  m.impl("implicit_gemm_conv2d", &dcp::implicit_gemm_conv2d);
  m.impl("implicit_gemm_conv2d_backward", &dcp::implicit_gemm_conv2d_backward);
}
