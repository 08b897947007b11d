#include "core/distributed.h"

// ProcessGroupGloo.hpp declares its class only under this macro (LibTorch's own build defines it).
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>
#ifdef TRIALIGN_WITH_NCCL
#define USE_C10D_NCCL 1
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/errors.h"
#include "core/run_config.h"

namespace trialign::dist {

namespace {

// LibTorch 1.x: the Gloo and NCCL groups are ProcessGroups; 2.x: Backends under a ProcessGroup
// facade. Both offer the same collectives, so the concrete group is held through whichever base.
#if TORCH_VERSION_MAJOR >= 2
using Group = c10d::Backend;
#else
using Group = c10d::ProcessGroup;
#endif

struct State {
  c10::intrusive_ptr<Group> pg;
  LaunchInfo info;
  std::string backend = "none";
  int64_t timeout_s = 1800;
};
State& state() {
  static State s = [] {
    State st;
    // Who this process is, known before the group exists (logging starts earlier); a broken
    // environment is reported by init().
    try {
      st.info = launch_info();
    } catch (const std::exception&) {
    }
    return st;
  }();
  return s;
}

// Waits for a collective; a failure (peer gone, timeout) becomes one message naming this rank,
// the operation and what to look at.
void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    throw std::runtime_error("rank " + std::to_string(state().info.rank) + " of " + std::to_string(state().info.world_size) +
                             ": " + what + " failed (another rank exited or did not answer within distributed.timeout_s = " +
                             std::to_string(state().timeout_s) + " s; its own log says why): " + e.what());
  }
}

int parse_int(const std::string& name, const std::string& value) {
  try {
    size_t used = 0;
    const int v = std::stoi(value, &used);
    // Slurm's per-node counts read "2(x3)": the leading number is the count.
    if (used == value.size() || value[used] == '(' || value[used] == ',') return v;
  } catch (const std::exception&) {
  }
  throw ConfigError("environment variable " + name + "='" + value + "' is not a number");
}

// Calls fn on flat buffers holding `tensors` (grouped by dtype, about `bytes` each), then copies
// the buffers back: one collective per bucket instead of one per tensor.
void for_buckets(const std::vector<torch::Tensor>& tensors, int64_t bytes,
                 const std::function<void(std::vector<torch::Tensor>&)>& collective) {
  std::map<at::ScalarType, std::vector<torch::Tensor>> by_type;
  for (const auto& t : tensors) by_type[t.scalar_type()].push_back(t);
  for (auto& [type, list] : by_type) {
    size_t i = 0;
    while (i < list.size()) {
      std::vector<torch::Tensor> bucket;
      int64_t size = 0;
      while (i < list.size() && (bucket.empty() || size + list[i].nbytes() <= static_cast<size_t>(bytes))) {
        size += static_cast<int64_t>(list[i].nbytes());
        bucket.push_back(list[i++]);
      }
      std::vector<torch::Tensor> flat_views;
      for (const auto& t : bucket) flat_views.push_back(t.reshape({-1}));
      std::vector<torch::Tensor> flat = {torch::cat(flat_views)};
      collective(flat);
      int64_t at = 0;
      torch::NoGradGuard ng;
      for (auto& t : bucket) {
        const int64_t n = t.numel();
        t.copy_(flat[0].slice(0, at, at + n).view_as(t));
        at += n;
      }
    }
  }
}

}  // namespace

