// CUDA kernels of the fused gather convolution: `dcp::gathered_conv2d[_backward]` on CUDA tensors.
//
// Each pass (forward, grad-input, grad-weight) is one implicit GEMM over the selected block whose
// global loads read the selected channels of the full (or compact) activations and the selected
// weight block in place, through the index tensors (csrc/implicit_gemm.h): no compact copy of an
// activation or the weight is made. A block decomposes its 64 rows and 64 columns once, and each K
// tile's indices once, into shared memory; an operand load is then a few adds and a bounds check.
// A block computes a 64 x 64 output tile:
//   * SIMT tiles (double; float without TF32; all types before sm_80): 256 threads, 4 x 4 outputs
//     each, K tiles of 8 staged in shared memory in the accumulation type;
//   * tensor-core tiles (sm_80+; fp16/bf16, and fp32 as TF32 when PyTorch allows cuDNN TF32): 4 warps
//     of 2 x 2 WMMA fragments (16x16x16, or 16x16x8 for TF32), K tiles of 16 staged in shared memory,
//     float accumulation, the tile written back through shared memory.
// Grad-weight reduces over the batch: split-K over gridDim.z with float partial sums reduced in
// split order by a second kernel (deterministic, no float atomics). Depthwise convs run direct
// kernels; grad-weight and grad-bias reduce in a fixed-order shared-memory tree (deterministic).
//
// The host side (checks, allocation, problems, tile and split choice) is csrc/fused_conv.h, shared with
// the CPU host model the tests run (csrc/cpu/fused_conv_model.cpp). No host sync in a call: index
// ranges are checked on the device, by every block before it reads (a device-side assert).
// Status: compiled for sm_80/sm_90 on a machine without a GPU; what has run on one: docs/benchmarks-gpu.md.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../fused_conv.h"

