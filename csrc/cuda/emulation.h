// The CUDA kernels of csrc/cuda/*.cu run on the host, for tests only: compiled as C++ with
// -DORCAL_CUDA_EMULATION (tests/cuda_emulation.py), cuda_utils.cuh includes this header instead of the CUDA
// ones. The kernel bodies are the ones nvcc compiles; only their execution model is emulated:
//  - a launch runs its blocks one at a time, the last block first (a kernel must not depend on block order);
//    each thread of a block is an OS thread, and __syncthreads is a std::barrier of the block's threads (a
//    thread that returns drops out of it);
//  - dynamic shared memory is a per-block buffer filled with 0xFF bytes (NaN doubles, all-ones counters), so
//    reading it before writing it shows. Static __shared__ arrays are function statics, shared by the block's
//    threads, zero at first and kept from block to block (g++ ignores section attributes on the statics of
//    templates, so they cannot be poisoned);
//  - atomics are relaxed std::atomic_ref operations, as on the device;
//  - a lane in a warp intrinsic waits until every lane of its warp is blocked (in an intrinsic, at
//    __syncthreads, or returned). __activemask() then gives the lanes waiting in it at the same call site, and
//    __match_any_sync / __reduce_add_sync / __shfl_down_sync serve the lanes named by their mask once all of them
//    wait at the same call site. Lanes that wait for each other forever, a mask naming a returned lane, or a shuffle
//    reading a lane outside its mask abort with a message;
//  - launch configurations beyond the device's limits raise, as cudaLaunchKernel would fail;
//  - host-side CUDA (device guard, stream, launch check, graph-capture query) is a no-op.
// What this cannot show (device numerics, real scheduling, races between blocks, speed): docs/gpu.md.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))  // as nvcc: a warp intrinsic's site is the caller's
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables, per OS thread.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace orcal {
namespace emu {

constexpr unsigned kWarpSize = 32;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute, which no launcher calls

[[noreturn]] inline void fail(const char* what, unsigned warp, unsigned lanes) {
  std::fprintf(stderr, "orcal CUDA emulation: %s (warp %u of block (%u, %u, %u), lanes 0x%08x)\n", what, warp,
               blockIdx.x, blockIdx.y, blockIdx.z, lanes);
  std::fflush(stderr);
  std::abort();
}

enum class Op { activemask, match_any, reduce_add, shfl_down };

struct Warp {
  std::mutex mu;
  std::atomic<unsigned> served[kWarpSize] = {};  // a lane sleeps on its flag until its group is served
  unsigned index = 0;
  unsigned live = 0;        // lanes that have not returned
  unsigned running = 0;     // live lanes neither in an intrinsic nor at __syncthreads
  unsigned waiting = 0;     // lanes in an intrinsic, not served yet
  unsigned at_barrier = 0;  // lanes at __syncthreads
  struct Call {
    const void* site;
    Op op;
    unsigned mask, value, delta, result;  // delta: __shfl_down_sync's lane offset
  } call[kWarpSize];

  // Serves every complete group of waiting lanes (under mu).
  void serve() {
    for (bool progress = true; progress && waiting != 0;) {
      progress = false;
      for (unsigned l = 0; l < kWarpSize; ++l) {
        if (!(waiting >> l & 1u)) continue;
        const Call c = call[l];
        unsigned group = 0;
        if (c.op == Op::activemask) {
          if (running != 0) continue;  // the warp is not quiescent yet
          for (unsigned j = 0; j < kWarpSize; ++j)
            if ((waiting >> j & 1u) && call[j].op == Op::activemask && call[j].site == c.site) group |= 1u << j;
        } else {
          if (!(c.mask >> l & 1u)) fail("a *_sync mask does not name the calling lane", index, c.mask);
          if ((c.mask & ~live) != 0) fail("a *_sync mask names a lane that has returned", index, c.mask);
          bool complete = true;
          for (unsigned j = 0; j < kWarpSize; ++j)
            if ((c.mask >> j & 1u) && !((waiting >> j & 1u) && call[j].op == c.op && call[j].site == c.site &&
                                        call[j].mask == c.mask))
              complete = false;
          if (!complete) continue;
          group = c.mask;
        }
        for (unsigned j = 0; j < kWarpSize; ++j) {
          if (!(group >> j & 1u)) continue;
          unsigned r = 0;
          if (c.op == Op::activemask) {
            r = group;
          } else if (c.op == Op::shfl_down) {
            // the value of lane j + delta, or the lane's own where that leaves the warp (as on the device)
            const unsigned src = j + call[j].delta;
            if (src >= kWarpSize) {
              r = call[j].value;
            } else {
              if (!(group >> src & 1u)) fail("__shfl_down_sync reads a lane outside its mask", index, group);
              r = call[src].value;
            }
          } else {
            for (unsigned i = 0; i < kWarpSize; ++i) {
              if (!(group >> i & 1u)) continue;
              if (c.op == Op::reduce_add) r += call[i].value;
              else if (call[i].value == call[j].value) r |= 1u << i;
            }
          }
          call[j].result = r;
        }
        waiting &= ~group;
        running |= group;
        progress = true;
        for (unsigned j = 0; j < kWarpSize; ++j)
          if (group >> j & 1u) {
            served[j].store(1, std::memory_order_release);
            served[j].notify_one();
          }
      }
    }
    if (waiting != 0 && running == 0) fail("lanes wait in a *_sync intrinsic for lanes that never reach it", index,
                                           waiting);
  }
};

// A barrier of `expected` threads; a thread that leaves for good drops out. Waiters sleep on a futex (an
// atomic's wait), woken all at once by the last arrival after it ran `on_release`.
class Barrier {
 public:
  explicit Barrier(unsigned expected) : expected_(expected) {}
  template <typename F>
  void arrive(bool drop, const F& on_release) {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned gen = generation_.load(std::memory_order_relaxed);
    if (drop) --expected_;
    else ++arrived_;
    if (arrived_ < expected_ || arrived_ == 0) {
      lock.unlock();
      if (!drop) generation_.wait(gen, std::memory_order_acquire);
      return;
    }
    on_release();
    arrived_ = 0;
    generation_.store(gen + 1, std::memory_order_release);
    generation_.notify_all();
  }
  void reset(unsigned expected) { expected_ = expected; arrived_ = 0; }

 private:
  std::mutex mu_;
  unsigned expected_, arrived_ = 0;
  std::atomic<unsigned> generation_{0};
};

struct Block {
  std::unique_ptr<Warp[]> warps;
  unsigned num_warps = 0;
  std::unique_ptr<Barrier> barrier;
  // __syncthreads is complete: the lanes that waited there run again.
  void release() {
    for (unsigned w = 0; w < num_warps; ++w) {
      std::lock_guard<std::mutex> lock(warps[w].mu);
      warps[w].running |= warps[w].at_barrier;
      warps[w].at_barrier = 0;
    }
  }
};

struct ThreadState {
  Block* block = nullptr;
  Warp* warp = nullptr;
  unsigned lane = 0;
  unsigned char* dynamic_shared = nullptr;
};
inline thread_local ThreadState self;

inline unsigned warp_op(Op op, const void* site, unsigned mask, unsigned value, unsigned delta = 0) {
  Warp& w = *self.warp;
  const unsigned bit = 1u << self.lane;
  {
    std::lock_guard<std::mutex> lock(w.mu);
    w.call[self.lane] = {site, op, mask, value, delta, 0};
    w.running &= ~bit;
    w.waiting |= bit;
    w.serve();
  }
  w.served[self.lane].wait(0, std::memory_order_acquire);
  w.served[self.lane].store(0, std::memory_order_relaxed);
  return w.call[self.lane].result;
}

inline void sync_block() {
  Warp& w = *self.warp;
  const unsigned bit = 1u << self.lane;
  {
    std::lock_guard<std::mutex> lock(w.mu);
    w.running &= ~bit;
    w.at_barrier |= bit;
    w.serve();
  }
  self.block->barrier->arrive(false, [] { self.block->release(); });
}

inline void thread_returns() {
  Warp& w = *self.warp;
  const unsigned bit = 1u << self.lane;
  {
    std::lock_guard<std::mutex> lock(w.mu);
    w.live &= ~bit;
    w.running &= ~bit;
    w.serve();
  }
  self.block->barrier->arrive(true, [] { self.block->release(); });
}

inline void* dynamic_shared() { return self.dynamic_shared; }

// ORCAL_CUDA_EMULATION_SPARSE_Y=n runs only the first and last n rows of blocks along y of a launch with more rows, so
// that a test can cross the 65535-row limit of a grid without running 65536 blocks of OS threads.
inline bool runs_row(unsigned y, unsigned rows) {
  const char* env = std::getenv("ORCAL_CUDA_EMULATION_SPARSE_Y");
  const long n = env == nullptr ? 0 : std::atol(env);
  return n <= 0 || rows <= 2 * static_cast<unsigned long>(n) || y < n || y >= rows - n;
}

inline void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& kernel) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  TORCH_CHECK(block.x >= 1 && block.y >= 1 && block.z >= 1 && block.z <= 64 && threads <= 1024,
              "CUDA emulation: invalid block (", block.x, ", ", block.y, ", ", block.z, ")");
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
                  grid.z <= 65535,
              "CUDA emulation: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z, ")");
  TORCH_CHECK(shared_bytes <= kMaxDynamicShared, "CUDA emulation: ", shared_bytes,
              " bytes of dynamic shared memory exceed the default limit of ", kMaxDynamicShared);
  static std::mutex one_launch;  // static __shared__ arrays are process-wide
  std::lock_guard<std::mutex> launch_lock(one_launch);
  const unsigned n = static_cast<unsigned>(threads);
  Block blk;
  blk.num_warps = (n + kWarpSize - 1) / kWarpSize;
  blk.warps.reset(new Warp[blk.num_warps]);
  std::vector<unsigned char> shared(shared_bytes > 0 ? shared_bytes : 1);
  std::vector<uint3> order;
  for (unsigned z = grid.z; z-- > 0;)
    for (unsigned y = grid.y; y-- > 0;)
      if (runs_row(y, grid.y))
        for (unsigned x = grid.x; x-- > 0;) order.push_back({x, y, z});
  Barrier gate(n + 1);  // the workers and this thread, around each block
  blk.barrier = std::make_unique<Barrier>(n);
  auto pass = [&] { gate.arrive(false, [] {}); };
  uint3 current{0, 0, 0};
  bool stop = false;
  std::vector<std::thread> workers;
  workers.reserve(n);
  for (unsigned t = 0; t < n; ++t) {
    workers.emplace_back([&, t] {
      threadIdx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
      blockDim = block;
      gridDim = grid;
      self = {&blk, &blk.warps[t / kWarpSize], t % kWarpSize, shared.data()};
      for (;;) {
        pass();
        if (stop) return;
        blockIdx = current;
        kernel();
        thread_returns();
        pass();
      }
    });
  }
  for (const uint3& b : order) {
    current = b;
    std::memset(shared.data(), 0xFF, shared.size());
    for (unsigned w = 0; w < blk.num_warps; ++w) {
      const unsigned lanes = n - w * kWarpSize >= kWarpSize ? kWarpSize : n - w * kWarpSize;
      Warp& warp = blk.warps[w];
      warp.index = w;
      warp.live = warp.running = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
      warp.waiting = warp.at_barrier = 0;
    }
    blk.barrier->reset(n);
    pass();  // start the block
    pass();  // every thread returned
  }
  stop = true;
  pass();
  for (std::thread& w : workers) w.join();
}

