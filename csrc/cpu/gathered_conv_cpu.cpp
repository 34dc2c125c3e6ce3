// CPU kernels of the dcp ops.
//
// groups=1: the input-channel gather is fused into the im2col packing (only selected channels are
// read, straight from the full-width or compact input), the selected weight block is packed once,
// and the products run as one GEMM through ATen (oneDNN/MKL). Backward reuses the packing: grad-weight
// = grad_y x cols^T, grad-input = col2im(W^T x grad_y) written only into the selected channels.
// Depthwise: direct loops. Every loop that writes is parallelised over disjoint outputs
// (at::parallel_for), so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"

namespace dcp {
namespace {

// Calls fn(tap, input offset within the plane) for every tap of output pixel (oy, ox) that lands
// inside the input (taps in the padding contribute nothing).
template <typename Fn>
inline void for_each_tap_inside(const ConvGeometry& g, int64_t oy, int64_t ox, Fn&& fn) {
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
    if (iy < 0 || iy >= g.h) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = ox * g.stride_w - g.pad_w + kx * g.dil_w;
      if (ix >= 0 && ix < g.w) fn(ky * g.kw + kx, iy * g.w + ix);
    }
  }
}

// Images per GEMM: enough output pixels (~2048 columns) for an efficient GEMM, few enough that the
// packed columns of one chunk stay cache-sized instead of materialising kh*kw copies of the batch.
inline int64_t images_per_chunk(const ConvGeometry& g) {
  const int64_t plane = std::max<int64_t>(1, g.oh * g.ow);
  return std::clamp<int64_t>((2048 + plane - 1) / plane, 1, std::max<int64_t>(1, g.n));
}

// cols (k_in*kh*kw, N*OH*OW): row (i, tap) holds input channel in_idx[i] shifted by the tap; zeros
// where the tap falls into the padding.
template <typename scalar_t>
void pack_columns(const scalar_t* x, const int64_t* in_idx, int64_t k_in, bool x_compact, int64_t x_channels,
                  const ConvGeometry& g, scalar_t* cols) {
  const int64_t taps = g.kh * g.kw, plane = g.oh * g.ow, pixels = g.n * plane;
  at::parallel_for(0, k_in * taps, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row / taps, tap = row % taps, ky = tap / g.kw, kx = tap % g.kw;
      const int64_t channel = x_compact ? i : in_idx[i];
      scalar_t* out = cols + row * pixels;
      for (int64_t n = 0; n < g.n; ++n) {
        const scalar_t* src = x + (n * x_channels + channel) * g.h * g.w;
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
          scalar_t* dst = out + n * plane + oy * g.ow;
          if (iy < 0 || iy >= g.h) {
            std::fill(dst, dst + g.ow, scalar_t(0));
            continue;
          }
          for (int64_t ox = 0; ox < g.ow; ++ox) {
            const int64_t ix = ox * g.stride_w - g.pad_w + kx * g.dil_w;
            dst[ox] = (ix >= 0 && ix < g.w) ? src[iy * g.w + ix] : scalar_t(0);
          }
        }
      }
    }
  });
}

// The (k_out, k_in*kh*kw) block of the weight.
at::Tensor weight_block(const at::Tensor& weight, const at::Tensor& in_idx, const at::Tensor& out_idx) {
  const int64_t c_out = weight.size(0), c_in = weight.size(1);
  auto rows = (out_idx.unsqueeze(1) * c_in + in_idx.unsqueeze(0)).flatten();
  return weight.reshape({c_out * c_in, -1}).index_select(0, rows).reshape({out_idx.numel(), -1});
}

at::Tensor columns(const at::Tensor& x, const at::Tensor& in_idx, bool x_compact, const ConvGeometry& g) {
  const int64_t k_in = in_idx.numel();
  auto cols = at::empty({k_in * g.kh * g.kw, g.n * g.oh * g.ow}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcp_pack_columns", [&] {
    pack_columns<scalar_t>(x.const_data_ptr<scalar_t>(), in_idx.const_data_ptr<int64_t>(), k_in, x_compact,
                           x.size(1), g, cols.mutable_data_ptr<scalar_t>());
  });
  return cols;
}

// Channels of a (N, C, plane) tensor as a (k, N*plane) matrix; `channel` maps row j to the channel read.
at::Tensor gather_rows(const at::Tensor& t, const at::Tensor& idx, bool compact) {
  auto selected = compact ? t : t.index_select(1, idx);
  return selected.transpose(0, 1).reshape({idx.numel(), -1});
}

