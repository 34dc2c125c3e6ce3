// Index arithmetic of the fused gather implicit-GEMM convolution, shared by the CUDA kernels
// (csrc/fused_conv_kernels.cuh), on a GPU and in their CPU emulation.
//
// Every pass of a convolution restricted to the selected block (out_idx x in_idx) is one GEMM
// C[M, N] = sum_K A[M, K] B[K, N] whose operands are never materialised: A(m, k) and B(k, n) are
// offsets into the full (or compact) activations and the full weight, computed here from the
// channel index tensors, or -1 where the element is a zero of the padding. Nothing here depends on
// CUDA or ATen, so the CPU tests run the very functions the kernels run (`DCP_HD` is
// `__host__ __device__` under nvcc).
//
//   pass         M (rows)           N (cols)         K (depth)          A            B        C
//   forward      N*OH*OW pixels     k_out            k_in*kh*kw         x            weight   y
//   grad-input   N*H*W pixels       k_in             k_out*kh*kw        grad_y       weight   grad_x
//   grad-weight  k_out              k_in*kh*kw       N*OH*OW            grad_y       x        grad_weight
//
// Grad-weight reduces over the whole batch, so it is split along K ("split-K") into `splits`
// ranges of whole K tiles; each range's partial sums go to a float workspace and one more pass adds
// them in split order: deterministic, no float atomics.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define DCP_HD __host__ __device__ __forceinline__
#else
#define DCP_HD inline
#endif

namespace dcp {
namespace igemm {

// The convolution's sizes: full widths (c_in, c_out, of the weight) and selected counts.
struct Geometry {
  int64_t n, h, w, oh, ow, kh, kw;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t c_in, c_out, k_in, k_out;

  DCP_HD int64_t taps() const { return kh * kw; }
};

// Element strides of a 4-D (N, C, H, W) tensor in any memory layout (NCHW or channels-last).
struct Strides {
  int64_t n, c, h, w;

  DCP_HD int64_t at(int64_t b, int64_t c_, int64_t y, int64_t x) const { return b * n + c_ * c + y * h + x * w; }
};

// Which channels are read and written, and where they live. in_idx/out_idx: sorted, unique.
struct Selection {
  const int64_t* in_idx;
  const int64_t* out_idx;
  bool x_compact;  // x (and grad_x) hold exactly the k_in selected channels, in order
  bool y_compact;  // y (and grad_y) hold exactly the k_out selected channels, in order

  DCP_HD int64_t x_channel(int64_t i) const { return x_compact ? i : in_idx[i]; }
  DCP_HD int64_t y_channel(int64_t j) const { return y_compact ? j : out_idx[j]; }
  // weight[out_idx[j], in_idx[i], tap] of a contiguous (c_out, c_in, kh, kw) weight.
  DCP_HD int64_t weight(const Geometry& g, int64_t j, int64_t i, int64_t tap) const {
    return (out_idx[j] * g.c_in + in_idx[i]) * g.taps() + tap;
  }
};

// A pixel of a (N, ., rows, cols) plane, from its flat index.
struct Pixel {
  int64_t b, y, x;
};

DCP_HD Pixel unflatten(int64_t m, int64_t rows, int64_t cols) {
  const int64_t plane = rows * cols, r = m % plane;
  return {m / plane, r / cols, r % cols};
}

// Input row/column read by output row/column `o` at kernel offset `k` (may fall in the padding).
DCP_HD int64_t input_coord(int64_t o, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return o * stride - pad + k * dil;
}

// The output row/column that reads input row/column `i` at kernel offset `k`, or -1 when none does
// (off the stride grid or outside the output).
DCP_HD int64_t output_coord(int64_t i, int64_t k, int64_t stride, int64_t pad, int64_t dil, int64_t size) {
  const int64_t t = i + pad - k * dil;
  if (t < 0) return -1;
  if (stride == 1) return t < size ? t : -1;  // no division in the common case
  if (t % stride != 0) return -1;
  const int64_t o = t / stride;
  return o < size ? o : -1;
}

// Each problem splits its operand offsets into a part per GEMM row (Row), per K index (Depth) and per
// GEMM column (Col): a kernel block decomposes its 64 rows and 64 columns once, and each K tile's
// indices once, into shared memory, so loading an element is a few adds and a bounds check, not the
// divisions of a flat index. `ok` is false for indices past the matrix (the element is a zero): a
// value-initialised `Row{}` is such a one (the structs are trivial, so they can live in __shared__).
//   a(row, depth): offset of A(m, k), or -1 for a zero (padding, past the matrix)
//   b(depth, col): offset of B(k, n), or -1
//   c(m, n):       offset of C(m, n) (the epilogue; once per output element)

// y[:, out_idx] = conv(x[:, in_idx], weight[out_idx][:, in_idx]) (+ bias[out_idx]).
struct ForwardProblem {
  Geometry g;
  Selection s;
  Strides x, y;
  static constexpr bool kHasBias = true;

