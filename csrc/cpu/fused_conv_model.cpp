// Host model of the CUDA fused gather implicit-GEMM convolution (csrc/cuda/fused_conv_cuda.cu).
//
// `dcp::implicit_gemm_conv2d` / `dcp::implicit_gemm_conv2d_backward` on CPU tensors run the kernels'
// host side unchanged (csrc/fused_conv.h: checks, allocation, problems, tile and split-K choice) and,
// in place of each kernel, plain loops over the same block tiles, K tiles, split-K ranges and
// epilogues, reading every operand through the same index functions (csrc/implicit_gemm.h). The tests
// compare them with the reference convolution: what they verify on a machine without a GPU is the
// index arithmetic, tiling, split-K and epilogues, not the kernels' thread-level code (shared-memory
// staging, tensor-core fragments), which only a GPU run checks. Single-threaded and slow: for tests.
//
// On CUDA tensors the same two ops run the CUDA kernels with the configuration forced (tile family,
// split count), so the GPU tests cover every path the heuristics might choose.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../fused_conv.h"

namespace dcp {
namespace {

struct HostModel {
  // The model stands for an sm_80+ device with 132 multiprocessors (an H100 SXM).
  static bool mma_supported(const at::Tensor&) { return true; }
  static int64_t multiprocessors(const at::Tensor&) { return 132; }

  template <typename Tile, typename Problem, typename scalar_t, typename acc_t>
  static void gemm(const Problem& p, const scalar_t* a, const scalar_t* b, const scalar_t* bias, scalar_t* c,
                   acc_t* workspace, const igemm::SplitK& split) {
    const int64_t rows = p.rows(), cols = p.cols();
    const int64_t tiles_m = (rows + Tile::kM - 1) / Tile::kM, tiles_n = (cols + Tile::kN - 1) / Tile::kN;
    std::vector<acc_t> a_tile(Tile::kM * Tile::kK), b_tile(Tile::kK * Tile::kN), acc(Tile::kM * Tile::kN);
    std::vector<typename Problem::Row> row_info(Tile::kM);
    std::vector<typename Problem::Col> col_info(Tile::kN);
    std::vector<typename Problem::Depth> depth_info(Tile::kK);
    // Grid order of the kernels: x over M tiles, y over N tiles, z over splits.
    for (int64_t s = 0; s < split.splits; ++s) {
      for (int64_t tn = 0; tn < tiles_n; ++tn) {
        for (int64_t tm = 0; tm < tiles_m; ++tm) {
          const int64_t m0 = tm * Tile::kM, n0 = tn * Tile::kN;
          // Decomposed once per block, as the kernels stage them in shared memory.
          for (int mm = 0; mm < Tile::kM; ++mm) row_info[mm] = igemm::row_or_none(p, m0 + mm);
          for (int nn = 0; nn < Tile::kN; ++nn) col_info[nn] = igemm::col_or_none(p, n0 + nn);
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t k0 = split.begin(s, Tile::kK); k0 < split.end(s, Tile::kK); k0 += Tile::kK) {
            for (int kk = 0; kk < Tile::kK; ++kk) depth_info[kk] = igemm::depth_or_none(p, k0 + kk);
            // Stage the tiles as the kernels do: zeros outside the matrix and in the padding.
            for (int kk = 0; kk < Tile::kK; ++kk) {
              for (int mm = 0; mm < Tile::kM; ++mm) {
                const int64_t off = p.a(row_info[mm], depth_info[kk]);
                a_tile[mm * Tile::kK + kk] = off >= 0 ? igemm::tile_operand<Tile, acc_t>(a[off]) : acc_t(0);
              }
              for (int nn = 0; nn < Tile::kN; ++nn) {
                const int64_t off = p.b(depth_info[kk], col_info[nn]);
                b_tile[kk * Tile::kN + nn] = off >= 0 ? igemm::tile_operand<Tile, acc_t>(b[off]) : acc_t(0);
              }
            }
            for (int mm = 0; mm < Tile::kM; ++mm) {
              for (int kk = 0; kk < Tile::kK; ++kk) {
                const acc_t av = a_tile[mm * Tile::kK + kk];
                for (int nn = 0; nn < Tile::kN; ++nn) acc[mm * Tile::kN + nn] += av * b_tile[kk * Tile::kN + nn];
              }
            }
          }
          for (int mm = 0; mm < Tile::kM && m0 + mm < rows; ++mm) {
            for (int nn = 0; nn < Tile::kN && n0 + nn < cols; ++nn) {
              igemm::store(p, m0 + mm, n0 + nn, acc[mm * Tile::kN + nn], bias, c, workspace, s, split.splits);
            }
          }
        }
      }
    }
    if (split.splits > 1) {
      for (int64_t e = 0; e < rows * cols; ++e) igemm::reduce_splits(p, e, workspace, split.splits, bias, c);
    }
  }

