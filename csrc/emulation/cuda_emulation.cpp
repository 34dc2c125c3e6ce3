// The fiber scheduler of the CPU emulation of the CUDA execution model (see cuda_emulation.h).
#include "cuda_emulation.h"

#include <c10/util/Exception.h>
#include <ucontext.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

namespace dcp {
namespace emu {
namespace {

// AddressSanitizer builds (DCP_SANITIZE=address, csrc/README.md) tell it about every stack switch,
// so that it checks the fibers' stacks as stacks; elsewhere these are no-ops.
#if defined(__SANITIZE_ADDRESS__)
void start_switch(void** fake_stack, const void* bottom, std::size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
void finish_switch(void* fake_stack, const void** bottom, std::size_t* size) {
  __sanitizer_finish_switch_fiber(fake_stack, bottom, size);
}
#else
void start_switch(void**, const void*, std::size_t) {}
void finish_switch(void*, const void**, std::size_t*) {}
#endif

// Kernel frames are small (the largest, a tensor-core kernel's fragments, about 10 KB); the stacks
// are allocated untouched, so only the pages a thread uses are ever committed.
constexpr std::size_t kStackBytes = 256 * 1024;

struct KernelAssert {
  std::string what;
};

struct Thread {
  enum class State { kReady, kAtBarrier, kDone };
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  uint3 index;
  State state = State::kReady;
  int barrier_line = 0;
  void* fake_stack = nullptr;  // AddressSanitizer's, while the thread is switched out
};

// The block being run on this OS thread.
struct Block {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  Thread* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;  // the first failure of the block
  // The scheduler's stack (the OS thread's), for AddressSanitizer's switches back to it.
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack = nullptr;
  std::size_t scheduler_stack_size = 0;
};

thread_local Block* running = nullptr;

void thread_entry() {
  Block& block = *running;
  Thread& self = *block.current;
  finish_switch(nullptr, &block.scheduler_stack, &block.scheduler_stack_size);
  try {
    (*block.body)();
  } catch (const KernelAssert& failure) {
    if (block.error.empty()) block.error = failure.what;
  } catch (const std::exception& failure) {
    if (block.error.empty()) block.error = failure.what();
  } catch (...) {  // nothing may unwind past the fiber's first frame
    if (block.error.empty()) block.error = "an exception of unknown type";
  }
  self.state = Thread::State::kDone;
  start_switch(nullptr, block.scheduler_stack, block.scheduler_stack_size);  // nullptr: this stack ends
  swapcontext(&self.context, &block.scheduler);  // a finished thread is never resumed
}

std::string thread_name(const uint3& t) {
  return "thread (" + std::to_string(t.x) + ", " + std::to_string(t.y) + ", " + std::to_string(t.z) + ")";
}

// Runs one block to completion; returns an error message or "". Between barriers the threads run in
// thread order or in reverse, alternating by phase and by block, so that each phase of a kernel runs in
// both orders once the grid has two blocks.
std::string run_block(Block& block, std::size_t block_number) {
  for (std::size_t phase = 0;; ++phase) {
    const bool reverse = (phase + block_number) % 2 == 1;
    const std::size_t count = block.threads.size();
    for (std::size_t i = 0; i < count; ++i) {
      Thread& t = block.threads[reverse ? count - 1 - i : i];
      if (t.state != Thread::State::kReady) continue;
      threadIdx = t.index;
      block.current = &t;
      start_switch(&block.scheduler_fake_stack, t.stack.get(), kStackBytes);
      swapcontext(&block.scheduler, &t.context);
      finish_switch(block.scheduler_fake_stack, nullptr, nullptr);
      if (!block.error.empty()) return block.error;
    }
    const Thread* waiting = nullptr;
    const Thread* done = nullptr;
    for (const Thread& t : block.threads) {
      if (t.state == Thread::State::kAtBarrier) {
        if (waiting != nullptr && waiting->barrier_line != t.barrier_line) {
          return thread_name(waiting->index) + " waits at the __syncthreads() of line " +
                 std::to_string(waiting->barrier_line) + ", " + thread_name(t.index) + " at line " +
                 std::to_string(t.barrier_line);
        }
        waiting = &t;
      } else {
        done = &t;
      }
    }
    if (waiting == nullptr) return "";
    if (done != nullptr) {
      return thread_name(done->index) + " returned while " + thread_name(waiting->index) +
             " waits at the __syncthreads() of line " + std::to_string(waiting->barrier_line);
    }
    for (Thread& t : block.threads) t.state = Thread::State::kReady;
  }
}

// Makes `t` start the kernel afresh (a function of its own: getcontext returns twice).
void start_thread(Thread& t) {
  t.state = Thread::State::kReady;
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = t.stack.get();
  t.context.uc_stack.ss_size = kStackBytes;
  t.context.uc_link = nullptr;
  makecontext(&t.context, thread_entry, 0);
}

std::mutex launch_mutex;  // `__shared__` arrays are statics: one emulated launch at a time

}  // namespace

void barrier(int line) {
  Thread& self = *running->current;
  self.state = Thread::State::kAtBarrier;
  self.barrier_line = line;
  start_switch(&self.fake_stack, running->scheduler_stack, running->scheduler_stack_size);
  swapcontext(&self.context, &running->scheduler);
  finish_switch(self.fake_stack, nullptr, nullptr);
}

namespace {
[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw KernelAssert{where + " in " + thread_name(threadIdx) + " of block (" + std::to_string(blockIdx.x) + ", " +
                     std::to_string(blockIdx.y) + ", " + std::to_string(blockIdx.z) + "): " + what};
}
}  // namespace

void kernel_assert_failed(const char* what, const char* file, int line) {
  fail(std::string("device-side assert at ") + file + ":" + std::to_string(line), what);
}

void wmma::check_matrix_pointer(const void* ptr, unsigned ldm, std::size_t element_bytes, const char* op) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % 32 != 0) fail(op, "the pointer is not 256-bit aligned");
  if ((ldm * element_bytes) % 16 != 0) fail(op, "ldm = " + std::to_string(ldm) + " is not a multiple of 16 bytes");
}

void launch_grid(const char* kernel, dim3 grid, dim3 block_dim, const std::function<void()>& thread_body) {
  const std::lock_guard<std::mutex> lock(launch_mutex);
  TORCH_CHECK(running == nullptr, "emulated kernel ", kernel, " launched from inside an emulated kernel");
  const std::size_t count = std::size_t(block_dim.x) * block_dim.y * block_dim.z;
  TORCH_CHECK(count > 0 && count <= 1024, "emulated kernel ", kernel, ": ", count, " threads per block");
  Block block;
  block.body = &thread_body;
  block.threads.resize(count);
  for (Thread& t : block.threads) t.stack.reset(new char[kStackBytes]);
  blockDim = block_dim;
  gridDim = grid;
  running = &block;
  std::string error;
  std::size_t block_number = 0;
  for (unsigned bz = 0; bz < grid.z && error.empty(); ++bz) {
    for (unsigned by = 0; by < grid.y && error.empty(); ++by) {
      for (unsigned bx = 0; bx < grid.x && error.empty(); ++bx) {
        blockIdx = uint3{bx, by, bz};
        for (std::size_t i = 0; i < count; ++i) {
          Thread& t = block.threads[i];
          t.index = uint3{unsigned(i % block_dim.x), unsigned(i / block_dim.x % block_dim.y),
                          unsigned(i / (std::size_t(block_dim.x) * block_dim.y))};
          start_thread(t);
        }
        error = run_block(block, block_number++);
      }
    }
  }
  running = nullptr;
  TORCH_CHECK(error.empty(), "emulated CUDA kernel ", kernel, " failed: ", error);
}

}  // namespace emu
}  // namespace dcp
