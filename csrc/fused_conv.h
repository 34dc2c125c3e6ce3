// The fused gather convolution's host side, shared by the CUDA kernels on a GPU and their CPU emulation:
// argument checks, output allocation, the GEMM problems of each pass (csrc/implicit_gemm.h), the
// choice of tile and split-K, and the order of the passes. An executor runs the passes: the kernels of
// csrc/fused_conv_kernels.cuh, launched by KernelExecutor<Device> with
//   csrc/cuda/fused_conv_cuda.cu       CudaDevice: on the GPU (`dcp::gathered_conv2d` on CUDA tensors)
//   csrc/emulation/fused_conv_emulated.cpp   EmulatedDevice: under the CPU emulation of CUDA
//                                      (`dcp::implicit_gemm_conv2d` on CPU tensors, for the tests)
// Index ranges are not checked here: every kernel checks the indices it reads on the device (no host
// sync), on a GPU and in the CPU emulation alike.
// Executor interface (all static):
//   bool mma_supported(const at::Tensor&)        tensor-core tiles usable for this device
//   int64_t multiprocessors(const at::Tensor&)   for the split-K choice
//   gemm<Tile>(problem, a, b, bias, c, workspace, split)
//   depthwise_forward / depthwise_grad_input / depthwise_grad_weight / grad_bias
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>

#include <array>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "implicit_gemm.h"

namespace dcp {

// How to run: `mma` -1 chooses (tensor-core tiles where the device has them for fp16/bf16, and for
// fp32 as TF32 when PyTorch allows cuDNN's convolutions TF32: torch.backends.cudnn.allow_tf32), 0
// forces the SIMT tiles, 1 the tensor-core tiles (not for float64); `wgrad_splits` 0 chooses.
struct FusedConfig {
  int64_t mma = -1;
  int64_t wgrad_splits = 0;
};

namespace fused {

inline igemm::Geometry geometry(const ConvGeometry& g, const at::Tensor& in_idx, const at::Tensor& out_idx) {
  return {g.n, g.h, g.w, g.oh, g.ow, g.kh, g.kw, g.stride_h, g.stride_w, g.pad_h, g.pad_w,
          g.dil_h, g.dil_w, g.c_in, g.c_out, in_idx.numel(), out_idx.numel()};
}

inline igemm::Strides strides(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline igemm::Selection selection(const at::Tensor& in_idx, const at::Tensor& out_idx, bool x_compact,
                                  bool y_compact) {
  return {in_idx.const_data_ptr<int64_t>(), out_idx.const_data_ptr<int64_t>(), x_compact, y_compact};
}

inline bool use_mma(const FusedConfig& cfg, at::ScalarType dtype, bool supported) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  TORCH_CHECK(cfg.mma >= -1 && cfg.mma <= 1, "mma must be -1 (choose), 0 (SIMT tiles) or 1 (tensor-core tiles), got ",
              cfg.mma);
  TORCH_CHECK(cfg.mma != 1 || ((half || dtype == at::kFloat) && supported), "mma=1 (tensor-core tiles) needs ",
              "float16/bfloat16/float32 tensors on a device with compute capability 8.0 or newer, got ", dtype);
  const bool tf32 = dtype == at::kFloat && at::globalContext().allowTF32CuDNN();
  return cfg.mma == 1 || (cfg.mma == -1 && (half || tf32) && supported);
}

// C = A x B for `problem` on the tile family chosen, split `splits` ways along K (1: no workspace).
template <typename Exec, typename Tile, typename scalar_t, typename Problem>
void run_gemm_on(const Problem& p, const scalar_t* a, const scalar_t* b, const scalar_t* bias, scalar_t* c,
                 int64_t splits, const at::Tensor& like) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto split = igemm::make_split(p.depth(), Tile::kK, splits);
  at::Tensor workspace;
  if (split.splits > 1) {
    workspace = at::empty({split.splits, p.rows(), p.cols()},
                          like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  Exec::template gemm<Tile>(p, a, b, bias, c, split.splits > 1 ? workspace.mutable_data_ptr<acc_t>() : nullptr,
                            split);
}

template <typename Exec, typename scalar_t, typename Problem>
void run_gemm(const Problem& p, const scalar_t* a, const scalar_t* b, const scalar_t* bias, scalar_t* c, bool mma,
              int64_t splits, const at::Tensor& like) {
  if (p.rows() == 0 || p.cols() == 0) return;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (mma) return run_gemm_on<Exec, igemm::MmaTile>(p, a, b, bias, c, splits, like);
  }
  run_gemm_on<Exec, igemm::SimtTile>(p, a, b, bias, c, splits, like);
}

// Grad-weight's K split: forced, or chosen for the device's multiprocessor count.
template <typename Tile>
int64_t wgrad_splits(const igemm::GradWeightProblem& p, const FusedConfig& cfg, int64_t multiprocessors) {
  TORCH_CHECK(cfg.wgrad_splits >= 0, "wgrad_splits must be >= 0 (0 chooses), got ", cfg.wgrad_splits);
  if (cfg.wgrad_splits > 0) return cfg.wgrad_splits;
  const int64_t tiles = ((p.rows() + Tile::kM - 1) / Tile::kM) * ((p.cols() + Tile::kN - 1) / Tile::kN);
  return igemm::choose_splits(tiles, (p.depth() + Tile::kK - 1) / Tile::kK, multiprocessors);
}

}  // namespace fused

template <typename Exec>
at::Tensor fused_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise, bool x_compact,
                        bool y_compact, const FusedConfig& cfg) {
  const auto cg = check_conv(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact,
                             /*any_x_layout=*/true, /*index_range_on_host=*/false);
  TORCH_CHECK(!bias.has_value() || bias->is_contiguous(), "bias must be contiguous; call .contiguous() first");
  const auto g = fused::geometry(cg, in_idx, out_idx);
  const auto sel = fused::selection(in_idx, out_idx, x_compact, y_compact);
  const int64_t channels = y_compact ? g.k_out : g.c_out;
  // Unselected channels of a full-width output are exact zeros: one fill, then only the block.
  auto y = y_compact ? at::empty({g.n, channels, g.oh, g.ow}, x.options())
                     : at::zeros({g.n, channels, g.oh, g.ow}, x.options());
  const bool mma = fused::use_mma(cfg, x.scalar_type(), Exec::mma_supported(x));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcp_fused_conv2d", [&] {
    const scalar_t* b = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    if (depthwise) {
      const igemm::Depthwise p{g, sel, fused::strides(x), fused::strides(y)};
      Exec::depthwise_forward(p, x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
                              y.mutable_data_ptr<scalar_t>());
    } else {
      const igemm::ForwardProblem p{g, sel, fused::strides(x), fused::strides(y)};
      fused::run_gemm<Exec>(p, x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
                            y.mutable_data_ptr<scalar_t>(), mma, 1, x);
    }
  });
  return y;
}

