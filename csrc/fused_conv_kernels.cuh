// The CUDA kernels of the fused gather convolution (`dcp::gathered_conv2d[_backward]` on CUDA tensors)
// and the executor that launches them for csrc/fused_conv.h. Compiled twice:
//   * by nvcc, in csrc/cuda/fused_conv_cuda.cu: the kernels run on the GPU;
//   * by the host compiler with DCP_EMULATE_CUDA, in csrc/emulation/fused_conv_emulated.cpp: the same source
//     runs on the CPU under csrc/emulation/cuda_emulation.h (a fiber per CUDA thread, barriers,
//     emulated WMMA fragments), which is how the tests check this code on machines without a GPU.
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
// Both stage K tiles double-buffered (pipelined_k_loop): the next tile's global loads are in flight
// while the current one is multiplied; one barrier per K tile.
// Grad-weight reduces over the batch: split-K over gridDim.z with float partial sums reduced in
// split order by a second kernel (deterministic, no float atomics). Depthwise convs run direct
// kernels; grad-weight and grad-bias reduce in a fixed-order shared-memory tree (deterministic).
// No host sync in a call: index ranges are checked on the device, by every block before it reads
// (a device-side assert).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fused_conv.h"

#if defined(DCP_EMULATE_CUDA)
#include "emulation/cuda_emulation.h"
// CUDA's keywords for the host compiler; undefined at the end of this header.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static  // blocks run one at a time: a function's statics are its block's shared memory
#define __align__(bytes) __attribute__((aligned(bytes)))
#define __syncthreads() ::dcp::emu::barrier(__LINE__)
#define DCP_KERNEL_ASSERT(cond, what)                                        \
  do {                                                                       \
    if (!(cond)) ::dcp::emu::kernel_assert_failed(what, __FILE__, __LINE__); \
  } while (0)
#define DCP_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define DCP_KERNEL_ASSERT(cond, what) CUDA_KERNEL_ASSERT((cond) && what)
#define DCP_UNROLL _Pragma("unroll")
#endif