  struct Row {  // output pixel (b, oy, ox)
    int64_t base, iy0, ix0;
    bool ok;
  };
  struct Depth {  // (input channel i, tap)
    int64_t channel, dy, dx, weight;
    bool ok;
  };
  struct Col {  // output channel j
    int64_t weight;
    bool ok;
  };

  DCP_HD int64_t rows() const { return g.n * g.oh * g.ow; }
  DCP_HD int64_t cols() const { return g.k_out; }
  DCP_HD int64_t depth() const { return g.k_in * g.taps(); }
  DCP_HD Row row(int64_t m) const {
    const Pixel p = unflatten(m, g.oh, g.ow);
    return {p.b * x.n, input_coord(p.y, 0, g.stride_h, g.pad_h, 1), input_coord(p.x, 0, g.stride_w, g.pad_w, 1), true};
  }
  DCP_HD Depth depth_at(int64_t k) const {
    const int64_t i = k / g.taps(), tap = k % g.taps();
    return {s.x_channel(i) * x.c, (tap / g.kw) * g.dil_h, (tap % g.kw) * g.dil_w, s.in_idx[i] * g.taps() + tap, true};
  }
  DCP_HD Col col(int64_t n) const { return {s.out_idx[n] * g.c_in * g.taps(), true}; }
  DCP_HD int64_t a(const Row& r, const Depth& d) const {  // x
    const int64_t iy = r.iy0 + d.dy, ix = r.ix0 + d.dx;
    if (!r.ok || !d.ok || iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
    return r.base + d.channel + iy * x.h + ix * x.w;
  }
  DCP_HD int64_t b(const Depth& d, const Col& c_) const { return d.ok && c_.ok ? c_.weight + d.weight : -1; }
  DCP_HD int64_t c(int64_t m, int64_t n) const {  // y
    const Pixel p = unflatten(m, g.oh, g.ow);
    return y.at(p.b, s.y_channel(n), p.y, p.x);
  }
  DCP_HD int64_t bias(int64_t n) const { return s.out_idx[n]; }
};

// grad_x[:, in_idx] = conv_transpose(grad_y[:, out_idx], weight[out_idx][:, in_idx]).
struct GradInputProblem {
  Geometry g;
  Selection s;
  Strides gy, gx;
  static constexpr bool kHasBias = false;

  struct Row {  // input pixel (b, iy, ix), shifted by the padding
    int64_t base, ty, tx;
    bool ok;
  };
  struct Depth {  // (output channel j, tap)
    int64_t channel, dy, dx, weight;
    bool ok;
  };
  struct Col {  // input channel i
    int64_t weight;
    bool ok;
  };

  DCP_HD int64_t rows() const { return g.n * g.h * g.w; }
  DCP_HD int64_t cols() const { return g.k_in; }
  DCP_HD int64_t depth() const { return g.k_out * g.taps(); }
  DCP_HD Row row(int64_t m) const {
    const Pixel p = unflatten(m, g.h, g.w);
    return {p.b * gy.n, p.y + g.pad_h, p.x + g.pad_w, true};
  }
  DCP_HD Depth depth_at(int64_t k) const {
    const int64_t j = k / g.taps(), tap = k % g.taps();
    return {s.y_channel(j) * gy.c, (tap / g.kw) * g.dil_h, (tap % g.kw) * g.dil_w,
            s.out_idx[j] * g.c_in * g.taps() + tap, true};
  }
  DCP_HD Col col(int64_t n) const { return {s.in_idx[n] * g.taps(), true}; }
  DCP_HD int64_t a(const Row& r, const Depth& d) const {  // grad_y at the output pixel reading this input pixel
    if (!r.ok || !d.ok) return -1;
    const int64_t oy = output_coord(r.ty - d.dy, 0, g.stride_h, 0, 1, g.oh);
    const int64_t ox = output_coord(r.tx - d.dx, 0, g.stride_w, 0, 1, g.ow);
    if (oy < 0 || ox < 0) return -1;
    return r.base + d.channel + oy * gy.h + ox * gy.w;
  }
  DCP_HD int64_t b(const Depth& d, const Col& c_) const { return d.ok && c_.ok ? d.weight + c_.weight : -1; }
  DCP_HD int64_t c(int64_t m, int64_t n) const {  // grad_x
    const Pixel p = unflatten(m, g.h, g.w);
    return gx.at(p.b, s.x_channel(n), p.y, p.x);
  }
  DCP_HD int64_t bias(int64_t) const { return 0; }
};

// grad_weight[out_idx][:, in_idx] = sum over the batch of grad_y[:, out_idx] x patches of x[:, in_idx].
struct GradWeightProblem {
  Geometry g;
  Selection s;
  Strides gy, x;
  static constexpr bool kHasBias = false;

