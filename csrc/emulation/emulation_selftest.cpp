// `dcp::_emulation_selftest(case)`: small kernels with the bugs the CPU emulation of CUDA claims to
// catch (cuda_emulation.h), and their correct twins, so the tests can show each check firing.
// Returns what the kernel wrote (an empty tensor for kernels that write nothing); a caught bug is a
// RuntimeError naming it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda_emulation.h"

namespace dcp {
namespace emu {
namespace {

constexpr int kThreads = 64;

// Each thread writes its shared slot, then reads its neighbour's at `offset`: right only with the
// barrier between (without it, one of the two thread orders reads a slot not written yet).
void neighbour_kernel(int* out, int offset, bool synced) {
  static int slots[kThreads];
  const int t = int(threadIdx.x);
  slots[t] = int(blockIdx.x) * 1000 + t;
  if (synced) barrier(__LINE__);
  out[blockIdx.x * kThreads + t] = slots[(t + offset + kThreads) % kThreads];
}

// The first warp waits at one barrier, the rest at another.
void divergent_barrier_kernel() {
  if (threadIdx.x < 32) {
    barrier(__LINE__);
  } else {
    barrier(__LINE__);
  }
}

// Thread 0 returns while the others wait.
void return_before_barrier_kernel() {
  if (threadIdx.x == 0) return;
  barrier(__LINE__);
}

void wmma_load_kernel(int offset, unsigned ldm) {
  static __attribute__((aligned(32))) float tile[16 * 32];
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  wmma::load_matrix_sync(a, tile + offset, ldm);
}

// Each thread reads its element of `in` at `offset`; past the end of the buffer for the last threads
// when offset > 0 (only an AddressSanitizer build, DCP_SANITIZE=address, catches that).
void read_kernel(const float* in, float* out, int offset) {
  const int t = int(threadIdx.x);
  out[t] = in[t + offset];
}

void assert_kernel() {
  if (threadIdx.x == 5) kernel_assert_failed("thread 5 asserts", __FILE__, __LINE__);
  barrier(__LINE__);
}

at::Tensor selftest(const std::string& name) {
  const dim3 two_blocks(2), one_block(1), threads(kThreads);
  if (name.rfind("race_", 0) == 0 || name.rfind("synced_", 0) == 0) {
    const bool synced = name.rfind("synced_", 0) == 0;
    const bool next = name.size() >= 4 && name.compare(name.size() - 4, 4, "next") == 0;
    auto out = at::full({2, kThreads}, -1, at::kInt);
    launch(name.c_str(), &neighbour_kernel, two_blocks, threads, out.mutable_data_ptr<int>(), next ? 1 : -1, synced);
    return out;
  }
  if (name == "sanitized") {  // whether this is an AddressSanitizer build: 1 or 0
#if defined(__SANITIZE_ADDRESS__)
    return at::ones({1}, at::kInt);
#else
    return at::zeros({1}, at::kInt);
#endif
  }
  if (name == "read_in_bounds" || name == "read_out_of_bounds") {
#if !defined(__SANITIZE_ADDRESS__)
    // Past the end is undefined behaviour that only an ASan build turns into a report.
    TORCH_CHECK(name == "read_in_bounds", "emulation self-test '", name,
                "' needs an AddressSanitizer build (csrc/sanitize.sh)");
#endif
    auto in = at::arange(kThreads, at::kFloat), out = at::empty({kThreads}, at::kFloat);
    launch(name.c_str(), &read_kernel, one_block, threads, in.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
           name == "read_in_bounds" ? 0 : 4);
    return out;
  }
  if (name == "divergent_barriers") launch(name.c_str(), &divergent_barrier_kernel, one_block, threads);
  else if (name == "return_before_barrier") launch(name.c_str(), &return_before_barrier_kernel, one_block, threads);
  else if (name == "wmma_aligned") launch(name.c_str(), &wmma_load_kernel, one_block, dim3(32), 8, 16u);
  else if (name == "wmma_misaligned") launch(name.c_str(), &wmma_load_kernel, one_block, dim3(32), 2, 16u);
  else if (name == "wmma_bad_ldm") launch(name.c_str(), &wmma_load_kernel, one_block, dim3(32), 8, 18u);
  else if (name == "assert") launch(name.c_str(), &assert_kernel, one_block, threads);
  else TORCH_CHECK(false, "unknown emulation self-test case '", name, "'");
  return at::empty({0});
}

}  // namespace
}  // namespace emu
}  // namespace dcp

TORCH_LIBRARY_FRAGMENT(dcp, m) {
  m.def("_emulation_selftest(str case) -> Tensor", &dcp::emu::selftest);
}