  template <typename scalar_t>
  static void depthwise_forward(const igemm::Depthwise& p, const scalar_t* x, const scalar_t* w,
                                const scalar_t* bias, scalar_t* y) {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t e = 0; e < p.g.n * p.g.k_out * p.g.oh * p.g.ow; ++e) p.forward_element<acc_t>(e, x, w, bias, y);
  }

  template <typename scalar_t>
  static void depthwise_grad_input(const igemm::Depthwise& p, const scalar_t* gy, const scalar_t* w, scalar_t* gx) {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t e = 0; e < p.g.n * p.g.k_out * p.g.h * p.g.w; ++e) p.grad_input_element<acc_t>(e, gy, w, gx);
  }

  // The kernels reduce in a fixed-order tree over 256 threads; the model adds in pixel order (the
  // tests compare with a tolerance).
  template <typename scalar_t>
  static void depthwise_grad_weight(const igemm::Depthwise& p, const scalar_t* gy, const scalar_t* x, scalar_t* gw) {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t j = 0; j < p.g.k_out; ++j) {
      if (!p.keep(j)) continue;
      for (int64_t tap = 0; tap < p.g.taps(); ++tap) {
        acc_t v = 0;
        for (int64_t e = 0; e < p.g.n * p.g.oh * p.g.ow; ++e) v += p.grad_weight_term<acc_t>(e, j, tap, gy, x);
        gw[p.weight(j, tap)] = static_cast<scalar_t>(v);
      }
    }
  }

  template <typename scalar_t>
  static void grad_bias(const igemm::Geometry& g, const igemm::Selection& s, const igemm::Strides& gy_strides,
                        const scalar_t* gy, scalar_t* gb) {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t j = 0; j < g.k_out; ++j) {
      acc_t v = 0;
      for (int64_t e = 0; e < g.n * g.oh * g.ow; ++e) v += igemm::grad_bias_term<acc_t>(g, s, gy_strides, e, j, gy);
      gb[s.out_idx[j]] = static_cast<scalar_t>(v);
    }
  }
};

at::Tensor implicit_gemm_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise, bool x_compact,
                              bool y_compact, int64_t mma, int64_t wgrad_splits) {
  return fused_conv2d<HostModel>(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact,
                                 y_compact, FusedConfig{mma, wgrad_splits});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> implicit_gemm_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, bool x_compact, bool y_compact, std::array<bool, 3> output_mask, int64_t mma,
    int64_t wgrad_splits) {
  return fused_conv2d_backward<HostModel>(grad_y, x, weight, in_idx, out_idx, stride, padding, dilation, depthwise,
                                          x_compact, y_compact, output_mask, FusedConfig{mma, wgrad_splits});
}

}  // namespace
}  // namespace dcp

TORCH_LIBRARY_IMPL(dcp, CPU, m) {
  m.impl("implicit_gemm_conv2d", &dcp::implicit_gemm_conv2d);
  m.impl("implicit_gemm_conv2d_backward", &dcp::implicit_gemm_conv2d_backward);
}
