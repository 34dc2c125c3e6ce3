// CUDA kernels of the dcp ops (first version).
//
// groups=1: custom kernels gather the selected input channels into a compact buffer, cuDNN (through
// ATen) convolves the compact tensors, and a custom kernel scatters the selected output channels into
// the full-width result (or the compact result is returned as is). Backward: the compact gradient goes
// to cuDNN's convolution backward; grad-input is scattered into the selected channels, grad-weight into
// the selected block of a zero full-size tensor. Depthwise: the same, with the input masked by the
// selection. The utility reduction is a deterministic kernel (one block per channel, fixed-order tree
// reduction in shared memory, no atomics). The fused gather implicit-GEMM kernel lives in the Triton
// backend (dcp_kernels/ops/triton/); porting it here is future work.
//
// Index ranges are checked on the device as the kernels read them (no host sync per call; see
// csrc/checks.h). What has run on a GPU, and where: docs/benchmarks-gpu.md.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

namespace dcp {
namespace {

constexpr int kThreads = 256;

// dst (N, k, plane) <- src (N, C, plane) at channels idx (or the reverse with `scatter`).
template <typename scalar_t>
__global__ void copy_channels_kernel(const scalar_t* __restrict__ src, scalar_t* __restrict__ dst,
                                     const int64_t* __restrict__ idx, int64_t n, int64_t channels, int64_t k,
                                     int64_t plane, bool scatter) {
  const int64_t total = n * k * plane;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = e % plane, j = (e / plane) % k, b = e / (plane * k);
    CUDA_KERNEL_ASSERT(idx[j] >= 0 && idx[j] < channels && "channel index out of range");
    const int64_t full = (b * channels + idx[j]) * plane + p;
    if (scatter) {
      dst[full] = src[e];
    } else {
      dst[e] = src[full];
    }
  }
}

void copy_channels(const at::Tensor& src, at::Tensor& dst, const at::Tensor& idx, bool scatter) {
  const auto& full = scatter ? dst : src;
  const int64_t n = full.size(0), channels = full.size(1), k = idx.numel(), plane = full.size(2) * full.size(3);
  const int64_t total = n * k * plane;
  if (total == 0) return;
  const int blocks = int(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "dcp_copy_channels", [&] {
    copy_channels_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        src.const_data_ptr<scalar_t>(), dst.mutable_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), n,
        channels, k, plane, scatter);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather(const at::Tensor& full, const at::Tensor& idx) {
  auto out = at::empty({full.size(0), idx.numel(), full.size(2), full.size(3)}, full.options());
  copy_channels(full, out, idx, false);
  return out;
}

at::Tensor scatter_into_zeros(const at::Tensor& compact, const at::Tensor& idx, int64_t channels) {
  auto out = at::zeros({compact.size(0), channels, compact.size(2), compact.size(3)}, compact.options());
  copy_channels(compact.contiguous(), out, idx, true);
  return out;
}

at::Tensor weight_block(const at::Tensor& weight, const at::Tensor& in_idx, const at::Tensor& out_idx) {
  const int64_t c_out = weight.size(0), c_in = weight.size(1);
  auto rows = (out_idx.unsqueeze(1) * c_in + in_idx.unsqueeze(0)).flatten();
  return weight.reshape({c_out * c_in, -1})
      .index_select(0, rows)
      .reshape({out_idx.numel(), in_idx.numel(), weight.size(2), weight.size(3)});
}

// Depthwise: per computed channel out_idx[j], 1 when its input channel is selected, else 0.
at::Tensor depthwise_input_keep(const at::Tensor& x, const at::Tensor& in_idx, const at::Tensor& out_idx) {
  return at::zeros({x.size(1)}, x.options()).index_fill_(0, in_idx, 1.0).index_select(0, out_idx);
}

// The compact input of the convolution and the weight it runs with (`keep`: depthwise only).
std::pair<at::Tensor, at::Tensor> compact_operands(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& in_idx, const at::Tensor& out_idx,
                                                   const at::Tensor& keep, bool depthwise, bool x_compact) {
  if (depthwise) {
    return {gather(x, out_idx).mul_(keep.view({1, -1, 1, 1})), weight.index_select(0, out_idx)};
  }
  return {x_compact ? x : gather(x, in_idx), weight_block(weight, in_idx, out_idx)};
}

at::Tensor gathered_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise, bool x_compact,
                                bool y_compact) {
  const auto g = check_conv(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto keep = depthwise ? depthwise_input_keep(x, in_idx, out_idx) : at::Tensor();
  auto [x_c, w_c] = compact_operands(x, weight, in_idx, out_idx, keep, depthwise, x_compact);
  c10::optional<at::Tensor> b_c;
  if (bias.has_value()) b_c = bias->index_select(0, out_idx);
  const int64_t groups = depthwise ? out_idx.numel() : 1;
  auto y_c = at::convolution(x_c, w_c, b_c, stride, padding, dilation, false, {0, 0}, groups);
  return y_compact ? y_c : scatter_into_zeros(y_c, out_idx, g.c_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_conv2d_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, bool x_compact, bool y_compact, std::array<bool, 3> output_mask) {
  const auto g = check_conv(x, weight, c10::nullopt, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(1) == (y_compact ? out_idx.numel() : g.c_out),
              "grad_y has shape ", grad_y.sizes(), ", which does not match the convolution's output");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto keep = depthwise ? depthwise_input_keep(x, in_idx, out_idx) : at::Tensor();
  auto [x_c, w_c] = compact_operands(x, weight, in_idx, out_idx, keep, depthwise, x_compact);
  auto gy_c = y_compact ? grad_y.contiguous() : gather(grad_y.contiguous(), out_idx);
  const int64_t groups = depthwise ? out_idx.numel() : 1;
  auto [gx_c, gw_c, gb_c] = at::convolution_backward(
      gy_c, x_c, w_c, at::OptionalIntArrayRef(at::IntArrayRef{w_c.size(0)}), stride, padding, dilation, false,
      {0, 0}, groups, output_mask);
  at::Tensor grad_x = at::empty({0}, x.options()), grad_w = at::empty({0}, x.options()),
             grad_b = at::empty({0}, x.options());
  if (output_mask[0]) {
    if (depthwise) {
      grad_x = scatter_into_zeros(gx_c.mul_(keep.view({1, -1, 1, 1})), out_idx, g.c_out);
    } else {
      grad_x = x_compact ? gx_c : scatter_into_zeros(gx_c, in_idx, g.c_in);
    }
  }
  if (output_mask[1]) {
    grad_w = at::zeros_like(weight);
    if (depthwise) {
      grad_w.index_copy_(0, out_idx, gw_c.mul_(keep.view({-1, 1, 1, 1})));
    } else {
      auto rows = (out_idx.unsqueeze(1) * g.c_in + in_idx.unsqueeze(0)).flatten();
      grad_w.view({g.c_out * g.c_in, -1}).index_copy_(0, rows, gw_c.reshape({rows.numel(), -1}));
    }
  }
  if (output_mask[2]) grad_b = at::zeros({g.c_out}, x.options()).index_copy_(0, out_idx, gb_c);
  return {grad_x, grad_w, grad_b};
}

// One block per channel: per-sample sums over the plane in a fixed-order shared-memory tree, then
// their absolute values added in sample order by thread 0. Deterministic.
template <typename scalar_t>
__global__ void channel_utility_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ g,
                                       float* __restrict__ v, int64_t batch, int64_t channels, int64_t plane) {
  using acc_t = double;
  __shared__ acc_t partial[kThreads];
  const int64_t c = blockIdx.x;
  acc_t total = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t offset = (b * channels + c) * plane;
    acc_t sum = 0;
    for (int64_t p = threadIdx.x; p < plane; p += blockDim.x) sum += acc_t(a[offset + p]) * acc_t(g[offset + p]);
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) total += fabs(partial[0]);
    __syncthreads();
  }
  if (threadIdx.x == 0) v[c] = float(total / acc_t(batch * plane));
}

