// The packed-weight cache (see weight_cache.h).
#include "cpu/weight_cache.h"

#include "cpu/conv_cpu.h"

#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace cnnops {
namespace cpu {
namespace {

constexpr size_t kMaxEntries = 256;
constexpr int64_t kMaxBytes = int64_t(256) << 20;

struct Identity {  // everything an entry must match besides the tag
  c10::TensorImpl* tensor = nullptr;
  c10::StorageImpl* storage = nullptr;
  const void* data = nullptr;
  uint32_t version = 0;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0;
  bool operator==(const Identity&) const = default;
};

struct Entry {
  c10::weak_intrusive_ptr<c10::TensorImpl> tensor;
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  Identity id;
  WeightTag tag;
  std::shared_ptr<const void> value;
  int64_t bytes;
  uint64_t last_use;

  // Both weak references still lock to the objects recorded: no other tensor or storage can
  // have taken their addresses while these references existed.
  bool alive() const { return tensor.lock().get() == id.tensor && storage.lock().get() == id.storage; }
};

struct Scope {
  const at::Tensor* weight;
  const void* kernel_weight;
};

struct Cache {
  std::mutex mutex;
  std::vector<Entry> entries;
  uint64_t clock = 0;
  int64_t bytes = 0, hits = 0, misses = 0;
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: kernels may run during interpreter exit
  return *instance;
}

std::atomic<bool>& enabled() {
  static std::atomic<bool> on([] {
    // Off unless asked for: a write through `.data` or a numpy/DLPack alias bumps no version
    // counter, and the cache would then serve the old weight without a word.
    const char* env = std::getenv("CNNOPS_WEIGHT_CACHE");
    return env && std::strcmp(env, "1") == 0;
  }());
  return on;
}

thread_local const Scope* current_scope = nullptr;

Identity identity_of(const at::Tensor& w) {
  Identity id;
  id.tensor = w.unsafeGetTensorImpl();
  id.storage = w.storage().unsafeGetStorageImpl();
  id.data = w.data_ptr();
  id.version = w.unsafeGetTensorImpl()->version_counter().current_version();
  id.dtype = w.scalar_type();
  id.sizes = w.sizes().vec();
  id.strides = w.strides().vec();
  id.offset = w.storage_offset();
  return id;
}

void erase_at(Cache& c, size_t i) {
  c.bytes -= c.entries[i].bytes;
  c.entries.erase(c.entries.begin() + static_cast<std::ptrdiff_t>(i));
}

}  // namespace

WeightCacheScope::WeightCacheScope(const at::Tensor& weight, const void* kernel_weight) {
  // Grad mode on: training, where every step changes the weights. Inference tensors carry no
  // version counter.
  if (!enabled().load() || c10::GradMode::is_enabled() || !weight.defined() || !weight.has_storage() ||
      weight.is_inference() || !weight.device().is_cpu() || current_scope != nullptr)
    return;
  current_scope = new Scope{&weight, kernel_weight};
  active_ = true;
}

WeightCacheScope::~WeightCacheScope() {
  if (!active_) return;
  delete current_scope;
  current_scope = nullptr;
}

bool weight_cache_serves(const void* kernel_weight) {
  return current_scope != nullptr && current_scope->kernel_weight == kernel_weight;
}

std::shared_ptr<const void> cached_weight_impl(const void* kernel_weight, const WeightTag& tag, int64_t bytes,
                                               WeightMaker make) {
  const Scope* scope = current_scope;
  if (scope == nullptr || scope->kernel_weight != kernel_weight || bytes > kMaxBytes) return make();
  const Identity id = identity_of(*scope->weight);
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    for (size_t i = 0; i < c.entries.size(); ++i) {
      Entry& e = c.entries[i];
      if (e.tag == tag && e.id == id && e.alive()) {
        e.last_use = ++c.clock;
        ++c.hits;
        return e.value;
      }
    }
    ++c.misses;
  }
  std::shared_ptr<const void> value = make();  // outside the lock: packing takes milliseconds
  std::lock_guard<std::mutex> lock(c.mutex);
  // Drop entries of freed or changed weights (this weight's older versions among them), then
  // the least recently used ones while over a bound.
  for (size_t i = c.entries.size(); i-- > 0;) {
    const Entry& e = c.entries[i];
    if ((e.id.tensor == id.tensor && e.tag == tag) || !e.alive()) erase_at(c, i);
  }
  while (!c.entries.empty() && (c.entries.size() >= kMaxEntries || c.bytes + bytes > kMaxBytes)) {
    const auto oldest = std::min_element(c.entries.begin(), c.entries.end(),
                                         [](const Entry& a, const Entry& b) { return a.last_use < b.last_use; });
    erase_at(c, static_cast<size_t>(oldest - c.entries.begin()));
  }
  const at::Tensor& w = *scope->weight;
  c.entries.push_back(Entry{c10::weak_intrusive_ptr<c10::TensorImpl>(w.getIntrusivePtr()),
                            w.storage().getWeakStorageImpl(), id, tag, value, bytes, ++c.clock});
  c.bytes += bytes;
  return value;
}