LaunchInfo launch_info(const EnvLookup& env) {
  LaunchInfo li;
  auto num = [&](const std::string& name, int fallback) {
    const auto v = env(name);
    return v ? parse_int(name, *v) : fallback;
  };
  if (env("RANK") && env("WORLD_SIZE")) {
    li.launcher = "torchrun";
    li.rank = num("RANK", 0);
    li.world_size = num("WORLD_SIZE", 1);
    li.local_rank = num("LOCAL_RANK", 0);
    li.local_world_size = num("LOCAL_WORLD_SIZE", 1);
    if (li.world_size > 1 && !env("MASTER_ADDR"))
      throw ConfigError("WORLD_SIZE=" + std::to_string(li.world_size) +
                        " but MASTER_ADDR is not set: torchrun sets it; when starting ranks by hand set MASTER_ADDR and "
                        "MASTER_PORT to rank 0's host and a free port");
    // torchrun >= 2.x may serve the rendezvous store from its agent; workers then join it as
    // clients under the agent's key prefix.
    if (env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True") {
      li.store_is_server = false;
      li.store_prefix = "/worker/attempt_" + env("TORCHELASTIC_RESTART_COUNT").value_or("0");
    }
  } else if (env("SLURM_PROCID") && env("SLURM_STEP_NUM_TASKS")) {
    // Inside a job step that srun started (the batch script itself also sees SLURM_NTASKS, but
    // it is one process: it must not wait for ranks that will never come).
    li.launcher = "slurm";
    li.rank = num("SLURM_PROCID", 0);
    li.world_size = num("SLURM_STEP_NUM_TASKS", 1);
    li.local_rank = num("SLURM_LOCALID", 0);
    li.local_world_size = num("SLURM_STEP_TASKS_PER_NODE", num("SLURM_NTASKS_PER_NODE", num("SLURM_TASKS_PER_NODE", 1)));
    if (li.world_size > 1 && !env("MASTER_ADDR") && num("SLURM_NNODES", 1) > 1)
      throw ConfigError("Slurm job on " + std::to_string(num("SLURM_NNODES", 1)) +
                        " nodes but MASTER_ADDR is not set; in the batch script: export MASTER_ADDR=$(scontrol show "
                        "hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)");
  } else {
    return li;
  }
  li.master_addr = env("MASTER_ADDR").value_or("127.0.0.1");
  li.master_port = num("MASTER_PORT", 29500);
  if (li.world_size < 1) throw ConfigError("world size " + std::to_string(li.world_size) + " (" + li.launcher + "): must be >= 1");
  if (li.rank < 0 || li.rank >= li.world_size)
    throw ConfigError("rank " + std::to_string(li.rank) + " is outside world size " + std::to_string(li.world_size) + " (" +
                      li.launcher + " environment)");
  if (li.local_world_size < 1) li.local_world_size = 1;
  if (li.local_rank < 0)
    throw ConfigError("local rank " + std::to_string(li.local_rank) + " is negative (" + li.launcher + " environment)");
  if (li.master_port < 1 || li.master_port > 65535)
    throw ConfigError("MASTER_PORT=" + std::to_string(li.master_port) + " is not a TCP port");
  return li;
}

LaunchInfo launch_info() {
  return launch_info([](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (!v) return std::nullopt;
    return std::string(v);
  });
}

void init(const DistributedSection& cfg) {
  auto& s = state();
  if (s.pg) return;  // a pipeline's later stage: the group exists
  s.info = launch_info();
  s.timeout_s = cfg.timeout_s;
  if (s.info.world_size == 1) return;
  const auto timeout = std::chrono::seconds(cfg.timeout_s);
  std::string backend = cfg.backend == "auto" ? "gloo" : cfg.backend;  // auto: the model is on the CPU
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(s.info.master_port);
  so.isServer = s.info.rank == 0 && s.info.store_is_server;
  so.numWorkers = static_cast<size_t>(s.info.world_size);
  so.waitWorkers = s.info.store_is_server;
  so.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(s.info.master_addr, so);
  } catch (const std::exception& e) {
    throw std::runtime_error("rank " + std::to_string(s.info.rank) + ": rendezvous at " + s.info.master_addr + ":" +
                             std::to_string(s.info.master_port) + " failed (every rank must start within " +
                             std::to_string(cfg.timeout_s) + " s, and MASTER_PORT must be free on rank 0's host): " + e.what());
  }
  if (!s.info.store_prefix.empty()) store = c10::make_intrusive<c10d::PrefixStore>(s.info.store_prefix, store);
  store = c10::make_intrusive<c10d::PrefixStore>("trialign", store);
  try {
    if (backend == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // Loopback for a single machine; otherwise GLOO_SOCKET_IFNAME or the host name's address.
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      const bool local = s.info.master_addr == "127.0.0.1" || s.info.master_addr == "localhost";
      opts->devices.push_back(ifname   ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                              : local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                      : c10d::ProcessGroupGloo::createDefaultDevice());
      s.pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, s.info.rank, s.info.world_size, opts);
    } else {
#ifdef TRIALIGN_WITH_NCCL
      c10::cuda::set_device(static_cast<c10::DeviceIndex>(s.info.local_rank));
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      s.pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, s.info.rank, s.info.world_size, opts);
#else
      throw ConfigError("distributed.backend: nccl, but this build of trialign has no NCCL (it was built against a "
                        "CPU-only LibTorch); use gloo");