template <typename scalar_t>
void depthwise_forward(const scalar_t* x, const scalar_t* w, const scalar_t* bias, const float* keep,
                       const int64_t* out_idx, int64_t k_out, bool y_compact, int64_t y_channels,
                       const ConvGeometry& g, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, g.n * k_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / k_out, j = item % k_out, c = out_idx[j];
      const scalar_t* src = x + (n * g.c_out + c) * g.h * g.w;
      const scalar_t* filt = w + c * g.kh * g.kw;
      scalar_t* dst = y + (n * y_channels + (y_compact ? j : c)) * g.oh * g.ow;
      const acc_t b = bias ? acc_t(bias[c]) : acc_t(0);
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        for (int64_t ox = 0; ox < g.ow; ++ox) {
          acc_t acc = 0;
          for_each_tap_inside(g, oy, ox, [&](int64_t tap, int64_t at) { acc += acc_t(src[at]) * acc_t(filt[tap]); });
          dst[oy * g.ow + ox] = scalar_t(acc * acc_t(keep[c]) + b);
        }
      }
    }
  });
}

template <typename scalar_t>
void depthwise_backward(const scalar_t* gy, const scalar_t* x, const scalar_t* w, const float* keep,
                        const int64_t* out_idx, int64_t k_out, bool gy_compact, int64_t gy_channels,
                        const ConvGeometry& g, scalar_t* gx, scalar_t* gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = g.kh * g.kw;
  // grad-weight: one selected channel per task, reduced over the batch in a fixed order.
  if (gw != nullptr) {
    at::parallel_for(0, k_out, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(taps);
      for (int64_t j = begin; j < end; ++j) {
        const int64_t c = out_idx[j];
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t n = 0; n < g.n; ++n) {
          const scalar_t* grad = gy + (n * gy_channels + (gy_compact ? j : c)) * g.oh * g.ow;
          const scalar_t* src = x + (n * g.c_out + c) * g.h * g.w;
          for (int64_t oy = 0; oy < g.oh; ++oy)
            for (int64_t ox = 0; ox < g.ow; ++ox) {
              const acc_t go = grad[oy * g.ow + ox];
              for_each_tap_inside(g, oy, ox, [&](int64_t tap, int64_t at) { acc[tap] += go * acc_t(src[at]); });
            }
        }
        for (int64_t t = 0; t < taps; ++t) gw[c * taps + t] = scalar_t(acc[t] * acc_t(keep[c]));
      }
    });
  }
  // grad-input: each (sample, channel) plane is written by one task only.
  if (gx != nullptr) {
    at::parallel_for(0, g.n * k_out, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> plane(g.h * g.w);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / k_out, j = item % k_out, c = out_idx[j];
        if (keep[c] == 0.0f) continue;  // this input channel is unselected: its gradient stays zero
        std::fill(plane.begin(), plane.end(), acc_t(0));
        const scalar_t* grad = gy + (n * gy_channels + (gy_compact ? j : c)) * g.oh * g.ow;
        const scalar_t* filt = w + c * taps;
        for (int64_t oy = 0; oy < g.oh; ++oy)
          for (int64_t ox = 0; ox < g.ow; ++ox) {
            const acc_t go = grad[oy * g.ow + ox];
            for_each_tap_inside(g, oy, ox, [&](int64_t tap, int64_t at) { plane[at] += go * acc_t(filt[tap]); });
          }
        scalar_t* dst = gx + (n * g.c_out + c) * g.h * g.w;
        for (int64_t p = 0; p < g.h * g.w; ++p) dst[p] = scalar_t(plane[p]);
      }
    });
  }
}

// col2im of the selected input channels: each (channel, sample) plane is summed by one task.
template <typename scalar_t>
void unpack_columns(const scalar_t* cols, const int64_t* in_idx, int64_t k_in, bool x_compact, int64_t x_channels,
                    const ConvGeometry& g, scalar_t* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t taps = g.kh * g.kw, plane = g.oh * g.ow, pixels = g.n * plane;
  at::parallel_for(0, k_in * g.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(g.h * g.w);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / g.n, n = item % g.n;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t ky = tap / g.kw, kx = tap % g.kw;
        const scalar_t* src = cols + (i * taps + tap) * pixels + n * plane;
        for (int64_t oy = 0; oy < g.oh; ++oy) {
          const int64_t iy = oy * g.stride_h - g.pad_h + ky * g.dil_h;
          if (iy < 0 || iy >= g.h) continue;
          for (int64_t ox = 0; ox < g.ow; ++ox) {
            const int64_t ix = ox * g.stride_w - g.pad_w + kx * g.dil_w;
            if (ix >= 0 && ix < g.w) acc[iy * g.w + ix] += acc_t(src[oy * g.ow + ox]);
          }
        }
      }
      scalar_t* dst = gx + (n * x_channels + (x_compact ? i : in_idx[i])) * g.h * g.w;
      for (int64_t p = 0; p < g.h * g.w; ++p) dst[p] = scalar_t(acc[p]);
    }
  });
}