template <typename Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_conv2d_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, bool x_compact, bool y_compact, std::array<bool, 3> output_mask, const FusedConfig& cfg) {
  const auto cg = check_conv(x, weight, c10::nullopt, in_idx, out_idx, stride, padding, dilation, depthwise,
                             x_compact, /*any_x_layout=*/true, /*index_range_on_host=*/false);
  const int64_t y_channels = y_compact ? out_idx.numel() : cg.c_out;
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == cg.n && grad_y.size(1) == y_channels && grad_y.size(2) == cg.oh &&
                  grad_y.size(3) == cg.ow,
              "grad_y has shape ", grad_y.sizes(), ", which does not match the convolution's output");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(),
              "grad_y must be a ", x.scalar_type(), " tensor on ", x.device());
  const auto g = fused::geometry(cg, in_idx, out_idx);
  const auto sel = fused::selection(in_idx, out_idx, x_compact, y_compact);
  const bool mma = fused::use_mma(cfg, x.scalar_type(), Exec::mma_supported(x));
  at::Tensor grad_x = at::empty({0}, x.options()), grad_w = at::empty({0}, x.options()),
             grad_b = at::empty({0}, x.options());
  // Full-width gradients are zero outside the selection: one fill each, then only the block.
  if (output_mask[0]) {
    grad_x = x_compact ? at::empty({g.n, g.k_in, g.h, g.w}, x.options())
                       : at::zeros({g.n, x.size(1), g.h, g.w}, x.options());
  }
  if (output_mask[1]) grad_w = at::zeros_like(weight, at::MemoryFormat::Contiguous);
  if (output_mask[2]) grad_b = at::zeros({g.c_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcp_fused_conv2d_backward", [&] {
    const scalar_t* gy = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xs = x.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    if (depthwise) {
      const igemm::Depthwise p{g, sel, fused::strides(x), fused::strides(grad_y)};
      if (output_mask[0]) {
        const igemm::Depthwise pg{g, sel, fused::strides(grad_x), fused::strides(grad_y)};
        Exec::depthwise_grad_input(pg, gy, w, grad_x.mutable_data_ptr<scalar_t>());
      }
      if (output_mask[1]) Exec::depthwise_grad_weight(p, gy, xs, grad_w.mutable_data_ptr<scalar_t>());
    } else {
      if (output_mask[0]) {
        const igemm::GradInputProblem p{g, sel, fused::strides(grad_y), fused::strides(grad_x)};
        fused::run_gemm<Exec>(p, gy, w, static_cast<const scalar_t*>(nullptr), grad_x.mutable_data_ptr<scalar_t>(),
                              mma, 1, x);
      }
      if (output_mask[1]) {
        const igemm::GradWeightProblem p{g, sel, fused::strides(grad_y), fused::strides(x)};
        const int64_t splits = mma ? fused::wgrad_splits<igemm::MmaTile>(p, cfg, Exec::multiprocessors(x))
                                   : fused::wgrad_splits<igemm::SimtTile>(p, cfg, Exec::multiprocessors(x));
        fused::run_gemm<Exec>(p, gy, xs, static_cast<const scalar_t*>(nullptr), grad_w.mutable_data_ptr<scalar_t>(),
                              mma, splits, x);
      }
    }
    if (output_mask[2]) {
      Exec::grad_bias(g, sel, fused::strides(grad_y), gy, grad_b.mutable_data_ptr<scalar_t>());
    }
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace dcp