#endif
    }
  } catch (const ConfigError&) {
    throw;
  } catch (const std::exception& e) {
    throw std::runtime_error("rank " + std::to_string(s.info.rank) + ": cannot create the " + backend +
                             " process group: " + e.what());
  }
  s.backend = backend;
}

bool active() { return state().pg.defined(); }
int rank() { return state().info.rank; }
int world_size() { return active() ? state().info.world_size : 1; }
int local_world_size() { return active() ? state().info.local_world_size : 1; }
bool is_main() { return state().info.rank == 0; }
std::string backend() { return state().backend; }

void barrier(const std::string& what) {
  if (!active()) return;
  // A one-element all-reduce: it fails like every other collective when a rank is gone.
  std::vector<at::Tensor> t = {torch::zeros({1})};
  wait(state().pg->allreduce(t), what);
}

double sum(double v, const std::string& what) {
  if (!active()) return v;
  std::vector<at::Tensor> t = {torch::tensor({v}, torch::kFloat64)};
  wait(state().pg->allreduce(t), what);
  return t[0].item<double>();
}

bool any(bool flag) { return sum(flag ? 1.0 : 0.0, "agreeing on a stop request") > 0; }

void broadcast(const std::vector<torch::Tensor>& tensors, const std::string& what) {
  if (!active()) return;
  c10d::BroadcastOptions o;
  o.rootRank = 0;
  for_buckets(tensors, 64 << 20, [&](std::vector<torch::Tensor>& flat) { wait(state().pg->broadcast(flat, o), what); });
}

std::string broadcast_string(const std::string& s) {
  if (!active()) return s;
  std::vector<at::Tensor> n = {torch::tensor({static_cast<int64_t>(s.size())}, torch::kInt64)};
  c10d::BroadcastOptions o;
  o.rootRank = 0;
  wait(state().pg->broadcast(n, o), "broadcast of rank 0's choice");
  std::vector<at::Tensor> bytes = {torch::zeros({std::max<int64_t>(1, n[0].item<int64_t>())}, torch::kUInt8)};
  if (is_main()) std::memcpy(bytes[0].data_ptr(), s.data(), s.size());
  wait(state().pg->broadcast(bytes, o), "broadcast of rank 0's choice");
  return std::string(reinterpret_cast<const char*>(bytes[0].data_ptr()), static_cast<size_t>(n[0].item<int64_t>()));
}

void all_reduce_gradients(const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  if (!active()) return;
  // Which gradients exist anywhere: a parameter no rank's loss reached stays without one.
  auto defined = torch::zeros({static_cast<int64_t>(params.size())}, torch::kFloat32);
  auto* d = defined.data_ptr<float>();
  for (size_t i = 0; i < params.size(); ++i) d[i] = params[i].grad().defined() ? 1.f : 0.f;
  std::vector<at::Tensor> flags = {defined};
  wait(state().pg->allreduce(flags), "all-reduce of gradient flags");
  std::vector<torch::Tensor> grads;
  for (size_t i = 0; i < params.size(); ++i) {
    if (d[i] == 0) continue;
    auto p = params[i];
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    grads.push_back(p.grad());
  }
  for_buckets(grads, bucket_bytes,
              [&](std::vector<torch::Tensor>& flat) { wait(state().pg->allreduce(flat), "all-reduce of gradients"); });
}

std::pair<double, double> metric_names_signature(const std::map<std::string, torch::Tensor>& metrics) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the sorted names, each ended by a NUL
  for (const auto& [k, v] : metrics) {
    for (char c : k + '\0') h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  }
  const double s = static_cast<double>(h & ((1u << 20) - 1)) + 1.0;  // 1..2^20: s^2 < 2^41
  return {s, s * s};
}