// ORCAL_LAUNCH(grid, block, shared, stream, kernel)(args...): converts the arguments to the kernel's parameter
// types once, as a kernel launch does, and gives every thread its own copy.
template <typename... P>
struct Launch {
  dim3 grid, block;
  size_t shared;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run(grid, block, shared, [&] { std::apply(kernel, params); });
  }
};
template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t shared, void (*kernel)(P...)) {
  return {grid, block, shared, kernel};
}

}  // namespace emu
}  // namespace orcal

#define ORCAL_LAUNCH(grid, block, shared, stream, ...) \
  (static_cast<void>(stream), ::orcal::emu::launch(grid, block, shared, __VA_ARGS__))
#define ORCAL_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::orcal::emu::dynamic_shared())
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

inline void __syncthreads() { orcal::emu::sync_block(); }

// Each warp intrinsic is out of line, so that its return address names its call site.
[[gnu::noinline]] inline unsigned __activemask() {
  return orcal::emu::warp_op(orcal::emu::Op::activemask, __builtin_return_address(0), 0, 0);
}
[[gnu::noinline]] inline unsigned __match_any_sync(unsigned mask, unsigned value) {
  return orcal::emu::warp_op(orcal::emu::Op::match_any, __builtin_return_address(0), mask, value);
}
[[gnu::noinline]] inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
  return orcal::emu::warp_op(orcal::emu::Op::reduce_add, __builtin_return_address(0), mask, value);
}
// 32-bit values, width 32 (what the kernels use).
[[gnu::noinline]] inline unsigned __shfl_down_sync(unsigned mask, unsigned value, unsigned delta) {
  return orcal::emu::warp_op(orcal::emu::Op::shfl_down, __builtin_return_address(0), mask, value, delta);
}
inline int __ffs(int x) { return __builtin_ffs(x); }

template <typename T>
T orcal_emu_atomic_add(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline int atomicAdd(int* a, int v) { return orcal_emu_atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return orcal_emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return orcal_emu_atomic_add(a, v); }
inline float atomicAdd(float* a, float v) { return orcal_emu_atomic_add(a, v); }
inline double atomicAdd(double* a, double v) { return orcal_emu_atomic_add(a, v); }
inline int atomicExch(int* a, int v) { return std::atomic_ref<int>(*a).exchange(v, std::memory_order_relaxed); }
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
  std::atomic_ref<unsigned long long> ref(*a);
  unsigned long long old = ref.load(std::memory_order_relaxed);
  while (v < old && !ref.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}

// Host-side CUDA: nothing to do on the host.
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
enum class CaptureStatus { None, Active, Invalidated };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
}  // namespace cuda
}  // namespace c10
