#include "cpu/result_memory.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
// Blocks waiting in the pool are poisoned: a read or write through a freed result's pointer is
// reported under `make sanitize`, as it would be after a free.
#define CNNOPS_POOLED(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define CNNOPS_UNPOOLED(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define CNNOPS_POOLED(p, n)
#define CNNOPS_UNPOOLED(p, n)
#endif

namespace cnnops {
namespace cpu {

namespace {

constexpr size_t kPooledMinBytes = size_t(1) << 20;  // below: torch's CPU allocator
constexpr size_t kGranule = size_t(64) << 10;        // sizes round up to this, so near sizes share blocks
constexpr size_t kAlignment = 64;

// On unless the environment's CNNOPS_KEEP_RESULT_MEMORY=0 turns it off at start.
std::atomic<bool> kept{[] {
  const char* env = std::getenv("CNNOPS_KEEP_RESULT_MEMORY");
  return !(env && std::strcmp(env, "0") == 0);
}()};
std::atomic<int64_t> forced_limit{-1};

// The most the pool holds: an eighth of the machine's memory, at most 2 GiB.
size_t limit_bytes() {
  if (const int64_t forced = forced_limit.load(std::memory_order_relaxed); forced >= 0) return size_t(forced);
  static const size_t limit = [] {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    const size_t eighth = pages > 0 && page > 0 ? size_t(pages) * size_t(page) / 8 : size_t(0);
    return std::min(eighth, size_t(2) << 30);
  }();
  return limit;
}

struct Block {
  void* data;
  size_t size;
};

class ResultPool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kPooledMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    TORCH_CHECK_WITH(OutOfMemoryError, n <= SIZE_MAX - kGranule, "cnnops: cannot allocate ", n, " bytes");
    const size_t size = (n + kGranule - 1) / kGranule * kGranule;
    Block* block = take(size);
    if (block == nullptr) {
      void* data = ::operator new(size, std::align_val_t(kAlignment), std::nothrow);
      if (data == nullptr) {  // what the pool holds may be what is missing
        release();
        data = ::operator new(size, std::align_val_t(kAlignment), std::nothrow);
      }
      block = data ? new (std::nothrow) Block{data, size} : nullptr;
      if (block == nullptr && data != nullptr) ::operator delete(data, std::align_val_t(kAlignment));
      TORCH_CHECK_WITH(OutOfMemoryError, block != nullptr, "cnnops: out of memory allocating ", size,
                       " bytes for a result");
    }
    return {block->data, block, &ResultPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release() {
    std::multimap<size_t, Block*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      held_ = 0;
    }
    for (auto& [size, block] : blocks) free_block(block);
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return int64_t(held_);
  }
  int64_t reuses() const { return reuses_.load(std::memory_order_relaxed); }

  static ResultPool& instance() {
    static ResultPool* pool = [] {
      // A fork while another thread holds the lock would leave the child's copy locked for good.
      pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                     [] { instance().mutex_.unlock(); });
      return new ResultPool;  // never destroyed: results may be freed at exit
    }();
    return *pool;
  }

 private:
  // The most recently freed of the smallest blocks that hold `size` bytes and waste at most an
  // eighth: the one likeliest still in cache (blocks of equal size are kept in the order freed).
  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 8) return nullptr;
    it = std::prev(free_.upper_bound(it->first));
    Block* block = it->second;
    free_.erase(it);
    held_ -= block->size;
    reuses_.fetch_add(1, std::memory_order_relaxed);
    CNNOPS_UNPOOLED(block->data, block->size);
    return block;
  }

  static void give_back(void* context) noexcept {
    Block* block = static_cast<Block*>(context);
    ResultPool& pool = instance();
    if (kept.load(std::memory_order_relaxed)) {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      if (pool.held_ + block->size <= limit_bytes()) {
        try {
          pool.free_.emplace(block->size, block);
          pool.held_ += block->size;
          CNNOPS_POOLED(block->data, block->size);
          return;
        } catch (const std::bad_alloc&) {  // no memory for the list's node: a deleter must not throw
        }
      }
    }
    free_block(block);
  }

  static void free_block(Block* block) noexcept {
    CNNOPS_UNPOOLED(block->data, block->size);
    ::operator delete(block->data, std::align_val_t(kAlignment));
    delete block;
  }

  std::mutex mutex_;
  std::multimap<size_t, Block*> free_;  // by size
  size_t held_ = 0;
  std::atomic<int64_t> reuses_{0};
};

}  // namespace

at::Tensor empty_result(c10::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  if (!kept.load(std::memory_order_relaxed)) return at::empty(sizes, options.memory_format(format));
  return at::detail::empty_generic(sizes, &ResultPool::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), format);
}

at::Tensor empty_result_like(const at::Tensor& x) {
  if (!kept.load(std::memory_order_relaxed) || !x.is_non_overlapping_and_dense()) return at::empty_like(x);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &ResultPool::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type());
}

void set_result_memory_kept(bool value) {
  kept.store(value, std::memory_order_relaxed);
  if (!value) release_result_memory();
}
bool result_memory_kept() { return kept.load(std::memory_order_relaxed); }
void release_result_memory() { ResultPool::instance().release(); }
int64_t result_memory_held_bytes() { return ResultPool::instance().held(); }
int64_t result_memory_limit_bytes() { return int64_t(limit_bytes()); }
void set_result_memory_limit(int64_t bytes) {
  forced_limit.store(bytes, std::memory_order_relaxed);
  release_result_memory();
}
int64_t result_memory_reuse_count() { return ResultPool::instance().reuses(); }

}  // namespace cpu
}  // namespace cnnops
