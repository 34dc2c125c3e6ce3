// Argument checks shared by the CPU and CUDA kernels: every failure names the argument at fault.
#pragma once
#include <ATen/ATen.h>

namespace dcp {

struct ConvGeometry {
  int64_t n, c_in, c_out, h, w, kh, kw, oh, ow;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

inline void check_pair(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, name, " must hold 2 values (height, width), got ", v.size());
}

// `range_on_host`: check the index range on the host for CPU tensors (false for the CUDA kernels'
// CPU emulation, which checks them on the "device" as the kernels do on a GPU).
inline void check_index(const at::Tensor& idx, const char* name, int64_t size, const at::Tensor& x,
                        bool range_on_host = true) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1, name,
              " must be a 1-D int64 tensor, got ", idx.scalar_type(), " with ", idx.dim(), " dims");
  TORCH_CHECK(idx.device() == x.device(), name, " is on ", idx.device(), " but x is on ", x.device());
  TORCH_CHECK(idx.numel() > 0, name, " is empty: at least one channel must be selected");
  TORCH_CHECK(idx.is_contiguous(), name, " must be contiguous");
  // The range check reads the indices on the host. On the CPU that costs nothing; on a GPU it
  // would stall every call until the device catches up (a sync per index tensor per call), so
  // there the kernels check each index as they read it (a device-side assert, as ATen's own index
  // ops do), and the Python API checks the range with a clear message when validate=True
  // (dcp_kernels.ops.gathered_conv2d; the library's layers pass indices it built, unchecked).
  if (range_on_host && idx.device().is_cpu()) {
    auto range = at::aminmax(idx);
    const int64_t lo = std::get<0>(range).item<int64_t>(), hi = std::get<1>(range).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < size, name, " holds indices outside [0, ", size, "): min ", lo, ", max ", hi);
  }
}

inline void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be a contiguous NCHW tensor (got strides ", t.strides(),
              "); call .contiguous() first");
}

// Validates the forward/backward arguments and returns the geometry of the convolution.
// `any_x_layout`: x may have any strides (NCHW, channels-last), else it must be contiguous NCHW.
// `index_range_on_host`: see check_index.
inline ConvGeometry check_conv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& in_idx, const at::Tensor& out_idx, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef dilation, bool depthwise, bool x_compact,
                               bool any_x_layout = false, bool index_range_on_host = true) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-D (C_out, C_in/groups, kh, kw), got ", weight.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ", x.device());
  if (!any_x_layout) check_dense(x, "x");  // the fused kernels read x through its strides
  check_dense(weight, "weight");
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  check_pair(dilation, "dilation");
  ConvGeometry g{};
  g.n = x.size(0);
  g.c_out = weight.size(0);
  g.c_in = depthwise ? g.c_out : weight.size(1);
  g.h = x.size(2);
  g.w = x.size(3);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.stride_h = stride[0], g.stride_w = stride[1], g.pad_h = padding[0], g.pad_w = padding[1];
  g.dil_h = dilation[0], g.dil_w = dilation[1];
  TORCH_CHECK(g.stride_h > 0 && g.stride_w > 0 && g.dil_h > 0 && g.dil_w > 0 && g.pad_h >= 0 && g.pad_w >= 0,
              "stride and dilation must be positive and padding non-negative");
  g.oh = (g.h + 2 * g.pad_h - g.dil_h * (g.kh - 1) - 1) / g.stride_h + 1;
  g.ow = (g.w + 2 * g.pad_w - g.dil_w * (g.kw - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(g.oh > 0 && g.ow > 0, "the kernel does not fit the padded input");
  if (depthwise) {
    TORCH_CHECK(!x_compact, "x_compact is only supported for groups=1");
    TORCH_CHECK(weight.size(1) == 1 && x.size(1) == g.c_out, "depthwise needs weight (C, 1, kh, kw) and x with C=",
                g.c_out, " channels, got weight ", weight.sizes(), " and x ", x.sizes());
  } else {
    const int64_t expected = x_compact ? in_idx.numel() : g.c_in;
    TORCH_CHECK(x.size(1) == expected, "x has ", x.size(1), " channels but ", expected, " are expected",
                x_compact ? " (x_compact: len(in_idx))" : " (weight.size(1))");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.c_out && bias->scalar_type() == x.scalar_type() &&
                    bias->device() == x.device(),
                "bias must be a (", g.c_out, ",) tensor of ", x.scalar_type(), " on ", x.device());
  }
  check_index(in_idx, "in_idx", g.c_in, x, index_range_on_host);
  check_index(out_idx, "out_idx", g.c_out, x, index_range_on_host);
  return g;
}

}  // namespace dcp
