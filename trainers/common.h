// Free functions every trainer shares: threads, lr schedule, optimizer groups, clipping, RNG
// state, run-directory setup, resume checks, signal handling. No trainer base class: each
// workflow's loop stays readable top to bottom and calls these.
#pragma once
#include <torch/torch.h>

#include <atomic>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/errors.h"
#include "core/logging.h"
#include "core/run_config.h"
#include "data/tokenizer.h"

namespace trialign {

// What a trainer returns.
struct TrainResult {
  int64_t final_step = 0;
  bool interrupted = false;           // stopped by a signal after checkpointing
  std::string checkpoint;             // last checkpoint written
  nlohmann::json final_eval;          // held-out metrics (empty without validation data)
  nlohmann::json start_eval;          // the same before the first step (eval.at_start), else null
  std::vector<double> logged_losses;  // training loss at every log step, in order
};

// Options from the command line (not the config).
struct TrainOptions {
  std::string resume;  // "" = fresh run (refuses a run dir with checkpoints), "auto", or a path
  bool quiet = false;  // tests: no progress lines
  // Behave as if SIGTERM arrived during this step (checkpoint, then return interrupted); -1 = never.
  // Lets tests and preemption drills exercise the signal path deterministically.
  int64_t stop_at_step = -1;
  // Tests: the gradients of `nonfinite_steps` steps from this one (1-based) are set to NaN after
  // backward, as a diverging loss would leave them; -1 = never.
  int64_t nonfinite_at_step = -1;
  int64_t nonfinite_steps = 1;
};

// libgomp reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when it loads, and by default idle
// OpenMP threads spin for long, taking the cores OpenBLAS's threads need inside every fp32
// matmul. When neither variable is set this sets GOMP_SPINCOUNT to a short spin and executes the
// program again (same arguments), so the new process starts with it; a value the user set is
// kept. Call first thing in main().
void restart_with_passive_openmp(char** argv);
// Idle OpenMP threads soon sleep in this process (OMP_WAIT_POLICY=PASSIVE, or a GOMP_SPINCOUNT of
// at most 1,000,000): then OpenBLAS gets the intra-op thread count.
bool passive_openmp();

// Sets LibTorch's intra-op threads (0 = all cores) and returns the count used.
int setup_threads(int requested);

// run.out_dir held by this process (rank 0) for as long as the trainer runs: an exclusive
// flock on RUN/.trialign.lock, so a second run into the same folder (another terminal, a job
// submitted twice) is refused before it writes a file, instead of interleaving its checkpoints
// and metrics with the first's. The kernel drops the lock when the process ends, however it
// ends, so a killed run leaves nothing stale behind. Move-only; released on destruction.
class RunFolderLock {
 public:
  RunFolderLock() = default;
  // Run: a trainer's run.out_dir. Pipeline: a pipeline's out_dir, held by `trialign run` from
  // its first stage to its last (its own lock file beside the stage folders), so that a second
  // run of the pipeline cannot start a stage, or write a stage_done.json, between two of the
  // first's stages.
  enum class Kind { Run, Pipeline };
  // Takes the lock or throws ConfigError naming the process holding it. A filesystem without
  // locks (some network mounts) gets a warning and no lock.
  static RunFolderLock acquire(const std::string& out_dir, Kind kind = Kind::Run);
  RunFolderLock(RunFolderLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  RunFolderLock& operator=(RunFolderLock&& o) noexcept;
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;
  ~RunFolderLock();
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// What prepare_run sets up; the trainer keeps it until it returns.
struct PreparedRun {
  int threads = 1;     // LibTorch intra-op threads in use
  RunFolderLock lock;  // rank 0's hold on run.out_dir (empty on other ranks)
};

// What every trainer does first: stop handlers (SIGTERM/SIGINT), run.out_dir created (a clear
// ConfigError when it cannot be) and locked (a ConfigError when another process trains there),
// logging to RUN/train.log, threads.
PreparedRun prepare_run(const RunConfig& cfg);

// Data parallel (core/distributed.h), the trainers' side of it. All are no-ops in one process.
int64_t global_batch(const RunConfig& cfg);  // samples per optimizer step over all ranks
int world_size();
int rank();
// Rank 0's values copied into every rank's tensors (parameters once initialised or resumed).
void sync_across_ranks(const std::vector<torch::Tensor>& tensors);
// Gradients summed over ranks (the losses are normalised by the global batch).
void reduce_gradients(const RunConfig& cfg, const std::vector<torch::Tensor>& params);
double sum_across_ranks(double v, const std::string& what);
// Rank 0 runs `save` (a checkpoint) and returns its folder; the other ranks return "".
std::string save_on_main(const std::function<std::string()>& save);
// RUN/metrics.jsonl on rank 0; a log that writes nothing on the others.
MetricsLog open_metrics_log(const RunConfig& cfg);
// RUN/<name> written atomically, by rank 0 only.
void write_run_text(const RunConfig& cfg, const std::string& name, const std::string& text);

// "auto" -> "bf16" when the CPU has native bf16 dot products (avx512_bf16 / AMX), else "fp32".
std::string resolve_precision(const std::string& requested);

// bf16 CPU autocast for the forward passes inside its scope: matmuls and convolutions run in
// bf16, weights, gradients and optimizer state stay fp32 (no loss scaling needed for bf16).
class AutocastGuard {
 public:
  explicit AutocastGuard(bool enabled);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool enabled_, prev_enabled_ = false;
  at::ScalarType prev_dtype_ = at::kBFloat16;
};

// Linear warmup from 0 to base_lr over warmup_steps, then cosine / linear decay to
// min_lr_ratio * base_lr at `total`, or constant. `step` is 0-based (the step about to run).
double lr_at(const ScheduleConfig& s, double base_lr, int64_t step, int64_t total);

// AdamW parameter groups: weight decay on matrices only (not norms, biases, embeddings, scalars).
std::vector<torch::optim::OptimizerParamGroup> adamw_groups(
    const std::vector<std::pair<std::string, torch::Tensor>>& named_trainable, const OptimConfig& cfg);
void set_lr(torch::optim::Optimizer& opt, double lr);

// Freezing and per-module learning rates (optim.param_groups). Each parameter takes the first
// rule whose `match` names its component (vision_model, mm_projector, language_model) or whose
// glob matches its name; frozen parameters get requires_grad(false) and stay out of the
// optimizer. A rule that matches no parameter is a ConfigError (a typo would silently train
// what was meant to be frozen).
struct ParamPlan {
  std::vector<std::pair<std::string, torch::Tensor>> trainable;
  std::vector<std::string> frozen;                       // parameter names
  std::vector<torch::optim::OptimizerParamGroup> groups; // AdamW groups (decay / no decay per lr)
  std::vector<double> base_lrs;                          // peak lr of each group
  // The peak lr the log shows: that of the rule or default holding the most trainable weights
  // (optim.lr itself may reach no parameter when every trainable one has a rule's lr).
  double logged_lr = 0;
  std::string lr_summary;  // "mm_projector 0.002, language_model 0.002 (optim.lr 0.0001 reaches no parameter)"
};
ParamPlan plan_param_groups(const std::vector<std::pair<std::string, torch::Tensor>>& named, const OptimConfig& cfg);
// Sets every group's lr to base_lrs[g] * factor (factor = the schedule's multiplier).
void set_lr_scaled(torch::optim::Optimizer& opt, const std::vector<double>& base_lrs, double factor);

// Global L2 norm of the gradients; scales them down to max_norm when max_norm > 0.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

// LibTorch's default CPU generator state as a byte tensor, and back.
torch::Tensor get_rng_state();
void set_rng_state(const torch::Tensor& state);

// Detached scalar metrics -> JSON numbers (one sync, only on log steps).
nlohmann::json metrics_json(const std::map<std::string, torch::Tensor>& metrics);

// Config keys that may change between a checkpoint and its resume (they do not change what is
// computed); any other difference refuses the resume. Returns the differing dotted keys.
struct ConfigDiff {
  std::vector<std::string> safe, unsafe;
  // optim.lr, and optim.param_groups where only the rules' lr differ: a resume may lower the
  // learning rate (the usual remedy after a divergence; it then no longer repeats the original
  // run), while a finished pipeline stage trained at another lr is not the same stage.
  std::vector<std::string> learning_rate;
  // The new lrs group the parameters differently (the optimizer makes one group per distinct
  // lr), so the saved optimizer state does not fit: a resume is refused.
  bool lr_regrouped = false;
};
ConfigDiff diff_for_resume(const std::string& saved_yaml, const std::string& current_yaml);

// Which checkpoint a run starts from: "" for a fresh run. A fresh run (no --resume) into a
// run.out_dir that already holds checkpoints is refused; "auto" takes the newest complete one
// (or starts fresh when there is none); a path may name a checkpoint or a run folder.
std::string select_resume_checkpoint(const std::string& run_dir, const std::string& resume);

// After the training set is loaded (encoded since `before`): rank 0 warns when the tokenizer
// turned part of it into unk (data/tokenizer.h, unknown_tokens_note).
void warn_unknown_tokens(const Tokenizer& tok, const Tokenizer::Coverage& before, const RunConfig& cfg);

// model.safetensors' CRC-32 as a checkpoint's MANIFEST.json records it (no hashing of the file):
// which weights a checkpoint holds, for a pipeline stage or a preference run's reference model
// to tell that the checkpoint it started from was replaced. Throws DataError without one.
uint32_t model_weights_crc(const std::string& checkpoint);

// The training manifest a run reads, as its checkpoints record it (trainer_state.json "data"):
// {path, bytes, crc32, records}. Read once when the run starts.
nlohmann::json train_data_record(const RunConfig& cfg, int64_t records);

// Verifies a checkpoint before resuming from it: written by cfg.trainer, checksums intact, and
// a saved config that differs from cfg only in safe keys (the differences are logged). Throws
// ConfigError naming the differing keys otherwise. Warns when data.train is no longer the file
// the checkpoint's run read (the sample order after resuming would differ). Returns the step.
int64_t check_resume_checkpoint(const std::string& dir, const RunConfig& cfg);

// After resuming from `dir`: warns when the training set now has another number of usable
// records than the checkpoint's run had (the manifest is unchanged, but with data.on_bad_record:
// skip or train.on_bad_batch: skip an image that vanished or broke since changes every epoch's order).
// `now`: train_data_record of the dataset as built for the resumed run.
void warn_if_train_records_changed(const std::string& dir, const RunConfig& cfg, const nlohmann::json& now);

// After loading the checkpoint of `step`: sets later checkpoints aside and drops their records
// from RUN/metrics.jsonl, so the run reads as one uninterrupted run.
void forget_after_step(const std::string& run_dir, int64_t step);

// The step loop's bookkeeping, the same in every trainer.
// A log step: appends {"step", "split": "train", "loss", "lr", "grad_norm", "metrics",
// "data_wait_s"} to the metrics log and the loss to result.logged_losses; returns the record
// (its "metrics" feed the progress line).
nlohmann::json record_train_step(MetricsLog& log, TrainResult& result, int64_t step, const torch::Tensor& loss,
                                 const std::map<std::string, torch::Tensor>& metrics, double lr, double grad_norm,
                                 double data_wait_s, int64_t skipped_steps = 0);
// After optimizer step `step`: evaluation at train.eval_every, then on a stop request (signal or
// opt.stop_at_step) a checkpoint, `result` marked interrupted and true (the trainer returns it),
// else a checkpoint at train.save_every. `save` writes a checkpoint and returns its folder.
bool after_step(const RunConfig& cfg, const TrainOptions& opt, int64_t step, TrainResult& result,
                const std::function<std::string()>& save, const std::function<void()>& eval);
// The end of a run: the final checkpoint (a resumed, already finished run keeps `resumed_from`),
// the final evaluation into result.final_eval and RUN/eval.json, and the "done" line.
void finish_run(const RunConfig& cfg, int64_t start, int64_t step, const std::string& resumed_from, double elapsed_s,
                TrainResult& result, const std::function<std::string()>& save,
                const std::function<nlohmann::json()>& eval);

// What a step does when its batch cannot be built or its loss or gradient norm is not finite
// (train.on_bad_batch, train.on_nonfinite). "stop": a checkpoint of the last good state, then
// the error; "skip": no update for the step, a warning, and the count in the metrics log.
// train.max_skipped_steps skips in a row stop the run. Every rank takes the same decision.
class StepGuard {
 public:
  StepGuard(const RunConfig& cfg, const TrainOptions& opt, std::function<std::string()> save)
      : cfg_(cfg), opt_(opt), save_(std::move(save)) {}
  // The batch of step `step` (1-based, the step about to run), or false when it is skipped.
  template <class Loader, class Batch>
  bool next_batch(Loader& loader, int64_t step, Batch& batch) {
    std::string error;
    try {
      batch = loader.next();
    } catch (const DataError& e) {  // a bad record or image; anything else is a bug and propagates
      error = e.what();
    }
    return batch_ok(step, error);
  }
  // After backward and reduce_gradients: clips the gradients and returns their global norm, or
  // nothing when the step must not be applied (the caller skips optimizer.step()).
  std::optional<double> clip(int64_t step, const torch::Tensor& loss, const std::vector<torch::Tensor>& params);
  int64_t skipped() const { return skipped_; }

 private:
  bool batch_ok(int64_t step, const std::string& error);
  void skip(int64_t step, const std::string& why);
  const RunConfig& cfg_;
  const TrainOptions& opt_;
  std::function<std::string()> save_;
  int64_t skipped_ = 0, in_a_row_ = 0;
};

// SIGTERM/SIGINT set this flag; trainers finish the step, checkpoint and exit with
// kExitInterrupted.
void install_stop_handlers();  // also clears a previous request
bool stop_requested();

// A stop request met inside an evaluation (held-out loss, generation, probes: minutes on a large
// set). The evaluation is abandoned rather than finished, so the checkpoint the stop asks for is
// not held up past a scheduler's grace period (Slurm's KillWait is 30 s by default).
struct EvaluationStopped : std::runtime_error {
  EvaluationStopped() : std::runtime_error("evaluation abandoned: stop requested") {}
};
// Called once per batch by the evaluation loops: throws EvaluationStopped after a stop signal.
void stop_point();
// eval(), or nullopt (with a warning naming the step) when a stop signal abandoned it. The
// trainers evaluate through this, so an abandoned evaluation writes no metrics.
std::optional<nlohmann::json> evaluate_unless_stopped(const std::function<nlohmann::json()>& eval, int64_t step);
// Whether the evaluation at `step` writes its val record to metrics.jsonl: after this process's
// training steps always; for a resumed, finished run (step == start) only when its final
// evaluation was abandoned (no RUN/eval.json), so the record is written once either way.
bool eval_record_due(const RunConfig& cfg, int64_t step, int64_t start);

// Called by every rank after each phase before the first training step (`during` names it):
// throws StoppedBeforeTraining when a stop signal reached any rank, so a run stopped while it
// checks images, caches reference log-probs or evaluates its starting point trains no step.
void stop_before_training_if_requested(const std::string& during);
// Tests: called with the phase's name as stop_before_training_if_requested begins; a test
// raises SIGTERM there. Empty by default.
void set_before_training_hook(std::function<void(const std::string& during)> hook);

// Tests: called with the step as each evaluation through evaluate_unless_stopped begins (0 = the
// one before the first step); a test raises SIGTERM there to stop in mid-evaluation. Empty by default.
void set_evaluation_hook(std::function<void(int64_t step)> hook);

}  // namespace trialign