at::Tensor gathered_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise, bool x_compact,
                               bool y_compact) {
  const auto g = check_conv(x, weight, bias, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact);
  const int64_t k_out = out_idx.numel(), y_channels = y_compact ? k_out : g.c_out;
  auto y = y_compact ? at::empty({g.n, y_channels, g.oh, g.ow}, x.options())
                     : at::zeros({g.n, y_channels, g.oh, g.ow}, x.options());
  if (g.n == 0) return y;
  if (depthwise) {
    auto keep = at::zeros({g.c_out}, x.options().dtype(at::kFloat)).index_fill_(0, in_idx, 1.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcp_depthwise_forward", [&] {
      depthwise_forward<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                  bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                                  keep.const_data_ptr<float>(), out_idx.const_data_ptr<int64_t>(), k_out, y_compact,
                                  y_channels, g, y.mutable_data_ptr<scalar_t>());
    });
    return y;
  }
  const auto w_block = weight_block(weight, in_idx, out_idx);
  const auto b_block = bias.has_value() ? bias->index_select(0, out_idx).unsqueeze(1) : at::Tensor();
  const int64_t chunk = images_per_chunk(g);
  for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
    ConvGeometry part = g;
    part.n = std::min(chunk, g.n - n0);
    auto out = at::mm(w_block, columns(x.narrow(0, n0, part.n), in_idx, x_compact, part));  // (k_out, n*L)
    if (b_block.defined()) out.add_(b_block);
    auto y_c = out.view({k_out, part.n, g.oh, g.ow}).transpose(0, 1);
    auto y_part = y.narrow(0, n0, part.n);
    if (y_compact) {
      y_part.copy_(y_c);
    } else {
      y_part.index_copy_(1, out_idx, y_c);
    }
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gathered_conv2d_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_idx,
    const at::Tensor& out_idx, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    bool depthwise, bool x_compact, bool y_compact, std::array<bool, 3> output_mask) {
  const auto g = check_conv(x, weight, c10::nullopt, in_idx, out_idx, stride, padding, dilation, depthwise, x_compact);
  TORCH_CHECK(grad_y_in.dim() == 4 && grad_y_in.size(0) == g.n && grad_y_in.size(2) == g.oh &&
                  grad_y_in.size(3) == g.ow && grad_y_in.size(1) == (y_compact ? out_idx.numel() : g.c_out),
              "grad_y has shape ", grad_y_in.sizes(), ", which does not match the convolution's output");
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type() && grad_y_in.device() == x.device(),
              "grad_y must be a ", x.scalar_type(), " tensor on ", x.device());
  const auto grad_y = grad_y_in.contiguous();  // incoming gradients may be expanded or strided
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  const int64_t k_in = in_idx.numel(), k_out = out_idx.numel();
  at::Tensor grad_x = need_x ? at::zeros_like(x) : at::empty({0}, x.options());
  at::Tensor grad_w = need_w ? at::zeros_like(weight) : at::empty({0}, x.options());
  at::Tensor grad_b = at::empty({0}, x.options());
  if (need_b) {
    grad_b = at::zeros({g.c_out}, x.options());
    auto selected = y_compact ? grad_y : grad_y.index_select(1, out_idx);
    grad_b.index_copy_(0, out_idx, selected.sum({0, 2, 3}, false, at::toOpMathType(x.scalar_type())).to(x.scalar_type()));
  }
  if (g.n == 0 || !(need_x || need_w)) return {grad_x, grad_w, grad_b};
  if (depthwise) {
    auto keep = at::zeros({g.c_out}, x.options().dtype(at::kFloat)).index_fill_(0, in_idx, 1.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcp_depthwise_backward", [&] {
      depthwise_backward<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                   weight.const_data_ptr<scalar_t>(), keep.const_data_ptr<float>(),
                                   out_idx.const_data_ptr<int64_t>(), k_out, y_compact, grad_y.size(1), g,
                                   need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
                                   need_w ? grad_w.mutable_data_ptr<scalar_t>() : nullptr);
    });
    return {grad_x, grad_w, grad_b};
  }
  // Chunks of images in a fixed order (the result does not depend on the thread count).
  // The weight block accumulates over chunks in fp32 for 16-bit inputs.
  const auto accumulate = x.options().dtype(at::toOpMathType(x.scalar_type()));
  auto block = need_w ? at::zeros({k_out, k_in * g.kh * g.kw}, accumulate) : at::Tensor();
  const auto w_block_t = need_x ? weight_block(weight, in_idx, out_idx).t() : at::Tensor();
  const int64_t chunk = images_per_chunk(g);
  for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
    ConvGeometry part = g;
    part.n = std::min(chunk, g.n - n0);
    auto gy = gather_rows(grad_y.narrow(0, n0, part.n), out_idx, y_compact);  // (k_out, n*L)
    if (need_w) {
      auto cols_t = columns(x.narrow(0, n0, part.n), in_idx, x_compact, part).t();
      if (block.scalar_type() == x.scalar_type()) {
        block.addmm_(gy, cols_t);
      } else {
        block.add_(at::mm(gy, cols_t));
      }
    }
    if (need_x) {
      auto cols = at::mm(w_block_t, gy);  // (k_in*taps, n*L)
      auto grad_x_part = grad_x.narrow(0, n0, part.n);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dcp_unpack_columns", [&] {
        unpack_columns<scalar_t>(cols.const_data_ptr<scalar_t>(), in_idx.const_data_ptr<int64_t>(), k_in,
                                 x_compact, x.size(1), part, grad_x_part.mutable_data_ptr<scalar_t>());
      });
    }
  }
  if (need_w) {
    auto rows = (out_idx.unsqueeze(1) * g.c_in + in_idx.unsqueeze(0)).flatten();
    grad_w.view({g.c_out * g.c_in, -1}).index_copy_(0, rows, block.to(x.scalar_type()).reshape({k_out * k_in, -1}));
  }
  return {grad_x, grad_w, grad_b};
}

