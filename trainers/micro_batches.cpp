#include "trainers/micro_batches.h"

#include <dlfcn.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "core/distributed.h"
#include "core/errors.h"

namespace trialign {

namespace {

// OpenBLAS keeps one global thread count. Concurrent callers of a threaded OpenBLAS queue up
// for its one pool, so while micro-batches run at once each GEMM runs on its caller's thread.
// (Debian's LibTorch links the pthreads OpenBLAS; an OpenMP build of OpenBLAS would also set the
// calling thread's OpenMP count here, as setup_threads' call already would.)
class OneBlasThread {
 public:
  OneBlasThread() {
    if (api().get && api().set) {
      previous_ = api().get();
      api().set(1);
    }
  }
  ~OneBlasThread() {
    if (previous_ > 0) api().set(previous_);
  }

 private:
  struct Api {  // looked up once, not every step
    int (*get)() = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    void (*set)(int) = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  };
  static const Api& api() {
    static const Api a;
    return a;
  }
  int previous_ = 0;
};

// Adds one micro-batch's gradients (aligned with params) into the parameters' .grad, as
// autograd's accumulation does: the first one becomes .grad, unless its layout is not the
// parameter's (the expanded gradient of a sum) or autograd handed the same tensor or memory to
// another parameter too (the gradient of `w + v`): then a copy does. Later ones add in place.
void accumulate(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads) {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& g = grads[i];
    if (!g.defined()) continue;  // the loss does not reach this parameter
    auto p = params[i];
    if (p.grad().defined()) {
      p.mutable_grad().add_(g);
    } else if (g.sizes() == p.sizes() && g.strides() == p.strides() && g.is_non_overlapping_and_dense() &&
               g.use_count() == 1 && g.storage().use_count() == 1) {
      p.mutable_grad() = g;
    } else {
      p.mutable_grad() = torch::empty_like(p).copy_(g);
    }
  }
}

// The plain path: each micro-batch's backward() adds into .grad as it finishes.
std::vector<LossOutput> run_in_order(int64_t count, const std::function<LossOutput(int64_t)>& body) {
  std::vector<LossOutput> outs;
  for (int64_t j = 0; j < count; ++j) {
    auto o = body(j);
    o.loss.backward();
    o.loss = o.loss.detach();
    outs.push_back(std::move(o));
  }
  return outs;
}

}  // namespace

MicroBatchThreads::MicroBatchThreads(int threads, int intra_threads, std::vector<torch::Tensor> params)
    : params_(std::move(params)) {
  if (threads <= 1) return;
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  if (threads > 4 * cores)
    throw ConfigError("train.micro_batch_threads: " + std::to_string(threads) + " threads, but this machine has " +
                      std::to_string(cores) + " cores; use at most " + std::to_string(4 * cores) +
                      " (one per core is the point)");
  const int caller = at::get_num_threads();
  const int intra = std::max(1, intra_threads / threads);
  try {
    // The worker count goes in by value: a worker that starts while workers_ is still being filled
    // must not read its size (a data race; a short count kept the first micro-batches waiting).
    for (int i = 0; i < threads; ++i) workers_.emplace_back([this, intra, threads] { worker_loop(intra, threads); });
  } catch (...) {  // a thread that cannot start: the started ones must be joined, not destroyed
    stop_workers();
    throw;
  }
  // Each worker sets its own OpenMP thread count (libgomp keeps it per thread); the call also
  // sets LibTorch's process-wide default for threads yet to start, so the caller's count is set
  // again once they all have.
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return ready_ == threads; });
  lock.unlock();
  at::set_num_threads(caller);
}

MicroBatchThreads::~MicroBatchThreads() { stop_workers(); }