namespace dcp {
namespace {

constexpr int kThreads = 256;

// Every block checks the indices it may read before reading them (cheap next to a tile's work:
// k_in + k_out loads spread over the block's threads); the barrier keeps every thread from using an
// index before the check of it has run. Call it from all threads, before any early exit.
__device__ __forceinline__ void check_selection(const igemm::Geometry& g, const igemm::Selection& s) {
  for (int64_t i = threadIdx.x; i < g.k_in; i += blockDim.x) {
    CUDA_KERNEL_ASSERT(s.in_idx[i] >= 0 && s.in_idx[i] < g.c_in && "in_idx holds an index outside [0, C_in)");
  }
  for (int64_t j = threadIdx.x; j < g.k_out; j += blockDim.x) {
    CUDA_KERNEL_ASSERT(s.out_idx[j] >= 0 && s.out_idx[j] < g.c_out && "out_idx holds an index outside [0, C_out)");
  }
  __syncthreads();
}

// The block's rows and columns, decomposed once into shared memory (see csrc/implicit_gemm.h).
// Ends with a barrier: the K loop reads them.
template <typename Tile, typename Problem>
__device__ __forceinline__ void stage_rows_and_cols(const Problem& p, int64_t m0, int64_t n0,
                                                    typename Problem::Row* rows, typename Problem::Col* cols) {
  for (int i = threadIdx.x; i < Tile::kM; i += blockDim.x) rows[i] = igemm::row_or_none(p, m0 + i);
  for (int i = threadIdx.x; i < Tile::kN; i += blockDim.x) cols[i] = igemm::col_or_none(p, n0 + i);
  __syncthreads();
}

template <typename Problem, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(igemm::SimtTile::kThreads)
    simt_gemm_kernel(const Problem p, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ c, acc_t* __restrict__ workspace,
                     const igemm::SplitK split) {
  using T = igemm::SimtTile;
  constexpr int kMicro = 4, kLanes = T::kM / kMicro;  // 16 x 16 threads, each rows tm + 16 i, cols tn + 16 j
  static_assert(T::kM == T::kN && kLanes * kLanes == T::kThreads, "one thread per 4 x 4 micro-tile");
  __shared__ acc_t a_tile[T::kK][T::kM];
  __shared__ acc_t b_tile[T::kK][T::kN];
  __shared__ typename Problem::Row row_info[T::kM];
  __shared__ typename Problem::Col col_info[T::kN];
  __shared__ typename Problem::Depth depth_info[T::kK];
  check_selection(p.g, p.s);
  const int64_t rows = p.rows(), cols = p.cols();
  const int64_t m0 = int64_t(blockIdx.x) * T::kM, n0 = int64_t(blockIdx.y) * T::kN, s = blockIdx.z;
  const int tm = threadIdx.x % kLanes, tn = threadIdx.x / kLanes;
  stage_rows_and_cols<T>(p, m0, n0, row_info, col_info);
  acc_t acc[kMicro][kMicro];
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
  }
  const int64_t k_end = split.end(s, T::kK);
  for (int64_t k0 = split.begin(s, T::kK); k0 < k_end; k0 += T::kK) {
    if (threadIdx.x < T::kK) depth_info[threadIdx.x] = igemm::depth_or_none(p, k0 + threadIdx.x);
    __syncthreads();
    // Rows vary fastest across threads: consecutive output pixels, consecutive addresses in NCHW.
    for (int e = threadIdx.x; e < T::kK * T::kM; e += T::kThreads) {
      const int kk = e / T::kM, mm = e % T::kM;
      const int64_t off = p.a(row_info[mm], depth_info[kk]);
      a_tile[kk][mm] = off >= 0 ? static_cast<acc_t>(a[off]) : acc_t(0);
    }
    for (int e = threadIdx.x; e < T::kK * T::kN; e += T::kThreads) {
      const int kk = e / T::kN, nn = e % T::kN;
      const int64_t off = p.b(depth_info[kk], col_info[nn]);
      b_tile[kk][nn] = off >= 0 ? static_cast<acc_t>(b[off]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < T::kK; ++kk) {
      acc_t av[kMicro], bv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
        av[i] = a_tile[kk][tm + kLanes * i];
        bv[i] = b_tile[kk][tn + kLanes * i];
      }
#pragma unroll
      for (int i = 0; i < kMicro; ++i) {
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t m = m0 + tm + kLanes * i, n = n0 + tn + kLanes * j;
      if (m < rows && n < cols) igemm::store(p, m, n, acc[i][j], bias, c, workspace, s, split.splits);
    }
  }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // WMMA for TF32 and bf16: the host pass, sm_80+ devices
// What the tensor-core tiles stage in shared memory and multiply, per input type.
template <typename scalar_t>
struct MmaOperand {  // fp16, bf16: staged as their 16 bits, one 16x16x16 mma per K tile
  using staged_t = uint16_t;
  using fragment_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, __nv_bfloat16>;
  using load_t = fragment_t;
  static constexpr int kStep = 16;
  static __device__ __forceinline__ staged_t stage(const scalar_t* src, int64_t off) {
    return off >= 0 ? reinterpret_cast<const uint16_t*>(src)[off] : uint16_t(0);  // +0.0 in fp16 and bf16
  }
  template <typename Fragment>
  static __device__ __forceinline__ void to_fragment_precision(Fragment&) {}
};
template <>
struct MmaOperand<float> {  // fp32 as TF32: staged rounded (igemm::round_to_tf32), two 16x16x8 mmas per K tile
  using staged_t = float;
  using fragment_t = nvcuda::wmma::precision::tf32;
  using load_t = float;
  static constexpr int kStep = 8;
  static __device__ __forceinline__ staged_t stage(const float* src, int64_t off) {
    return off >= 0 ? igemm::round_to_tf32(src[off]) : 0.0f;
  }
  // WMMA wants TF32 fragments converted after loading (a no-op on values already rounded).
  template <typename Fragment>
  static __device__ __forceinline__ void to_fragment_precision(Fragment& f) {
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
  }
};
#endif

template <typename Problem, typename scalar_t>
__global__ void __launch_bounds__(igemm::MmaTile::kThreads)
    mma_gemm_kernel(const Problem p, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                    const scalar_t* __restrict__ bias, scalar_t* __restrict__ c, float* __restrict__ workspace,
                    const igemm::SplitK split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using T = igemm::MmaTile;
  using Op = MmaOperand<scalar_t>;
  using staged_t = typename Op::staged_t;
  using load_t = typename Op::load_t;
  constexpr int kFrag = 16, kStep = Op::kStep;
  static_assert(T::kK % kStep == 0, "whole mmas per K tile");
  // Row strides padded: multiples of 8 16-bit / 4 32-bit elements (WMMA's ldm), and every fragment
  // pointer 32-byte aligned (rows of 16, columns of 16, K steps of 8 or 16 elements).
  constexpr int kLdA = T::kK + 8, kLdB = T::kN + 8, kLdC = T::kN + 4;
  __shared__ __align__(32) staged_t a_tile[T::kM * kLdA];  // row-major (m, k)
  __shared__ __align__(32) staged_t b_tile[T::kK * kLdB];  // row-major (k, n)
  __shared__ __align__(32) float c_tile[T::kM * kLdC];
  __shared__ typename Problem::Row row_info[T::kM];
  __shared__ typename Problem::Col col_info[T::kN];
  __shared__ typename Problem::Depth depth_info[T::kK];
  check_selection(p.g, p.s);
  const int64_t rows = p.rows(), cols = p.cols();
  const int64_t m0 = int64_t(blockIdx.x) * T::kM, n0 = int64_t(blockIdx.y) * T::kN, s = blockIdx.z;
  stage_rows_and_cols<T>(p, m0, n0, row_info, col_info);
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;  // 2 x 2 warps, 32 x 32 outputs each
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kStep, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  const int64_t k_end = split.end(s, T::kK);
  for (int64_t k0 = split.begin(s, T::kK); k0 < k_end; k0 += T::kK) {
    if (threadIdx.x < T::kK) depth_info[threadIdx.x] = igemm::depth_or_none(p, k0 + threadIdx.x);
    __syncthreads();
    for (int e = threadIdx.x; e < T::kM * T::kK; e += T::kThreads) {
      const int mm = e % T::kM, kk = e / T::kM;
      a_tile[mm * kLdA + kk] = Op::stage(a, p.a(row_info[mm], depth_info[kk]));
    }
    for (int e = threadIdx.x; e < T::kK * T::kN; e += T::kThreads) {
      const int nn = e % T::kN, kk = e / T::kN;
      b_tile[kk * kLdB + nn] = Op::stage(b, p.b(depth_info[kk], col_info[nn]));
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < T::kK; ks += kStep) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kStep, typename Op::fragment_t, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kStep, typename Op::fragment_t, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const load_t*>(a_tile + (wm * 32 + i * kFrag) * kLdA + ks),
                               kLdA);
        wmma::load_matrix_sync(fb[i], reinterpret_cast<const load_t*>(b_tile + ks * kLdB + wn * 32 + i * kFrag),
                               kLdB);
        Op::to_fragment_precision(fa[i]);
        Op::to_fragment_precision(fb[i]);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(c_tile + (wm * 32 + i * kFrag) * kLdC + wn * 32 + j * kFrag, acc[i][j], kLdC,
                              wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < T::kM * T::kN; e += T::kThreads) {
    const int mm = e % T::kM, nn = e / T::kM;
    const int64_t m = m0 + mm, n = n0 + nn;
    if (m < rows && n < cols) igemm::store(p, m, n, c_tile[mm * kLdC + nn], bias, c, workspace, s, split.splits);
  }
#else
  CUDA_KERNEL_ASSERT(false && "tensor-core tiles need compute capability 8.0 or newer");
#endif
}

template <typename Problem, typename scalar_t, typename acc_t>
__global__ void reduce_splits_kernel(const Problem p, const acc_t* __restrict__ workspace, int64_t splits,
                                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ c) {
  const int64_t total = p.rows() * p.cols();
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    igemm::reduce_splits(p, e, workspace, splits, bias, c);
  }
}

// Fixed-order shared-memory tree sum of one value per thread; the result in thread 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

template <typename scalar_t>
__global__ void depthwise_forward_kernel(const igemm::Depthwise p, const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
                                         scalar_t* __restrict__ y) {
  check_selection(p.g, p.s);
  const int64_t total = p.g.n * p.g.k_out * p.g.oh * p.g.ow;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    p.forward_element<at::opmath_type<scalar_t>>(e, x, w, bias, y);
  }
}

template <typename scalar_t>
__global__ void depthwise_grad_input_kernel(const igemm::Depthwise p, const scalar_t* __restrict__ gy,
                                            const scalar_t* __restrict__ w, scalar_t* __restrict__ gx) {
  check_selection(p.g, p.s);
  const int64_t total = p.g.n * p.g.k_out * p.g.h * p.g.w;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    p.grad_input_element<at::opmath_type<scalar_t>>(e, gy, w, gx);
  }
}

