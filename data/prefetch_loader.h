// Background batch preparation: `workers` threads build the batches of steps
// [start, end) ahead of the trainer (at most `prefetch` ahead) and hand them over in step order.
// Because a batch is a pure function of its step, any number of workers yields the same stream.
// An exception while building a batch is rethrown by next() for that step.
#pragma once
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace trialign {

template <class Batch>
class PrefetchLoader {
 public:
  using Make = std::function<Batch(int64_t step)>;

  PrefetchLoader(Make make, int64_t start, int64_t end, int workers, int prefetch)
      : make_(std::move(make)), next_to_build_(start), next_to_take_(start), end_(end),
        prefetch_(std::max(1, prefetch)) {
    for (int i = 0; i < std::max(1, workers); ++i) threads_.emplace_back([this] { work(); });
  }

  ~PrefetchLoader() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  PrefetchLoader(const PrefetchLoader&) = delete;
  PrefetchLoader& operator=(const PrefetchLoader&) = delete;

  // The batch of the next step, in order. Blocks (time counted in wait_seconds) until ready.
  Batch next() {
    const auto t0 = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mu_);
    const int64_t step = next_to_take_;
    cv_.wait(lock, [&] { return ready_.count(step) > 0; });
    Slot slot = std::move(ready_.at(step));
    ready_.erase(step);
    ++next_to_take_;
    lock.unlock();
    cv_.notify_all();
    wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (slot.error) std::rethrow_exception(slot.error);
    return std::move(slot.batch);
  }

  double wait_seconds() const { return wait_seconds_; }

 private:
  struct Slot {
    Batch batch;
    std::exception_ptr error;
  };

  void work() {
    for (;;) {
      int64_t step;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || (next_to_build_ < end_ && next_to_build_ < next_to_take_ + prefetch_); });
        if (stop_) return;
        step = next_to_build_++;
      }
      Slot slot;
      try {
        slot.batch = make_(step);
      } catch (...) {
        slot.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        ready_.emplace(step, std::move(slot));
      }
      cv_.notify_all();
    }
  }

  Make make_;
  int64_t next_to_build_, next_to_take_, end_;
  int prefetch_;
  bool stop_ = false;
  double wait_seconds_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, Slot> ready_;
  std::vector<std::thread> threads_;
};

}  // namespace trialign