  struct Row {  // output channel j
    int64_t channel;
    bool ok;
  };
  struct Depth {  // output pixel (b, oy, ox)
    int64_t grad_y, x_base, iy0, ix0;
    bool ok;
  };
  struct Col {  // (input channel i, tap)
    int64_t channel, dy, dx;
    bool ok;
  };

  DCP_HD int64_t rows() const { return g.k_out; }
  DCP_HD int64_t cols() const { return g.k_in * g.taps(); }
  DCP_HD int64_t depth() const { return g.n * g.oh * g.ow; }
  DCP_HD Row row(int64_t m) const { return {s.y_channel(m) * gy.c, true}; }
  DCP_HD Depth depth_at(int64_t k) const {
    const Pixel p = unflatten(k, g.oh, g.ow);
    return {p.b * gy.n + p.y * gy.h + p.x * gy.w, p.b * x.n, input_coord(p.y, 0, g.stride_h, g.pad_h, 1),
            input_coord(p.x, 0, g.stride_w, g.pad_w, 1), true};
  }
  DCP_HD Col col(int64_t n) const {
    const int64_t i = n / g.taps(), tap = n % g.taps();
    return {s.x_channel(i) * x.c, (tap / g.kw) * g.dil_h, (tap % g.kw) * g.dil_w, true};
  }
  DCP_HD int64_t a(const Row& r, const Depth& d) const { return r.ok && d.ok ? d.grad_y + r.channel : -1; }  // grad_y
  DCP_HD int64_t b(const Depth& d, const Col& c_) const {  // x
    const int64_t iy = d.iy0 + c_.dy, ix = d.ix0 + c_.dx;
    if (!d.ok || !c_.ok || iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
    return d.x_base + c_.channel + iy * x.h + ix * x.w;
  }
  DCP_HD int64_t c(int64_t m, int64_t n) const { return s.weight(g, m, n / g.taps(), n % g.taps()); }  // grad_w
  DCP_HD int64_t bias(int64_t) const { return 0; }
};

// The decomposed index, or the zero-element one past the end of the matrix.
template <typename Problem>
DCP_HD typename Problem::Row row_or_none(const Problem& p, int64_t m) {
  return m < p.rows() ? p.row(m) : typename Problem::Row{};
}
template <typename Problem>
DCP_HD typename Problem::Col col_or_none(const Problem& p, int64_t n) {
  return n < p.cols() ? p.col(n) : typename Problem::Col{};
}
template <typename Problem>
DCP_HD typename Problem::Depth depth_or_none(const Problem& p, int64_t k) {
  return k < p.depth() ? p.depth_at(k) : typename Problem::Depth{};
}

// Block tile shapes. Simt: 256 threads, each a 4 x 4 strided micro-tile, float/double FMAs.
// Mma: 4 warps in 2 x 2, each 32 x 32 as 2 x 2 tensor-core fragments, float accumulation: 16x16x16
// for fp16/bf16 inputs, 16x16x8 (two per K tile) for fp32 inputs as TF32.
struct SimtTile {
  static constexpr int kM = 64, kN = 64, kK = 8, kThreads = 256;
};
struct MmaTile {
  static constexpr int kM = 64, kN = 64, kK = 16, kThreads = 128;
};

// fp32 on the tensor-core tiles is TF32 (as cuDNN's convolutions, when PyTorch allows them TF32):
// each operand rounded to 10 mantissa bits, to nearest with ties away from zero (the rounding of
// cvt.rna.tf32.f32, which the kernels apply when they stage the tiles).
DCP_HD float round_to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits += 0x1000u;  // finite: half of the 13 dropped bits
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// The K range of split `s` of `splits`: whole K tiles, the first splits no longer than the last.
struct SplitK {
  int64_t depth, k_tiles, splits;