at::Tensor channel_utility_cpu(const at::Tensor& a_in, const at::Tensor& g_in) {
  TORCH_CHECK(a_in.dim() == 4 && a_in.sizes() == g_in.sizes(), "a and g must be 4-D tensors of one shape, got ",
              a_in.sizes(), " and ", g_in.sizes());
  TORCH_CHECK(a_in.device() == g_in.device(), "a is on ", a_in.device(), " but g is on ", g_in.device());
  TORCH_CHECK(a_in.scalar_type() == g_in.scalar_type(), "a and g must share a dtype, got ", a_in.scalar_type(),
              " and ", g_in.scalar_type());
  const auto a = a_in.contiguous(), g = g_in.contiguous();
  const int64_t batch = a.size(0), channels = a.size(1), plane = a.size(2) * a.size(3);
  auto v = at::zeros({channels}, a.options().dtype(at::kFloat));
  if (a.numel() == 0) return v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "dcp_channel_utility", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    float* out = v.mutable_data_ptr<float>();
    // One channel per task, samples in order: the same result for any thread count.
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double total = 0;
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t offset = (b * channels + c) * plane;
          double sample = 0;
          for (int64_t p = 0; p < plane; ++p) sample += double(pa[offset + p]) * double(pg[offset + p]);
          total += std::abs(sample);
        }
        out[c] = float(total / double(batch * plane));
      }
    });
  });
  return v;
}

}  // namespace
}  // namespace dcp

TORCH_LIBRARY_IMPL(dcp, CPU, m) {
  m.impl("gathered_conv2d", &dcp::gathered_conv2d_cpu);
  m.impl("gathered_conv2d_backward", &dcp::gathered_conv2d_backward_cpu);
  m.impl("channel_utility", &dcp::channel_utility_cpu);
}

#ifndef DCP_WITH_CUDA
// A CPU-only build still answers CUDA tensors with a clear message instead of a dispatcher error.
namespace dcp {
namespace {
[[noreturn]] void no_cuda() {
  TORCH_CHECK(false, "dcp_kernels._C was built without CUDA (nvcc was not found at build time): its ops take CPU "
                     "tensors only. Rebuild with CUDA_HOME set (docs/building.md) or use backend='torch'/'triton'.");
}
at::Tensor conv_no_cuda(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
                        const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool, bool) {
  no_cuda();
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_no_cuda(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                                at::IntArrayRef, bool, bool, bool,
                                                                std::array<bool, 3>) {
  no_cuda();
}
at::Tensor utility_no_cuda(const at::Tensor&, const at::Tensor&) { no_cuda(); }
at::Tensor implicit_gemm_no_cuda(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                 const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                 at::IntArrayRef, bool, bool, bool, int64_t, int64_t) {
  no_cuda();
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> implicit_gemm_backward_no_cuda(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, bool, bool, bool, std::array<bool, 3>, int64_t, int64_t) {
  no_cuda();
}
}  // namespace
}  // namespace dcp

TORCH_LIBRARY_IMPL(dcp, CUDA, m) {
  m.impl("gathered_conv2d", &dcp::conv_no_cuda);
  m.impl("gathered_conv2d_backward", &dcp::backward_no_cuda);
  m.impl("channel_utility", &dcp::utility_no_cuda);
  m.impl("implicit_gemm_conv2d", &dcp::implicit_gemm_no_cuda);
  m.impl("implicit_gemm_conv2d_backward", &dcp::implicit_gemm_backward_no_cuda);
}
#endif