void sum_metrics(torch::Tensor& loss, std::map<std::string, torch::Tensor>& metrics) {
  if (!active()) return;
  // First the names' signature (a list of another length would not even line up in one
  // all-reduce), then the values. Called at the log interval only, so two collectives are cheap.
  const auto [sig, sig_sq] = metric_names_signature(metrics);
  std::vector<at::Tensor> check = {torch::tensor({sig, sig_sq}, torch::kFloat64)};
  wait(state().pg->allreduce(check), "all-reduce of logged metric names");
  const double sum = check[0][0].item<double>(), sum_sq = check[0][1].item<double>();
  if (sum_sq * state().info.world_size != sum * sum) {
    std::string names;
    for (const auto& [k, v] : metrics) names += (names.empty() ? "" : ", ") + k;
    throw std::runtime_error("rank " + std::to_string(state().info.rank) +
                             ": the ranks log different metric names (this rank: " + names +
                             "); a loss must return the same metrics on every batch, with zeros where a batch "
                             "has nothing to measure");
  }
  std::vector<torch::Tensor> values = {loss.detach().to(torch::kFloat64).reshape({1})};
  for (const auto& [k, v] : metrics) values.push_back(v.detach().to(torch::kFloat64).reshape({1}));
  std::vector<at::Tensor> flat = {torch::cat(values)};
  wait(state().pg->allreduce(flat), "all-reduce of logged metrics");
  loss = flat[0][0].to(torch::kFloat32);
  int64_t i = 1;
  for (auto& [k, v] : metrics) v = flat[0][i++].to(torch::kFloat32);
}

namespace {

// Autograd node of gather_rows: forward all-gathers (padded to the longest rank), backward sums
// the gathered rows' gradient over ranks and keeps this rank's slice.
struct GatherRows : public torch::autograd::Function<GatherRows> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor x) {
    auto& s = state();
    const int W = s.info.world_size;
    std::vector<at::Tensor> count = {torch::zeros({W}, torch::kInt64)};
    count[0][s.info.rank] = x.size(0);
    wait(s.pg->allreduce(count), "all-gather of row counts");
    std::vector<int64_t> counts(count[0].data_ptr<int64_t>(), count[0].data_ptr<int64_t>() + W);
    const int64_t longest = *std::max_element(counts.begin(), counts.end());
    auto shape = x.sizes().vec();
    shape[0] = longest;
    std::vector<at::Tensor> in = {torch::zeros(shape, x.options())};
    in[0].slice(0, 0, x.size(0)).copy_(x);
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < W; ++r) out[0].push_back(torch::empty(shape, x.options()));
    wait(s.pg->allgather(out, in), "all-gather of features");
    std::vector<torch::Tensor> rows;
    int64_t offset = 0;
    for (int r = 0; r < W; ++r) {
      rows.push_back(out[0][static_cast<size_t>(r)].slice(0, 0, counts[static_cast<size_t>(r)]));
      if (r < s.info.rank) offset += counts[static_cast<size_t>(r)];
    }
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["rows"] = x.size(0);
    return torch::cat(rows);
  }
  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx, torch::autograd::tensor_list grads) {
    std::vector<at::Tensor> g = {grads[0].contiguous().clone()};
    wait(state().pg->allreduce(g), "all-reduce of gathered features' gradients");
    const int64_t offset = ctx->saved_data["offset"].toInt(), rows = ctx->saved_data["rows"].toInt();
    return {g[0].slice(0, offset, offset + rows)};
  }
};

}  // namespace

torch::Tensor gather_rows(const torch::Tensor& x, int64_t* offset) {
  if (offset) *offset = 0;
  if (!active()) return x;
  // Every rank must run the backward all-reduce, including one whose rows need no gradient (an
  // empty set of hard negatives): otherwise the ranks' collectives pair up wrongly.
  const torch::Tensor in = torch::GradMode::is_enabled() && !x.requires_grad() ? x.detach().requires_grad_(true) : x;
  auto& s = state();
  if (offset) {
    // The same counts the forward gathers; cheap next to the features themselves.
    std::vector<at::Tensor> count = {torch::zeros({s.info.world_size}, torch::kInt64)};
    count[0][s.info.rank] = x.size(0);
    wait(s.pg->allreduce(count), "all-gather of row counts");
    *offset = count[0].slice(0, 0, s.info.rank).sum().item<int64_t>();
  }
  return GatherRows::apply(in.contiguous());
}