  DCP_HD int64_t begin(int64_t s, int tile_k) const { return (s * k_tiles / splits) * tile_k; }
  DCP_HD int64_t end(int64_t s, int tile_k) const {
    const int64_t e = ((s + 1) * k_tiles / splits) * tile_k;
    return e < depth ? e : depth;
  }
};

inline SplitK make_split(int64_t depth, int tile_k, int64_t splits) {
  const int64_t k_tiles = (depth + tile_k - 1) / tile_k;
  if (splits < 1) splits = 1;
  if (splits > k_tiles) splits = k_tiles > 0 ? k_tiles : 1;
  return {depth, k_tiles, splits};
}

// Grad-weight splits: enough blocks for about two waves over `multiprocessors`, each split at least
// 8 K tiles long (the partial sums cost a workspace write and read per split), at most 64.
inline int64_t choose_splits(int64_t output_tiles, int64_t k_tiles, int64_t multiprocessors) {
  int64_t splits = (2 * multiprocessors + output_tiles - 1) / (output_tiles > 0 ? output_tiles : 1);
  const int64_t longest = k_tiles / 8;
  if (splits > longest) splits = longest;
  if (splits > 64) splits = 64;
  return splits < 1 ? 1 : splits;
}

// The epilogue of output element (m, n) of split `split`: with one split, the value (+ bias) is
// converted and stored at C(m, n); with several, the partial sum goes to the float workspace
// (splits, M, N) and reduce_splits() finishes it.
template <typename Problem, typename scalar_t, typename acc_t>
DCP_HD void store(const Problem& p, int64_t m, int64_t n, acc_t v, const scalar_t* bias, scalar_t* c, acc_t* workspace,
                  int64_t split, int64_t splits) {
  if (splits > 1) {
    workspace[(split * p.rows() + m) * p.cols() + n] = v;
    return;
  }
  if (Problem::kHasBias && bias != nullptr) v += static_cast<acc_t>(bias[p.bias(n)]);
  c[p.c(m, n)] = static_cast<scalar_t>(v);
}

// Output element e = m * N + n of a split-K GEMM: its partial sums added in split order.
template <typename Problem, typename scalar_t, typename acc_t>
DCP_HD void reduce_splits(const Problem& p, int64_t e, const acc_t* workspace, int64_t splits, const scalar_t* bias,
                          scalar_t* c) {
  const int64_t size = p.rows() * p.cols(), m = e / p.cols(), n = e % p.cols();
  acc_t v = 0;
  for (int64_t s = 0; s < splits; ++s) v += workspace[s * size + e];
  if (Problem::kHasBias && bias != nullptr) v += static_cast<acc_t>(bias[p.bias(n)]);
  c[p.c(m, n)] = static_cast<scalar_t>(v);
}

// Whether sorted `idx[0:count]` holds `value` (binary search: no per-call lookup table).
DCP_HD bool contains_sorted(const int64_t* idx, int64_t count, int64_t value) {
  int64_t lo = 0, hi = count;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (idx[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < count && idx[lo] == value;
}

// Depthwise (groups == channels, weight (C, 1, kh, kw)): channel out_idx[j] is computed, and its
// input counts only when that channel is also selected on the input side (keep).
struct Depthwise {
  Geometry g;  // c_in == c_out == channels
  Selection s;
  Strides x, y;  // x/grad_x (full width) and y/grad_y

  DCP_HD bool keep(int64_t j) const { return contains_sorted(s.in_idx, g.k_in, s.out_idx[j]); }
  DCP_HD int64_t weight(int64_t j, int64_t tap) const { return s.out_idx[j] * g.taps() + tap; }
  // Output element e of (N, k_out, OH, OW) order -> (b, j, oy, ox).
  DCP_HD void output_element(int64_t e, int64_t& b, int64_t& j, int64_t& oy, int64_t& ox) const {
    ox = e % g.ow;
    oy = (e / g.ow) % g.oh;
    j = (e / (g.ow * g.oh)) % g.k_out;
    b = e / (g.ow * g.oh * g.k_out);
  }
  // Input element e of (N, k_out, H, W) order -> (b, j, iy, ix).
  DCP_HD void input_element(int64_t e, int64_t& b, int64_t& j, int64_t& iy, int64_t& ix) const {
    ix = e % g.w;
    iy = (e / g.w) % g.h;
    j = (e / (g.w * g.h)) % g.k_out;
    b = e / (g.w * g.h * g.k_out);
  }
  // x at the tap of output pixel (oy, ox) of computed channel j, or -1 in the padding.
  DCP_HD int64_t x_at_tap(int64_t b, int64_t j, int64_t oy, int64_t ox, int64_t tap) const {
    const int64_t iy = input_coord(oy, tap / g.kw, g.stride_h, g.pad_h, g.dil_h);
    const int64_t ix = input_coord(ox, tap % g.kw, g.stride_w, g.pad_w, g.dil_w);
    if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w) return -1;
    return x.at(b, s.out_idx[j], iy, ix);
  }
  // grad_y at the output pixel that reads input pixel (iy, ix) through `tap`, or -1 when none does.
  DCP_HD int64_t grad_y_at_tap(int64_t b, int64_t j, int64_t iy, int64_t ix, int64_t tap) const {
    const int64_t oy = output_coord(iy, tap / g.kw, g.stride_h, g.pad_h, g.dil_h, g.oh);
    const int64_t ox = output_coord(ix, tap % g.kw, g.stride_w, g.pad_w, g.dil_w, g.ow);
    if (oy < 0 || ox < 0) return -1;
    return y.at(b, s.y_channel(j), oy, ox);
  }

  // The per-element work of the depthwise kernels (one thread each).
  // Output element e (of N * k_out * OH * OW): y = keep * sum over taps of x * w (+ bias).
  template <typename acc_t, typename scalar_t>
  DCP_HD void forward_element(int64_t e, const scalar_t* xs, const scalar_t* w, const scalar_t* bias,
                              scalar_t* ys) const {
    int64_t b, j, oy, ox;
    output_element(e, b, j, oy, ox);
    acc_t v = 0;
    if (keep(j)) {
      for (int64_t tap = 0; tap < g.taps(); ++tap) {
        const int64_t off = x_at_tap(b, j, oy, ox, tap);
        if (off >= 0) v += static_cast<acc_t>(xs[off]) * static_cast<acc_t>(w[weight(j, tap)]);
      }
    }
    if (bias != nullptr) v += static_cast<acc_t>(bias[s.out_idx[j]]);
    ys[y.at(b, s.y_channel(j), oy, ox)] = static_cast<scalar_t>(v);
  }
  // Input element e (of N * k_out * H * W; `x` holds grad_x's strides): written only for a kept
  // channel (an unselected input channel keeps its zero gradient).
  template <typename acc_t, typename scalar_t>
  DCP_HD void grad_input_element(int64_t e, const scalar_t* gy, const scalar_t* w, scalar_t* gx) const {
    int64_t b, j, iy, ix;
    input_element(e, b, j, iy, ix);
    if (!keep(j)) return;
    acc_t v = 0;
    for (int64_t tap = 0; tap < g.taps(); ++tap) {
      const int64_t off = grad_y_at_tap(b, j, iy, ix, tap);
      if (off >= 0) v += static_cast<acc_t>(gy[off]) * static_cast<acc_t>(w[weight(j, tap)]);
    }
    gx[x.at(b, s.out_idx[j], iy, ix)] = static_cast<scalar_t>(v);
  }
  // Output pixel e's (of N * OH * OW) share of grad_weight[out_idx[j], 0, tap].
  template <typename acc_t, typename scalar_t>
  DCP_HD acc_t grad_weight_term(int64_t e, int64_t j, int64_t tap, const scalar_t* gy, const scalar_t* xs) const {
    const auto px = unflatten(e, g.oh, g.ow);
    const int64_t off = x_at_tap(px.b, j, px.y, px.x, tap);
    if (off < 0) return acc_t(0);
    return static_cast<acc_t>(gy[y.at(px.b, s.y_channel(j), px.y, px.x)]) * static_cast<acc_t>(xs[off]);
  }
};

// Output pixel e's (of N * OH * OW) share of grad_bias[out_idx[j]]: grad_y there.
template <typename acc_t, typename scalar_t>
DCP_HD acc_t grad_bias_term(const Geometry& g, const Selection& s, const Strides& gy_strides, int64_t e, int64_t j,
                            const scalar_t* gy) {
  const auto px = unflatten(e, g.oh, g.ow);
  return static_cast<acc_t>(gy[gy_strides.at(px.b, s.y_channel(j), px.y, px.x)]);
}

}  // namespace igemm
}  // namespace dcp