namespace dcp {
namespace {  // internal linkage: the CUDA and the emulated build of these templates share one library

#if defined(DCP_EMULATE_CUDA)
using emu::blockDim;
using emu::blockIdx;
using emu::dim3;
using emu::gridDim;
using emu::threadIdx;
namespace wmma = emu::wmma;
using device_half = c10::Half;  // the same 16 bits as __half and __nv_bfloat16
using device_bfloat16 = c10::BFloat16;
#else
namespace wmma = nvcuda::wmma;
using device_half = __half;
using device_bfloat16 = __nv_bfloat16;
#endif

constexpr int kThreads = 256;

// Every block checks the indices it may read before reading them (cheap next to a tile's work:
// k_in + k_out loads spread over the block's threads); the barrier keeps every thread from using an
// index before the check of it has run. Call it from all threads, before any early exit.
__device__ __forceinline__ void check_selection(const igemm::Geometry& g, const igemm::Selection& s) {
  for (int64_t i = threadIdx.x; i < g.k_in; i += blockDim.x) {
    DCP_KERNEL_ASSERT(s.in_idx[i] >= 0 && s.in_idx[i] < g.c_in, "in_idx holds an index outside [0, C_in)");
  }
  for (int64_t j = threadIdx.x; j < g.k_out; j += blockDim.x) {
    DCP_KERNEL_ASSERT(s.out_idx[j] >= 0 && s.out_idx[j] < g.c_out, "out_idx holds an index outside [0, C_out)");
  }
  __syncthreads();
}

// What both GEMM kernels keep in shared memory about their block: its rows and columns, decomposed
// once, and two slots of K-index decompositions (see csrc/implicit_gemm.h and pipelined_k_loop).
template <typename Tile, typename Problem>
struct BlockIndices {
  typename Problem::Row rows[Tile::kM];
  typename Problem::Col cols[Tile::kN];
  typename Problem::Depth depths[2][Tile::kK];
};

// The block's output tile origin (m0, n0) and K split s; the indices checked and the block's rows
// and columns decomposed into `idx`. No barrier after the decomposition: the first barrier of
// pipelined_k_loop comes before anything reads it.
struct BlockOrigin {
  int64_t m0, n0, s;
};
template <typename Tile, typename Problem>
__device__ __forceinline__ BlockOrigin gemm_prologue(const Problem& p, BlockIndices<Tile, Problem>& idx) {
  check_selection(p.g, p.s);
  const BlockOrigin o{int64_t(blockIdx.x) * Tile::kM, int64_t(blockIdx.y) * Tile::kN, int64_t(blockIdx.z)};
  for (int i = threadIdx.x; i < Tile::kM; i += blockDim.x) idx.rows[i] = igemm::row_or_none(p, o.m0 + i);
  for (int i = threadIdx.x; i < Tile::kN; i += blockDim.x) idx.cols[i] = igemm::col_or_none(p, o.n0 + i);
  return o;
}

// The K loop of both tile families, software-pipelined: while the block multiplies one K tile from
// shared memory, each thread's loads of its share of the next tile's operands are in flight into
// registers; it then stores them into the other of two shared buffers. One barrier per K tile.
//   load_a(offset) / load_b(offset) -> staged_t     an operand element (offset -1: a zero of the padding)
//   store_a(buffer, mm, kk, v) / store_b(buffer, kk, nn, v)   into shared buffer 0 or 1
//   multiply(buffer)                                 accumulate the tile staged in `buffer`
// `idx`: from gemm_prologue (rows and columns decomposed; its writes ordered before their first read
// here by the barrier after the first K indices).
template <typename Tile, typename staged_t, typename Problem, typename LoadA, typename LoadB, typename StoreA,
          typename StoreB, typename Multiply>
__device__ __forceinline__ void pipelined_k_loop(const Problem& p, const igemm::SplitK& split, int64_t s,
                                                 BlockIndices<Tile, Problem>& idx, LoadA load_a, LoadB load_b,
                                                 StoreA store_a, StoreB store_b, Multiply multiply) {
  const auto* rows = idx.rows;
  const auto* cols = idx.cols;
  auto* depths = idx.depths;
  constexpr int kA = Tile::kK * Tile::kM / Tile::kThreads, kB = Tile::kK * Tile::kN / Tile::kThreads;
  static_assert(kA * Tile::kThreads == Tile::kK * Tile::kM && kB * Tile::kThreads == Tile::kK * Tile::kN,
                "each thread stages whole elements");
  // Consecutive threads take consecutive rows (output pixels: consecutive addresses in NCHW) and columns.
  staged_t a_regs[kA], b_regs[kB];
  auto fetch = [&](const typename Problem::Depth* depth) {
DCP_UNROLL
    for (int r = 0; r < kA; ++r) {
      const int e = int(threadIdx.x) + r * Tile::kThreads;
      a_regs[r] = load_a(p.a(rows[e % Tile::kM], depth[e / Tile::kM]));
    }
DCP_UNROLL
    for (int r = 0; r < kB; ++r) {
      const int e = int(threadIdx.x) + r * Tile::kThreads;
      b_regs[r] = load_b(p.b(depth[e / Tile::kN], cols[e % Tile::kN]));
    }
  };
  auto store = [&](int buffer) {
DCP_UNROLL
    for (int r = 0; r < kA; ++r) {
      const int e = int(threadIdx.x) + r * Tile::kThreads;
      store_a(buffer, e % Tile::kM, e / Tile::kM, a_regs[r]);
    }
DCP_UNROLL
    for (int r = 0; r < kB; ++r) {
      const int e = int(threadIdx.x) + r * Tile::kThreads;
      store_b(buffer, e / Tile::kN, e % Tile::kN, b_regs[r]);
    }
  };
  auto stage_depths = [&](int slot, int64_t k0) {
    if (threadIdx.x < unsigned(Tile::kK)) depths[slot][threadIdx.x] = igemm::depth_or_none(p, k0 + threadIdx.x);
  };
  const int64_t k_begin = split.begin(s, Tile::kK), k_end = split.end(s, Tile::kK);
  if (k_begin >= k_end) return;  // uniform over the block
  stage_depths(0, k_begin);
  __syncthreads();
  fetch(depths[0]);
  store(0);
  stage_depths(1, k_begin + Tile::kK);
  __syncthreads();
  int buffer = 0;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += Tile::kK, buffer ^= 1) {
    // Races ruled out: this iteration reads tile `buffer` and depth slot `buffer ^ 1`, and writes
    // tile `buffer ^ 1` and depth slot `buffer`, each last used before the previous barrier.
    const bool more = k0 + Tile::kK < k_end;  // uniform over the block
    if (more) fetch(depths[buffer ^ 1]);
    multiply(buffer);
    if (more) {
      store(buffer ^ 1);
      stage_depths(buffer, k0 + 2 * Tile::kK);
    }
    __syncthreads();
  }
}

template <typename Problem, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(igemm::SimtTile::kThreads)
    simt_gemm_kernel(const Problem p, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                     const scalar_t* __restrict__ bias, scalar_t* __restrict__ c, acc_t* __restrict__ workspace,
                     const igemm::SplitK split) {
  using T = igemm::SimtTile;
  constexpr int kMicro = 4, kLanes = T::kM / kMicro;  // 16 x 16 threads, each rows tm + 16 i, cols tn + 16 j
  static_assert(T::kM == T::kN && kLanes * kLanes == T::kThreads, "one thread per 4 x 4 micro-tile");
  __shared__ acc_t a_tile[2][T::kK][T::kM];
  __shared__ acc_t b_tile[2][T::kK][T::kN];
  __shared__ BlockIndices<T, Problem> idx;
  const BlockOrigin origin = gemm_prologue(p, idx);
  const int64_t m0 = origin.m0, n0 = origin.n0, s = origin.s;
  const int64_t rows = p.rows(), cols = p.cols();
  const int tm = threadIdx.x % kLanes, tn = threadIdx.x / kLanes;
  acc_t acc[kMicro][kMicro];
DCP_UNROLL
  for (int i = 0; i < kMicro; ++i) {
DCP_UNROLL
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
  }
  pipelined_k_loop<T, acc_t>(
      p, split, s, idx,
      [&](int64_t off) { return off >= 0 ? static_cast<acc_t>(a[off]) : acc_t(0); },
      [&](int64_t off) { return off >= 0 ? static_cast<acc_t>(b[off]) : acc_t(0); },
      [&](int buffer, int mm, int kk, acc_t v) { a_tile[buffer][kk][mm] = v; },
      [&](int buffer, int kk, int nn, acc_t v) { b_tile[buffer][kk][nn] = v; },
      [&](int buffer) {
DCP_UNROLL
        for (int kk = 0; kk < T::kK; ++kk) {
          acc_t av[kMicro], bv[kMicro];
DCP_UNROLL
          for (int i = 0; i < kMicro; ++i) {
            av[i] = a_tile[buffer][kk][tm + kLanes * i];
            bv[i] = b_tile[buffer][kk][tn + kLanes * i];
          }
DCP_UNROLL
          for (int i = 0; i < kMicro; ++i) {
DCP_UNROLL
            for (int j = 0; j < kMicro; ++j) acc[i][j] += av[i] * bv[j];
          }
        }
      });
DCP_UNROLL
  for (int i = 0; i < kMicro; ++i) {
DCP_UNROLL
    for (int j = 0; j < kMicro; ++j) {
      const int64_t m = m0 + tm + kLanes * i, n = n0 + tn + kLanes * j;
      if (m < rows && n < cols) igemm::store(p, m, n, acc[i][j], bias, c, workspace, s, split.splits);
    }
  }
}

#if defined(DCP_EMULATE_CUDA) || !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass, sm_80+, emulation
// What the tensor-core tiles stage in shared memory and multiply, per input type.
template <typename scalar_t>
struct MmaOperand {  // fp16, bf16: staged as their 16 bits, one 16x16x16 mma per K tile
  using staged_t = uint16_t;
  using fragment_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, device_half, device_bfloat16>;
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
  using fragment_t = wmma::precision::tf32;
  using load_t = float;
  static constexpr int kStep = 8;
  static __device__ __forceinline__ staged_t stage(const float* src, int64_t off) {
    return off >= 0 ? igemm::round_to_tf32(src[off]) : 0.0f;
  }
  // WMMA wants TF32 fragments converted after loading (a no-op on values already rounded).
  template <typename Fragment>
  static __device__ __forceinline__ void to_fragment_precision(Fragment& f) {
    for (int t = 0; t < f.num_elements; ++t) f.x[t] = wmma::__float_to_tf32(f.x[t]);
  }
};
#endif

template <typename Problem, typename scalar_t>
__global__ void __launch_bounds__(igemm::MmaTile::kThreads)
    mma_gemm_kernel(const Problem p, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                    const scalar_t* __restrict__ bias, scalar_t* __restrict__ c, float* __restrict__ workspace,
                    const igemm::SplitK split) {
#if defined(DCP_EMULATE_CUDA) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  using T = igemm::MmaTile;
  using Op = MmaOperand<scalar_t>;
  using staged_t = typename Op::staged_t;
  using load_t = typename Op::load_t;
  constexpr int kFrag = 16, kStep = Op::kStep;
  static_assert(T::kK % kStep == 0, "whole mmas per K tile");
  // Row strides padded: multiples of 8 16-bit / 4 32-bit elements (WMMA's ldm), and every fragment
  // pointer 32-byte aligned (rows of 16, columns of 16, K steps of 8 or 16 elements).
  constexpr int kLdA = T::kK + 8, kLdB = T::kN + 8, kLdC = T::kN + 4;
  static_assert((T::kM * kLdA * sizeof(staged_t)) % 32 == 0 && (T::kK * kLdB * sizeof(staged_t)) % 32 == 0,
                "the second buffer of each tile starts 32-byte aligned");
  __shared__ __align__(32) staged_t a_tile[2][T::kM * kLdA];  // row-major (m, k)
  __shared__ __align__(32) staged_t b_tile[2][T::kK * kLdB];  // row-major (k, n)
  __shared__ __align__(32) float c_tile[T::kM * kLdC];
  __shared__ BlockIndices<T, Problem> idx;
  const BlockOrigin origin = gemm_prologue(p, idx);
  const int64_t m0 = origin.m0, n0 = origin.n0, s = origin.s;
  const int64_t rows = p.rows(), cols = p.cols();
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;  // 2 x 2 warps, 32 x 32 outputs each
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kStep, float> acc[2][2];
DCP_UNROLL
  for (int i = 0; i < 2; ++i) {
DCP_UNROLL
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  pipelined_k_loop<T, staged_t>(
      p, split, s, idx, [&](int64_t off) { return Op::stage(a, off); },
      [&](int64_t off) { return Op::stage(b, off); },
      [&](int buffer, int mm, int kk, staged_t v) { a_tile[buffer][mm * kLdA + kk] = v; },
      [&](int buffer, int kk, int nn, staged_t v) { b_tile[buffer][kk * kLdB + nn] = v; },
      [&](int buffer) {
DCP_UNROLL
        for (int ks = 0; ks < T::kK; ks += kStep) {
          wmma::fragment<wmma::matrix_a, kFrag, kFrag, kStep, typename Op::fragment_t, wmma::row_major> fa[2];
          wmma::fragment<wmma::matrix_b, kFrag, kFrag, kStep, typename Op::fragment_t, wmma::row_major> fb[2];
DCP_UNROLL
          for (int i = 0; i < 2; ++i) {
            wmma::load_matrix_sync(
                fa[i], reinterpret_cast<const load_t*>(a_tile[buffer] + (wm * 32 + i * kFrag) * kLdA + ks), kLdA);
            wmma::load_matrix_sync(
                fb[i], reinterpret_cast<const load_t*>(b_tile[buffer] + ks * kLdB + wn * 32 + i * kFrag), kLdB);
            Op::to_fragment_precision(fa[i]);
            Op::to_fragment_precision(fb[i]);
          }
DCP_UNROLL
          for (int i = 0; i < 2; ++i) {
DCP_UNROLL
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
          }
        }
      });
DCP_UNROLL
  for (int i = 0; i < 2; ++i) {
DCP_UNROLL
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
  DCP_KERNEL_ASSERT(false, "tensor-core tiles need compute capability 8.0 or newer");
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
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
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

int grid_stride_blocks(int64_t total) {
  return int(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
}

// The executor of csrc/fused_conv.h for these kernels. `Device` launches them and describes the device:
//   static void launch(name, kernel, grid, block, args...)   runs kernel<<<grid, block>>>(args...)
//   static bool mma_supported(const at::Tensor&)             compute capability 8.0 or newer
//   static int64_t multiprocessors(const at::Tensor&)
template <typename Device>
struct KernelExecutor {
  static bool mma_supported(const at::Tensor& x) { return Device::mma_supported(x); }
  static int64_t multiprocessors(const at::Tensor& x) { return Device::multiprocessors(x); }

  template <typename Tile, typename Problem, typename scalar_t, typename acc_t>
  static void gemm(const Problem& p, const scalar_t* a, const scalar_t* b, const scalar_t* bias, scalar_t* c,
                   acc_t* workspace, const igemm::SplitK& split) {
    const int64_t tiles_m = (p.rows() + Tile::kM - 1) / Tile::kM, tiles_n = (p.cols() + Tile::kN - 1) / Tile::kN;
    TORCH_CHECK(tiles_m < (int64_t(1) << 31) && tiles_n <= 65535 && split.splits <= 65535,
                "the convolution is too large for one launch (", tiles_m, " x ", tiles_n, " tiles)");
    const dim3 grid(unsigned(tiles_m), unsigned(tiles_n), unsigned(split.splits));
    if constexpr (std::is_same_v<Tile, igemm::MmaTile>) {
      Device::launch("mma_gemm_kernel", &mma_gemm_kernel<Problem, scalar_t>, grid, dim3(Tile::kThreads), p, a, b,
                     bias, c, workspace, split);
    } else {
      Device::launch("simt_gemm_kernel", &simt_gemm_kernel<Problem, scalar_t, acc_t>, grid, dim3(Tile::kThreads), p,
                     a, b, bias, c, workspace, split);
    }
    if (split.splits > 1) {
      Device::launch("reduce_splits_kernel", &reduce_splits_kernel<Problem, scalar_t, acc_t>,
                     dim3(grid_stride_blocks(p.rows() * p.cols())), dim3(kThreads), p, workspace, split.splits, bias,
                     c);
    }
  }

  template <typename scalar_t>
  static void depthwise_forward(const igemm::Depthwise& p, const scalar_t* x, const scalar_t* w, const scalar_t* bias,
                                scalar_t* y) {
    const int64_t total = p.g.n * p.g.k_out * p.g.oh * p.g.ow;
    if (total == 0) return;
    Device::launch("depthwise_forward_kernel", &depthwise_forward_kernel<scalar_t>, dim3(grid_stride_blocks(total)),
                   dim3(kThreads), p, x, w, bias, y);
  }

  template <typename scalar_t>
  static void depthwise_grad_input(const igemm::Depthwise& p, const scalar_t* gy, const scalar_t* w, scalar_t* gx) {
    const int64_t total = p.g.n * p.g.k_out * p.g.h * p.g.w;
    if (total == 0) return;
    Device::launch("depthwise_grad_input_kernel", &depthwise_grad_input_kernel<scalar_t>,
                   dim3(grid_stride_blocks(total)), dim3(kThreads), p, gy, w, gx);
  }

  template <typename scalar_t>
  static void depthwise_grad_weight(const igemm::Depthwise& p, const scalar_t* gy, const scalar_t* x, scalar_t* gw) {
    TORCH_CHECK(p.g.k_out <= (int64_t(1) << 31) - 1 && p.g.taps() <= 65535, "depthwise conv too large for one launch");
    const dim3 grid(unsigned(p.g.k_out), unsigned(p.g.taps()));
    Device::launch("depthwise_grad_weight_kernel", &depthwise_grad_weight_kernel<scalar_t>, grid, dim3(kThreads), p,
                   gy, x, gw);
  }

  template <typename scalar_t>
  static void grad_bias(const igemm::Geometry& g, const igemm::Selection& s, const igemm::Strides& gy_strides,
                        const scalar_t* gy, scalar_t* gb) {
    Device::launch("grad_bias_kernel", &grad_bias_kernel<scalar_t>, dim3(unsigned(g.k_out)), dim3(kThreads), g, s,
                   gy_strides, gy, gb);
  }
};

}  // namespace
}  // namespace dcp

#undef DCP_KERNEL_ASSERT
#undef DCP_UNROLL
#if defined(DCP_EMULATE_CUDA)
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#undef __syncthreads
#endif
