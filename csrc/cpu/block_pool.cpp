// The block pool of block_pool.h.
#include "cpu/block_pool.h"

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace bayeskern {
namespace cpu {
namespace {

constexpr size_t kAlignment = 64;  // as PyTorch's CPU allocator: whole cache lines, AVX-512 loads

class BlockPool {
 public:
  BlockPool() {
    const char* limit = std::getenv("BAYESKERN_CPU_POOL_MB");
    uint64_t mib = 1024;
    if (limit != nullptr) {
      char* end = nullptr;
      mib = std::strtoull(limit, &end, 10);
      TORCH_CHECK(end != limit && *end == '\0' && limit[0] != '-' && mib < (uint64_t{1} << 40),
                  "BAYESKERN_CPU_POOL_MB must be a whole number of MiB, got '", limit, "'");
    }
    limit_bytes_ = static_cast<size_t>(mib) << 20;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* block = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= bytes;
        return block;
      }
    }
    void* block = std::aligned_alloc(kAlignment, bytes);
    TORCH_CHECK(block != nullptr, "bayeskern_cpp: out of memory allocating ", bytes, " bytes");
    return block;
  }

  size_t release_all() {
    std::unordered_map<size_t, std::vector<void*>> blocks;
    size_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      released = cached_bytes_;
      cached_bytes_ = 0;
    }
    for (auto& [bytes, list] : blocks) {
      for (void* block : list) std::free(block);
    }
    return released;
  }

  void give_back(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_bytes_) {
        free_[bytes].push_back(block);
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // freed blocks by byte size
  size_t cached_bytes_ = 0;
  size_t limit_bytes_;
};

// Never destroyed: tensors still alive at exit give their blocks back to it.
BlockPool& pool() {
  static BlockPool* instance = new BlockPool();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty_like(const at::Tensor& t) {
  const size_t data_bytes = static_cast<size_t>(t.numel()) * t.element_size();
  const size_t bytes = (data_bytes + kAlignment - 1) / kAlignment * kAlignment;  // aligned_alloc's rule
  if (data_bytes == 0) return at::empty_like(t, at::MemoryFormat::Contiguous);
  void* block = pool().take(bytes);
  return at::from_blob(
      block, t.sizes(), [bytes](void* p) { pool().give_back(p, bytes); }, t.options());
}

int64_t release_cached_blocks() { return static_cast<int64_t>(pool().release_all()); }

}  // namespace cpu
}  // namespace bayeskern
