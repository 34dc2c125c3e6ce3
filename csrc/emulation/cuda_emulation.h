// A CPU emulation of the CUDA execution model, for running our kernels' own source on a machine
// without a GPU (csrc/fused_conv_kernels.cuh compiled by the host compiler with DCP_EMULATE_CUDA).
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; `__syncthreads()` switches
// back to a scheduler, which resumes the threads once all of them wait at the barrier. Blocks run
// one after another, so `__shared__` arrays can be function-local statics. What it checks besides the
// results:
//   * barriers: every thread of a block waits at the same `__syncthreads()` or none does (a thread
//     that returns while others wait, or threads at different barriers, fails the launch, naming the
//     threads and source lines: on a GPU, a hang or undefined behaviour);
//   * races on shared memory: between barriers the threads run one at a time, in thread order or in
//     reverse, alternating by phase and by block, so a read of shared memory that a missing barrier
//     leaves unordered after another thread's write sees the wrong value in one of the two orders
//     (given a grid of two blocks or more): the results are wrong;
//   * device-side asserts (`DCP_KERNEL_ASSERT`) fail the launch, as on a GPU;
//   * WMMA: fragments are emulated (each thread holds the whole tile: the real distribution over a
//     warp is opaque to kernels that use the API), with the API's preconditions checked (256-bit
//     aligned pointers, `ldm` a multiple of 16 bytes: a launch failure). The emulated TF32 mma
//     truncates its operands to 19 bits (what the hardware does with the low bits of an operand not
//     converted to TF32 is unspecified), so a missing rounding shows in the results;
//   * out-of-bounds accesses, in an AddressSanitizer build only (csrc/sanitize.sh, run by CI): reads
//     and writes past a tensor (activations, weights, index vectors, workspaces) or past a
//     `__shared__` array fail with ASan's report, as compute-sanitizer's memcheck would on a GPU
//     (the scheduler tells ASan about every fiber switch).
// What it cannot check: timing, memory coalescing, bank conflicts, register pressure, warp-level
// scheduling other than the two orders above, whether a warp's threads call a WMMA function with the
// same arguments, reads of shared memory the block never wrote (the statics keep the previous block's
// values, not garbage), accesses that stay inside a tensor's storage but outside the tensor (a view),
// and anything nvcc compiles differently from the host compiler. It is slow (one fiber switch per
// thread per barrier): for tests at small sizes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

#include "../implicit_gemm.h"

namespace dcp {
namespace emu {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's coordinates (set by the scheduler before it resumes a thread).
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

// `__syncthreads()` at source line `line`.
void barrier(int line);
// A failed device-side assert: ends the calling thread; the launch then fails with `what`.
[[noreturn]] void kernel_assert_failed(const char* what, const char* file, int line);
// Runs `thread_body` as every thread of every block of the grid; throws c10::Error on a failed
// assert, a barrier mismatch or a violated precondition.
void launch_grid(const char* kernel, dim3 grid, dim3 block, const std::function<void()>& thread_body);

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) {
  launch_grid(name, grid, block, [&] { kernel(args...); });
}

// The subset of nvcuda::wmma the kernels use.
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
enum layout_t { mem_row_major };
namespace precision {
struct tf32 {};
}  // namespace precision

template <typename Use, int M, int N, int K>
struct FragmentShape;
template <int M, int N, int K>
struct FragmentShape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct FragmentShape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct FragmentShape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// The element type a fragment holds (TF32 fragments hold floats, as on the device).
template <typename T>
struct FragmentElement {
  using type = T;
};
template <>
struct FragmentElement<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using Shape = FragmentShape<Use, M, N, K>;
  using element_type = typename FragmentElement<T>::type;
  static constexpr int rows = Shape::rows, cols = Shape::cols, num_elements = rows * cols;
  element_type x[num_elements];
};

// Preconditions of load/store_matrix_sync: a 256-bit aligned pointer, ldm a multiple of 16 bytes.
void check_matrix_pointer(const void* ptr, unsigned ldm, std::size_t element_bytes, const char* op);

template <typename Use, int M, int N, int K, typename T, typename Layout, typename Src>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const Src* ptr, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(std::is_same_v<Layout, row_major>, "the emulation has row-major operand fragments only");
  static_assert(std::is_same_v<Src, typename F::element_type>, "load_matrix_sync reads the fragment's element type");
  check_matrix_pointer(ptr, ldm, sizeof(Src), "load_matrix_sync");
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = ptr[std::size_t(r) * ldm + c];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t) {
  check_matrix_pointer(ptr, ldm, sizeof(float), "store_matrix_sync");
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) ptr[std::size_t(r) * ldm + c] = f.x[r * N + c];
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, typename fragment<Use, M, N, K, T, Layout>::element_type v) {
  for (auto& e : f.x) e = v;
}

// What a tensor core reads of an operand: TF32 keeps the top 19 bits (no rounding), 16-bit types all.
template <typename T, typename E>
float mma_operand(E v) {
  if constexpr (std::is_same_v<T, precision::tf32>) {
    uint32_t bits;
    float f = v;
    std::memcpy(&bits, &f, sizeof(bits));
    bits &= 0xffffe000u;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return static_cast<float>(v);
  }
}

// d = a b + c, products exact and sums in float (the hardware's order of the K sums is unspecified).
template <int M, int N, int K, typename T>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, row_major>& a,
              const fragment<matrix_b, M, N, K, T, row_major>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = c.x[m * N + n];
      for (int k = 0; k < K; ++k) {
        acc += mma_operand<T>(a.x[m * K + k]) * mma_operand<T>(b.x[k * N + n]);
      }
      out[m * N + n] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof(out));
}

// cvt.rna.tf32.f32: to nearest, ties away from zero.
inline float __float_to_tf32(float v) { return igemm::round_to_tf32(v); }
}  // namespace wmma

}  // namespace emu
}  // namespace dcp