void MicroBatchThreads::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void MicroBatchThreads::worker_loop(int intra, int64_t ahead) {
  // LibTorch sets a thread's OpenMP count from its process-wide default the first time the
  // thread runs parallel work (lazily, flagged per thread); get_num_threads() does that inside
  // LibTorch first, so that the count set next is the one that stays.
  at::get_num_threads();
  at::set_num_threads(intra);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ++ready_;
  }
  done_.notify_all();
  for (;;) {
    int64_t task = 0;
    const std::function<void(int64_t)>* job = nullptr;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      // At most one micro-batch per worker ahead of the caller's additions: that bounds the
      // gradient sets waiting in memory, whatever order the micro-batches finish in.
      wake_.wait(lock, [&] {
        return stopping_ || (job_ && !aborted_ && next_task_ < job_count_ && next_task_ < added_ + ahead);
      });
      if (stopping_) return;
      task = next_task_++;
      job = job_;
    }
    (*job)(task);  // catches its own exceptions
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++finished_;
    }
    done_.notify_all();
  }
}

std::vector<LossOutput> MicroBatchThreads::run(int64_t count, const std::function<LossOutput(int64_t)>& body) {
  if (workers_.empty()) return run_in_order(count, body);
  std::vector<LossOutput> outs(static_cast<size_t>(count));
  std::vector<std::vector<torch::Tensor>> grads(static_cast<size_t>(count));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(count));
  std::vector<char> done(static_cast<size_t>(count), 0);
  // The caller's grad mode reaches the workers (thread-local state); autocast is set by the
  // bodies themselves.
  const bool grad_mode = torch::GradMode::is_enabled();
  const std::function<void(int64_t)> job = [&](int64_t j) {
    const auto k = static_cast<size_t>(j);
    torch::AutoGradMode mode(grad_mode);
    try {
      auto o = body(j);
      grads[k] = torch::autograd::grad({o.loss}, params_, {}, false, false, /*allow_unused=*/true);
      o.loss = o.loss.detach();
      outs[k] = std::move(o);
    } catch (...) {
      errors[k] = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    done[k] = 1;
    if (errors[k]) aborted_ = true;  // no new micro-batch starts
  };
  // The calling thread keeps its LibTorch thread count: changing it per step would also clear
  // oneDNN's cache of bf16 matmul primitives. It only adds gradients meanwhile (memory-bound).
  OneBlasThread blas;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &job;
    job_count_ = count;
    next_task_ = finished_ = added_ = 0;
    aborted_ = false;
  }
  wake_.notify_all();
  std::exception_ptr first_error;
  // Micro-batch j's gradients are added once j and every earlier one are in, so about one set
  // per worker waits in memory.
  for (int64_t j = 0; j < count; ++j) {
    const auto k = static_cast<size_t>(j);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return done[k] || (aborted_ && j >= next_task_); });
      if (!done[k]) break;  // never started: an earlier one failed
    }
    if (errors[k] && !first_error) first_error = errors[k];
    if (!first_error) {
      try {
        accumulate(params_, grads[k]);
      } catch (...) {  // out of memory, say: stop starting micro-batches, wait for the running ones
        first_error = std::current_exception();
        std::lock_guard<std::mutex> lock(mutex_);
        aborted_ = true;
      }
    }
    grads[k].clear();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      added_ = j + 1;  // a worker may take the next micro-batch
    }
    wake_.notify_all();
  }
  {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return finished_ == next_task_; });  // nothing of this call still runs
    job_ = nullptr;
  }
  if (first_error) std::rethrow_exception(first_error);
  return outs;
}

void add_output(LossOutput& total, const LossOutput& out) {
  total.loss = total.loss.defined() ? total.loss + out.loss.detach() : out.loss.detach();
  for (const auto& [k, v] : out.metrics) total.metrics[k] = total.metrics.count(k) ? total.metrics[k] + v : v;
}

void log_micro_batch_threads(const RunConfig& cfg, int intra_threads) {
  const int n = cfg.train.micro_batch_threads;
  if (n <= 1 || dist::rank() != 0) return;
  spdlog::info("micro-batches: {} of {} per step at once, each on a thread with {} LibTorch thread(s) and one-thread "
               "GEMMs{}",
               n, cfg.train.grad_accum, std::max(1, intra_threads / n),
               intra_threads < n ? fmt::format(" (run.threads is {}: more threads than that compete for cores)", intra_threads)
                                 : std::string());
}

std::vector<LossOutput> run_micro_batches(MicroBatchThreads* threads, int64_t count,
                                          const std::function<LossOutput(int64_t)>& body) {
  return threads ? threads->run(count, body) : run_in_order(count, body);
}

}  // namespace trialign