// One block per (computed channel, tap).
template <typename scalar_t>
__global__ void depthwise_grad_weight_kernel(const igemm::Depthwise p, const scalar_t* __restrict__ gy,
                                             const scalar_t* __restrict__ x, scalar_t* __restrict__ gw) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kThreads];
  check_selection(p.g, p.s);
  const int64_t j = blockIdx.x, tap = blockIdx.y;
  if (!p.keep(j)) return;  // uniform over the block: its gradient stays zero
  acc_t v = 0;
  for (int64_t e = threadIdx.x; e < p.g.n * p.g.oh * p.g.ow; e += blockDim.x) {
    v += p.grad_weight_term<acc_t>(e, j, tap, gy, x);
  }
  v = block_sum(v, partial);
  if (threadIdx.x == 0) gw[p.weight(j, tap)] = static_cast<scalar_t>(v);
}

// One block per selected output channel: grad_bias[out_idx[j]] = sum of grad_y over batch and plane.
template <typename scalar_t>
__global__ void grad_bias_kernel(const igemm::Geometry g, const igemm::Selection s, const igemm::Strides gy_strides,
                                 const scalar_t* __restrict__ gy, scalar_t* __restrict__ gb) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kThreads];
  check_selection(g, s);
  const int64_t j = blockIdx.x;
  acc_t v = 0;
  for (int64_t e = threadIdx.x; e < g.n * g.oh * g.ow; e += blockDim.x) {
    v += igemm::grad_bias_term<acc_t>(g, s, gy_strides, e, j, gy);
  }
  v = block_sum(v, partial);
  if (threadIdx.x == 0) gb[s.out_idx[j]] = static_cast<scalar_t>(v);
}

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

