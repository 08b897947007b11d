// Micro-batches of one optimizer step run at once on their own threads
// (train.micro_batch_threads).
//
// On a CPU with a few cores, LibTorch's intra-op parallelism over the small matrices and
// element-wise ops of one micro-batch keeps the cores less busy than one micro-batch per core
// on one thread each (docs/benchmarks.md, "Micro-batches on threads"). Each thread runs its
// micro-batch's forward and backward with torch::autograd::grad into its own gradient list,
// and the lists are added into the parameters' .grad in micro-batch order, so the step's
// gradient is the one a sequential accumulation adds up, in the same order. One copy of the
// weights serves every thread (no replica, no all-reduce).
#pragma once
#include <torch/torch.h>

#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "core/run_config.h"
#include "losses/loss.h"

namespace trialign {

class MicroBatchThreads {
 public:
  // threads: micro-batches run at once (1 = in order on the calling thread, backward() as
  // usual). intra_threads: the run's LibTorch threads, shared out among the workers (at least
  // one each). params: what the step differentiates (the trainable parameters).
  MicroBatchThreads(int threads, int intra_threads, std::vector<torch::Tensor> params);
  ~MicroBatchThreads();
  MicroBatchThreads(const MicroBatchThreads&) = delete;
  MicroBatchThreads& operator=(const MicroBatchThreads&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) > 0 ? static_cast<int>(workers_.size()) : 1; }

  // Runs body(j) for j = 0 .. count-1 (its loss and metrics) and back-propagates each loss
  // into the parameters' .grad, adding in order of j. Returns the outputs in order of j, losses
  // detached. An exception from a body is rethrown here (the lowest j's) once every running
  // micro-batch has finished; no later micro-batch starts, and what earlier ones added stays in
  // .grad, as when backward() runs in order.
  std::vector<LossOutput> run(int64_t count, const std::function<LossOutput(int64_t)>& body);

 private:
  void worker_loop(int intra, int64_t ahead);  // ahead: the number of workers
  void stop_workers();

  std::vector<torch::Tensor> params_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  // The current job: tasks are taken in order by whichever worker is free.
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t job_count_ = 0, next_task_ = 0, finished_ = 0;
  int64_t added_ = 0;  // micro-batches whose gradients the caller has added (or dropped)
  int ready_ = 0;
  bool aborted_ = false;  // a micro-batch failed: start no more
  bool stopping_ = false;
};

// Adds one micro-batch's loss (detached) and metrics into a step's total: shares of the step add up.
void add_output(LossOutput& total, const LossOutput& out);

// The run's log line (rank 0) when train.micro_batch_threads > 1.
void log_micro_batch_threads(const RunConfig& cfg, int intra_threads);

// threads->run(count, body), or the micro-batches in order with backward() when threads is null.
std::vector<LossOutput> run_micro_batches(MicroBatchThreads* threads, int64_t count,
                                          const std::function<LossOutput(int64_t)>& body);

}  // namespace trialign