at::Tensor channel_utility_cuda(const at::Tensor& a_in, const at::Tensor& g_in) {
  TORCH_CHECK(a_in.dim() == 4 && a_in.sizes() == g_in.sizes(), "a and g must be 4-D tensors of one shape, got ",
              a_in.sizes(), " and ", g_in.sizes());
  TORCH_CHECK(a_in.device() == g_in.device(), "a is on ", a_in.device(), " but g is on ", g_in.device());
  TORCH_CHECK(a_in.scalar_type() == g_in.scalar_type(), "a and g must share a dtype");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), g = g_in.contiguous();
  const int64_t batch = a.size(0), channels = a.size(1), plane = a.size(2) * a.size(3);
  auto v = at::zeros({channels}, a.options().dtype(at::kFloat));
  if (a.numel() == 0) return v;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dcp_channel_utility_cuda", [&] {
    channel_utility_kernel<scalar_t><<<channels, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), v.mutable_data_ptr<float>(), batch, channels,
        plane);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return v;
}

}  // namespace
}  // namespace dcp

TORCH_LIBRARY_IMPL(dcp, CUDA, m) {
  m.impl("gathered_conv2d", &dcp::gathered_conv2d_cuda);
  m.impl("gathered_conv2d_backward", &dcp::gathered_conv2d_backward_cuda);
  m.impl("channel_utility", &dcp::channel_utility_cuda);
}