int grid_stride_blocks(int64_t total) {
  return int(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
}

struct CudaExecutor {
  static bool mma_supported(const at::Tensor& x) { return device_attribute(x, cudaDevAttrComputeCapabilityMajor) >= 8; }
  static int64_t multiprocessors(const at::Tensor& x) { return device_attribute(x, cudaDevAttrMultiProcessorCount); }

  template <typename Tile, typename Problem, typename scalar_t, typename acc_t>
  static void gemm(const Problem& p, const scalar_t* a, const scalar_t* b, const scalar_t* bias, scalar_t* c,
                   acc_t* workspace, const igemm::SplitK& split) {
    const int64_t tiles_m = (p.rows() + Tile::kM - 1) / Tile::kM, tiles_n = (p.cols() + Tile::kN - 1) / Tile::kN;
    TORCH_CHECK(tiles_m < (int64_t(1) << 31) && tiles_n <= 65535 && split.splits <= 65535,
                "the convolution is too large for one launch (", tiles_m, " x ", tiles_n, " tiles)");
    const dim3 grid(unsigned(tiles_m), unsigned(tiles_n), unsigned(split.splits));
    auto stream = c10::cuda::getCurrentCUDAStream();
    if constexpr (std::is_same_v<Tile, igemm::MmaTile>) {
      mma_gemm_kernel<Problem, scalar_t><<<grid, Tile::kThreads, 0, stream>>>(p, a, b, bias, c, workspace, split);
    } else {
      simt_gemm_kernel<Problem, scalar_t, acc_t><<<grid, Tile::kThreads, 0, stream>>>(p, a, b, bias, c, workspace,
                                                                                        split);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (split.splits > 1) {
      reduce_splits_kernel<Problem, scalar_t, acc_t>
          <<<grid_stride_blocks(p.rows() * p.cols()), kThreads, 0, stream>>>(p, workspace, split.splits, bias, c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  template <typename scalar_t>
  static void depthwise_forward(const igemm::Depthwise& p, const scalar_t* x, const scalar_t* w, const scalar_t* bias,
                                scalar_t* y) {
    const int64_t total = p.g.n * p.g.k_out * p.g.oh * p.g.ow;
    if (total == 0) return;
    depthwise_forward_kernel<scalar_t>
        <<<grid_stride_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p, x, w, bias, y);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void depthwise_grad_input(const igemm::Depthwise& p, const scalar_t* gy, const scalar_t* w, scalar_t* gx) {
    const int64_t total = p.g.n * p.g.k_out * p.g.h * p.g.w;
    if (total == 0) return;
    depthwise_grad_input_kernel<scalar_t>
        <<<grid_stride_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p, gy, w, gx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void depthwise_grad_weight(const igemm::Depthwise& p, const scalar_t* gy, const scalar_t* x, scalar_t* gw) {
    TORCH_CHECK(p.g.k_out <= (int64_t(1) << 31) - 1 && p.g.taps() <= 65535, "depthwise conv too large for one launch");
    const dim3 grid(unsigned(p.g.k_out), unsigned(p.g.taps()));
    depthwise_grad_weight_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p, gy, x, gw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename scalar_t>
  static void grad_bias(const igemm::Geometry& g, const igemm::Selection& s, const igemm::Strides& gy_strides,
                        const scalar_t* gy, scalar_t* gb) {
    grad_bias_kernel<scalar_t><<<unsigned(g.k_out), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(g, s, gy_strides,
                                                                                                      gy, gb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

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