// ---- the local launcher ----

namespace {

volatile sig_atomic_t g_forward_signal = 0;
extern "C" void remember_signal(int sig) { g_forward_signal = sig; }

int free_loopback_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("--nproc: cannot open a socket to find a free port");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    throw std::runtime_error("--nproc: cannot find a free loopback port");
  }
  const int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

}  // namespace

int launch_local(int nproc, const std::vector<std::string>& args) {
  if (nproc < 1) throw ConfigError("--nproc " + std::to_string(nproc) + ": must be >= 1");
  if (std::getenv("RANK") && std::getenv("WORLD_SIZE"))
    throw ConfigError("--nproc inside a launched rank (RANK and WORLD_SIZE are set): use either torchrun/Slurm or --nproc");
  const int port = free_loopback_port();
  std::vector<pid_t> pids;
  // Before the first fork, so a Ctrl-C during start-up reaches the ranks through the loop below.
  std::signal(SIGINT, remember_signal);
  std::signal(SIGTERM, remember_signal);
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = fork();
    if (pid < 0) {
      for (const pid_t p : pids) kill(p, SIGKILL), waitpid(p, nullptr, 0);
      throw std::runtime_error("--nproc: fork failed for rank " + std::to_string(r));
    }
    if (pid == 0) {
      // A process group of its own: the terminal's Ctrl-C reaches the launcher only, which passes
      // it on once (a second SIGINT would make a rank quit without its checkpoint).
      setpgid(0, 0);
      std::signal(SIGINT, SIG_DFL);
      std::signal(SIGTERM, SIG_DFL);
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      unsetenv("TORCHELASTIC_USE_AGENT_STORE");
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      execv("/proc/self/exe", argv.data());
      std::perror("--nproc: exec");
      _exit(127);
    }
    pids.push_back(pid);
  }
  int first_failure = 0, failed_rank = -1, running = nproc;
  bool interrupted = false;  // a rank stopped on a signal after its checkpoint (exit 75)
  std::vector<bool> done(static_cast<size_t>(nproc), false);
  auto deadline = std::chrono::steady_clock::time_point::max();
  while (running > 0) {
    if (const int sig = g_forward_signal) {  // the user's Ctrl-C / the scheduler's SIGTERM: every rank checkpoints
      g_forward_signal = 0;
      for (int r = 0; r < nproc; ++r)
        if (!done[static_cast<size_t>(r)]) kill(pids[static_cast<size_t>(r)], sig);
    }
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      const auto it = std::find(pids.begin(), pids.end(), pid);
      if (it == pids.end()) continue;
      const int r = static_cast<int>(it - pids.begin());
      done[static_cast<size_t>(r)] = true;
      --running;
      const int code = exit_code_of(status);
      if (code == kExitInterrupted) interrupted = true;
      // A rank whose peer vanished fails too, with kExitRuntime, and may be reaped before the rank
      // that caused it (its teardown closes the sockets before it exits): a config or data error
      // (exit 2) is always a cause, never a consequence, so it is the one reported.
      if (code == kExitConfig && first_failure == kExitRuntime) first_failure = code, failed_rank = r;
      if (code != 0 && code != kExitInterrupted && first_failure == 0) {
        first_failure = code, failed_rank = r;
        if (running > 0) {
          std::fprintf(stderr, "trialign --nproc: rank %d exited with code %d; stopping the other ranks\n", r, code);
          for (int k = 0; k < nproc; ++k)
            if (!done[static_cast<size_t>(k)]) kill(pids[static_cast<size_t>(k)], SIGTERM);
          deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
        }
      }
      continue;
    }
    if (std::chrono::steady_clock::now() > deadline) {  // a rank ignored SIGTERM (stuck in a collective)
      for (int k = 0; k < nproc; ++k)
        if (!done[static_cast<size_t>(k)]) kill(pids[static_cast<size_t>(k)], SIGKILL);
      deadline = std::chrono::steady_clock::time_point::max();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (failed_rank >= 0 && nproc > 1)
    std::fprintf(stderr, "trialign --nproc: failed (rank %d first, exit code %d)\n", failed_rank, first_failure);
  return first_failure != 0 ? first_failure : interrupted ? kExitInterrupted : 0;
}

}  // namespace trialign::dist
