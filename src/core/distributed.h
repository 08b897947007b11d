// Multi-process data parallel on PyTorch's c10d process groups (Gloo on CPU; NCCL when built
// against a CUDA LibTorch). One process per rank; the launcher's environment says who is who:
//   torchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//   Slurm      inside an srun step: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
//              SLURM_STEP_TASKS_PER_NODE (+ MASTER_ADDR when the job spans nodes)
//   trialign   `trialign train --nproc N` spawns N local workers with torchrun's variables
// Without any of them the process is rank 0 of 1 and every call here is a cheap no-op, so the
// trainers call them unconditionally.
//
// How the trainers use it: parameters are broadcast from rank 0 once the model is built;
// every rank computes its slice of the global batch (data/sampler.h) with a loss normalised by
// the whole global batch, then gradients are summed across ranks (all_reduce_gradients), so
// the update equals one process running the global batch. Rank 0 alone writes logs, metrics and
// checkpoints. The c10d headers stay in distributed.cpp.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace trialign {

struct DistributedSection;

namespace dist {

// Who this process is, from the environment.
struct LaunchInfo {
  int rank = 0, world_size = 1, local_rank = 0, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string launcher = "none";  // none | torchrun | slurm
  std::string store_prefix;       // torchrun's agent store: the workers' key prefix
  bool store_is_server = true;    // rank 0 serves the rendezvous store (unless torchrun's agent does)
};
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
// Reads the variables above (a lookup function so tests can pass their own). Inconsistent
// values (rank >= world size, a non-number, Slurm without MASTER_ADDR on several nodes) are a
// ConfigError naming the variable.
LaunchInfo launch_info(const EnvLookup& env);
LaunchInfo launch_info();  // from the process environment

// Joins the process group when the environment names more than one rank (idempotent: a
// pipeline's stages share the group). `backend` auto picks gloo on the CPU.
void init(const DistributedSection& cfg);
bool active();  // world size > 1
int rank();
int world_size();
int local_world_size();
bool is_main();  // rank 0: logs, metrics and checkpoints
std::string backend();

// Collectives. `what` names the operation in the error a failed collective raises (a dead or
// stuck rank): "rank 1: all-reduce of gradients failed after 30s: ...". All no-ops at world 1.
void barrier(const std::string& what);
double sum(double v, const std::string& what);
bool any(bool flag);  // true on every rank when it is true on one (stop requests)
// Rank 0's tensors copied into every rank's (parameters after init or resume).
void broadcast(const std::vector<torch::Tensor>& tensors, const std::string& what);
std::string broadcast_string(const std::string& s);
// Sums every parameter's gradient across ranks in flat buckets of about bucket_bytes. A
// gradient undefined on some ranks and defined on others counts as zeros there; one undefined
// everywhere stays undefined (the optimizer skips it, as it would in one process).
void all_reduce_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes);
// Each logged scalar summed across ranks (the trainers make them shares of the global batch).
// Every rank must log the same metric names (a loss whose metrics depend on its batch would
// otherwise sum one rank's value into another's name): checked in the same all-reduce, and a
// mismatch throws naming this rank's metrics.
void sum_metrics(torch::Tensor& loss, std::map<std::string, torch::Tensor>& metrics);
// (s, s^2) of a 20-bit signature of the names, as float64: summed over W ranks they satisfy
// W * sum(s^2) == sum(s)^2 exactly when every rank has the same names (exact below 8192 ranks).
std::pair<double, double> metric_names_signature(const std::map<std::string, torch::Tensor>& metrics);
// Every rank's rows, in rank order ([sum of n_r, ...]); differentiable: the gradient of the
// gathered rows is summed across ranks and each rank keeps its own rows' share. Ranks may hold
// different row counts. Returns x unchanged at world 1. `offset` gets this rank's first row.
torch::Tensor gather_rows(const torch::Tensor& x, int64_t* offset = nullptr);

// `trialign ... --nproc N`: runs this program N times with torchrun's variables for one node
// (a free loopback port), forwards SIGINT/SIGTERM, and when a rank fails stops the others.
// `args` is the command line without --nproc. Returns the exit code to use: the first failing
// rank's, else 0.
int launch_local(int nproc, const std::vector<std::string>& args);

}  // namespace dist
}  // namespace trialign
