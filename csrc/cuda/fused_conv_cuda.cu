// `dcp::gathered_conv2d[_backward]` and `dcp::implicit_gemm_conv2d[_backward]` on CUDA tensors: the
// kernels of csrc/fused_conv_kernels.cuh launched on the current stream, with the host side of
// csrc/fused_conv.h. The same kernels run on the CPU, emulated, in csrc/emulation/fused_conv_emulated.cpp.
// Status: compiled for sm_80/sm_90; what has run on a GPU: docs/benchmarks-gpu.md.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "../fused_conv_kernels.cuh"

namespace dcp {
namespace {

// A device attribute, read from the driver once per device (no sync; cudaGetDeviceProperties is slow).
int device_attribute(const at::Tensor& x, cudaDeviceAttr attribute) {
  constexpr int kMaxDevices = 64;
  static int cache[2][kMaxDevices] = {};
  const int slot = attribute == cudaDevAttrMultiProcessorCount ? 0 : 1;
  const int device = x.get_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "device index ", device, " out of range");
  if (cache[slot][device] == 0) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
    cache[slot][device] = value;
  }
  return cache[slot][device];
}

struct CudaDevice {
  static bool mma_supported(const at::Tensor& x) { return device_attribute(x, cudaDevAttrComputeCapabilityMajor) >= 8; }
  static int64_t multiprocessors(const at::Tensor& x) { return device_attribute(x, cudaDevAttrMultiProcessorCount); }

  template <typename... Params, typename... Args>
  static void launch(const char*, void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) {
    kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

using CudaExecutor = KernelExecutor<CudaDevice>;

at::Tensor implicit_gemm_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, const at::Tensor& in_idx,
                                     const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool depthwise, bool x_compact, bool y_compact,
                                     int64_t mma, int64_t wgrad_splits) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fused_conv2d<CudaExecutor>(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact,
                                    y_compact, FusedConfig{mma, wgrad_splits});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> implicit_gemm_conv2d_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, bool x_compact, bool y_compact, std::array<bool, 3> output_mask, int64_t mma,
    int64_t wgrad_splits) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fused_conv2d_backward<CudaExecutor>(grad_y, x, weight, in_idx, out_idx, stride, padding, dilation, depthwise,
                                             x_compact, y_compact, output_mask, FusedConfig{mma, wgrad_splits});
}

at::Tensor gathered_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise, bool x_compact,
                                bool y_compact) {
  return implicit_gemm_conv2d_cuda(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact,
                                   y_compact, -1, 0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_conv2d_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, bool x_compact, bool y_compact, std::array<bool, 3> output_mask) {
  return implicit_gemm_conv2d_backward_cuda(grad_y, x, weight, in_idx, out_idx, stride, padding, dilation, depthwise,
                                            x_compact, y_compact, output_mask, -1, 0);
}

}  // namespace
}  // namespace dcp

TORCH_LIBRARY_IMPL(dcp, CUDA, m) {
  m.impl("gathered_conv2d", &dcp::gathered_conv2d_cuda);
  m.impl("gathered_conv2d_backward", &dcp::gathered_conv2d_backward_cuda);
  m.impl("implicit_gemm_conv2d", &dcp::implicit_gemm_conv2d_cuda);
  m.impl("implicit_gemm_conv2d_backward", &dcp::implicit_gemm_conv2d_backward_cuda);
}
