// CUDA kernel of dcp::channel_utility: one block per channel, per-sample sums over the plane in a
// fixed-order shared-memory tree, their absolute values added in sample order (deterministic, no
// atomics). The convolution kernels are in fused_conv_cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace dcp {
namespace {

constexpr int kThreads = 256;

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
  m.impl("channel_utility", &dcp::channel_utility_cuda);
}
