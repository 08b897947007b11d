// The deterministic sample order shared by every trainer. The training stream is the
// concatenation of epoch permutations; optimizer step s consumes stream items
// [s * B, (s + 1) * B) where B is the global batch (rank r of W takes the r-th slice of it).
// Everything is a pure function of (seed, step), so resuming at step s needs only s.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "core/rng.h"

namespace trialign {

struct SampleRef {
  int64_t epoch = 0;
  int64_t index = 0;  // record index in the dataset
};

// [0, size) without the indices in `left_out` (those outside the range are ignored), in order.
inline std::vector<int64_t> indices_without(int64_t size, const std::vector<int64_t>& left_out) {
  std::vector<char> out(static_cast<size_t>(size), 0);
  for (const auto i : left_out)
    if (i >= 0 && i < size) out[static_cast<size_t>(i)] = 1;
  std::vector<int64_t> kept;
  for (int64_t i = 0; i < size; ++i)
    if (!out[static_cast<size_t>(i)]) kept.push_back(i);
  return kept;
}

class EpochSampler {
 public:
  // `left_out`: record indices never drawn (records whose images do not decode, found by
  // data.check_images under train.on_bad_batch: skip); each epoch permutes the others. Without
  // any, the stream is the plain permutation of [0, dataset_size).
  EpochSampler(uint64_t seed, int64_t dataset_size, const std::vector<int64_t>& left_out = {})
      : seed_(seed), n_(dataset_size) {
    if (left_out.empty()) return;
    kept_ = indices_without(dataset_size, left_out);
    n_ = static_cast<int64_t>(kept_.size());
  }

  // The samples of optimizer step `step` with global batch `global_batch`, this rank's slice.
  std::vector<SampleRef> batch(int64_t step, int64_t global_batch, int rank = 0, int world = 1) {
    const int64_t per_rank = global_batch / world;
    const int64_t first = step * global_batch + rank * per_rank;
    std::vector<SampleRef> out;
    out.reserve(static_cast<size_t>(per_rank));
    for (int64_t i = first; i < first + per_rank; ++i) {
      const int64_t epoch = i / n_, pos = i % n_;
      out.push_back({epoch, index_at(epoch, pos)});
    }
    return out;
  }

  int64_t size() const { return n_; }  // the records drawn

 private:
  // Reads under the lock: another loader thread may evict an epoch from the cache meanwhile.
  int64_t index_at(int64_t epoch, int64_t pos) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = cache_.find(epoch);
    if (it == cache_.end()) {
      if (cache_.size() > 4) cache_.erase(cache_.begin());  // the oldest epoch
      it = cache_.emplace(epoch, epoch_permutation(seed_, epoch, n_)).first;
    }
    const int64_t k = it->second[static_cast<size_t>(pos)];
    return kept_.empty() ? k : kept_[static_cast<size_t>(k)];
  }

  uint64_t seed_;
  int64_t n_;
  std::vector<int64_t> kept_;  // with left-out records: the others, in order; else empty
  std::mutex mu_;
  std::map<int64_t, std::vector<int64_t>> cache_;
};

}  // namespace trialign