template <typename T>
std::shared_ptr<const std::vector<PackedA<T>>> packed_group_weights(const ConvGeometry& g, const T* w) {
  const int64_t m = g.out_channels_per_group(), k = g.gemm_k(), mr = gemm_mr<T>();
  const WeightTag tag{1, g.groups, m, k, mr, int64_t(sizeof(T))};
  return cached_weight<std::vector<PackedA<T>>>(w, tag, g.groups * m * k * int64_t(sizeof(T)), [&] {
    auto packed = std::make_shared<std::vector<PackedA<T>>>(g.groups);
    const int64_t panels = (m + mr - 1) / mr, k_blocks = (k + kKc - 1) / kKc;
    for (auto& a : *packed) {  // the layout of pack_a (gemm.h), zero past M
      a.m = m;
      a.k = k;
      a.mr = mr;
      if (m % mr == 0)
        a.data.resize(panels * mr * k);  // every value written below
      else
        a.data.assign(panels * mr * k, T(0));
    }
    // One task per (group, reduction block, panel): panel[kk * mr + i] = W_g[i0 + i, k0 + kk],
    // read along W's rows. A large weight (512 x 4608) takes milliseconds on one thread.
    const int64_t tasks = g.groups * k_blocks * panels;
    parallel_for(0, tasks, std::max<int64_t>(1, tasks / 64), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t grp = task / (k_blocks * panels), k0 = task / panels % k_blocks * kKc;
        const int64_t i0 = task % panels * mr, kc = std::min(kKc, k - k0), rows = std::min(mr, m - i0);
        PackedA<T>& a = (*packed)[grp];
        T* dst = a.data.data() + (a.panel(k0, kc, i0) - a.data.data());
        const T* src = w + (grp * m + i0) * k + k0;
        pack_a_rows(src, k, rows, kc, dst, mr);
      }
    });
    return packed;
  });
}

template std::shared_ptr<const std::vector<PackedA<float>>> packed_group_weights<float>(const ConvGeometry&,
                                                                                        const float*);
template std::shared_ptr<const std::vector<PackedA<double>>> packed_group_weights<double>(const ConvGeometry&,
                                                                                          const double*);

}  // namespace cpu
}  // namespace cnnops

// No tensor arguments, so no backend key: CompositeExplicitAutograd serves every call.
TORCH_LIBRARY_IMPL(cnnops, CompositeExplicitAutograd, m) {
  m.impl("cpu_weight_cache_clear", [] {
    auto& c = cnnops::cpu::cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    c.entries.clear();
    c.bytes = 0;
  });
  m.impl("cpu_weight_cache_enable", [](bool on) { return cnnops::cpu::enabled().exchange(on); });
  m.impl("cpu_weight_cache_info", [] {
    auto& c = cnnops::cpu::cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    return std::vector<int64_t>{static_cast<int64_t>(c.entries.size()), c.bytes, c.hits, c.misses};
  });
}
