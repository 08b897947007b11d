#include "trainers/common.h"

#include <fnmatch.h>

#include "models/vlm.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <dlfcn.h>
#include <opencv2/core.hpp>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <set>
#include <thread>

#include <spdlog/spdlog.h>

#include <filesystem>
#include <fcntl.h>
#include <malloc.h>
#include <sys/file.h>
#include <unistd.h>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/config_tree.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/logging.h"
#include "core/safetensors.h"
#include "trainers/resume_state.h"
#include "core/json_text.h"

namespace trialign {

namespace {
// Busy-wait iterations of an idle OpenMP thread before it sleeps (libgomp's GOMP_SPINCOUNT; its
// default is 300,000, which keeps the cores busy through an OpenBLAS GEMM). A few tens of
// microseconds: a bf16 step's many short parallel ops find their threads awake (sleeping ones,
// OMP_WAIT_POLICY=PASSIVE, cost the stage-3 card 15-20 % in bf16 with AMX), and an fp32 GEMM
// gets OpenBLAS's threads its cores back almost at once (docs/benchmarks.md, "bf16 with AMX").
constexpr const char* kSpinCount = "10000";
constexpr double kShortSpin = 1e6;  // a user's GOMP_SPINCOUNT up to this still frees the cores soon
}  // namespace

bool passive_openmp() {
  if (const char* p = std::getenv("OMP_WAIT_POLICY")) return std::string(p) == "PASSIVE" || std::string(p) == "passive";
  const char* s = std::getenv("GOMP_SPINCOUNT");
  if (!s || !*s) return false;
  char* end = nullptr;
  const double n = std::strtod(s, &end);
  return *end == '\0' && n >= 0 && n <= kShortSpin;
}

void restart_with_passive_openmp(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") || std::getenv("GOMP_SPINCOUNT") || std::getenv("TRIALIGN_NO_RESTART"))
    return;  // the user's choice stands
  ::setenv("GOMP_SPINCOUNT", kSpinCount, 1);
  ::setenv("TRIALIGN_NO_RESTART", "1", 1);  // never loop, whatever the exec does
  ::execv("/proc/self/exe", argv);
  ::unsetenv("GOMP_SPINCOUNT");  // exec failed: carry on as started (OpenBLAS then stays at one thread)
}

int setup_threads(int requested) {
  const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  // Far more threads than cores only slows every op down; a pool of 100,000 threads never
  // finishes starting (and ignores SIGTERM meanwhile).
  if (requested > 4 * cores)
    throw ConfigError("threads: " + std::to_string(requested) + " requested (run.threads or --threads), but this machine has " +
                      std::to_string(cores) + " cores; use at most " + std::to_string(4 * cores) +
                      ", or 0 for one per core");
  int n = requested > 0 ? requested : cores;
  at::set_num_threads(n);
  // fp32 matmuls run inside OpenBLAS, whose own threads are the only parallelism a single GEMM
  // gets: one OpenBLAS thread halves its FLOP/s on 2 cores (60 vs 120 GFLOP/s). Its threads only
  // contend with LibTorch's OpenMP pool while idle OpenMP threads spin, which
  // restart_with_passive_openmp() keeps short (docs/benchmarks.md, "The bench card").
  using SetThreads = void (*)(int);
  if (auto* f = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    f(passive_openmp() ? n : 1);
  cv::setNumThreads(1);  // loader threads parallelise across images; nested pools only contend
  // glibc hands tensors above its mmap threshold (dynamic, at most 32 MiB) to mmap and returns
  // freed heap tops to the kernel; a training step frees and re-allocates the same activation
  // buffers every time, so each step page-faults them in again (measured on stage 1 with three
  // hard negatives per pair, 2 cores: half the CPU time in the kernel; 31 -> 63 samples/s).
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  return n;
}

namespace {

void set_signal_rank(int rank);

// run.out_dir without checkpoints: a new folder, or one where an earlier attempt stopped before
// its first save. Refused when it is plainly something else, whose files a run would mix with its
// own: a pipeline's root, a run's checkpoints folder, or a folder with subfolders of its own
// (a dataset, a home folder, /). Other files (a Slurm log, .gitkeep, an eval --out) are left as
// they are, with a note. The signs are stable files, so every rank decides alike.
void check_run_folder(const std::string& out_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(out_dir, ec) || has_checkpoints(out_dir)) return;
  static const std::set<std::string> ours = {"config.yaml",    "train.log",       "metrics.jsonl", "eval.json",
                                             "image_check.json", "init_from.json", "stage_done.json", "stage_started.json", "checkpoints",
                                             "bench.json",     "bench_images",     ".trialign.lock"};
  std::vector<std::string> folders, files;
  bool pipeline = false, checkpoints = false;
  for (const auto& e : fs::directory_iterator(out_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (ours.count(name) || name.rfind("metrics.abandoned-", 0) == 0) continue;
    pipeline |= name == "pipeline.json";
    checkpoints |= name == "latest" || name.rfind("step_", 0) == 0;
    (e.is_directory(ec) ? folders : files).push_back(name);
  }
  auto listed = [](std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    std::string list;
    for (size_t i = 0; i < v.size() && i < 5; ++i) list += (i ? ", " : "") + v[i];
    if (v.size() > 5) list += ", ... (" + std::to_string(v.size()) + " in all)";
    return list;
  };
  const std::string what = pipeline      ? "a pipeline's folder (its stages are the folders inside)"
                           : checkpoints ? "a run's checkpoints folder (the run folder is the one above it)"
                                         : "a folder with subfolders of its own (" + listed(folders) + ")";
  if (pipeline || checkpoints || !folders.empty())
    throw ConfigError("run.out_dir '" + out_dir + "' is " + what +
                      ", not a run folder: the run's config.yaml, train.log, metrics.jsonl and checkpoints/ would mix "
                      "with what is there. Choose a new or empty run.out_dir");
  if (!files.empty() && dist::is_main())
    spdlog::info("run.out_dir {} also holds {}; left as they are", out_dir, listed(files));
}

// Who holds a run folder's lock, from the text its last trialign holder wrote ("pid N on HOST").
// The flock is what counts: a process that is not trialign (a `flock` command, a copy of the
// descriptor) can hold it with an older holder's text still in the file.
std::string describe_lock_holder(const std::string& holder) {
  char host[128] = {0};
  ::gethostname(host, sizeof(host) - 1);
  long pid = 0;
  char on[128] = {0};
  if (holder.empty() || std::sscanf(holder.c_str(), "pid %ld on %127s", &pid, on) != 2 || pid <= 0)
    return "is locked by another process";
  if (std::string(on) != host) return "is in use by another trialign process (" + holder + ", as it recorded)";
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
    return "is locked by another process (not pid " + std::to_string(pid) +
           ", the last trialign process recorded there: it has ended)";
  return "is in use by another trialign process (" + holder + ")";
}

}  // namespace

RunFolderLock RunFolderLock::acquire(const std::string& out_dir, Kind kind) {
  const bool pipeline = kind == Kind::Pipeline;
  const std::string key = pipeline ? "the pipeline's out_dir" : "run.out_dir";
  const std::string path =
      (std::filesystem::path(out_dir) / (pipeline ? ".trialign-pipeline.lock" : ".trialign.lock")).string();
  // O_CLOEXEC: processes this one starts (a plugin build, --nproc ranks) must not inherit the hold.
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    spdlog::warn("cannot open {} ({}): {} is not locked against a second run", path, std::strerror(errno), key);
    return RunFolderLock();
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err != EWOULDBLOCK) {
      ::close(fd);
      spdlog::warn("cannot lock {} ({}): {} is not locked against a second run", path, std::strerror(err), key);
      return RunFolderLock();
    }
    char buf[256] = {0};
    const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
    ::close(fd);
    std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    if (pipeline)
      throw ConfigError(key + " '" + out_dir + "' " + describe_lock_holder(holder) +
                        ": two runs of one pipeline would train its stages at once. Wait for it to finish (or stop "
                        "it: it checkpoints on Ctrl-C / SIGTERM), or set another out_dir in the pipeline file");
    throw ConfigError(key + " '" + out_dir + "' " + describe_lock_holder(holder) +
                      ": two runs in one folder would mix their checkpoints and metrics. Wait for it to finish "
                      "(or stop it: it checkpoints on Ctrl-C / SIGTERM), or choose another run.out_dir");
  }
  // Who holds it, for the message above; the lock itself is the flock, not this text.
  char host[128] = {0};
  ::gethostname(host, sizeof(host) - 1);
  const std::string who = "pid " + std::to_string(::getpid()) + " on " + host + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, who.data(), who.size(), 0) < 0)
    spdlog::debug("cannot write the holder into {}", path);
  RunFolderLock lock;
  lock.fd_ = fd;
  return lock;
}

RunFolderLock& RunFolderLock::operator=(RunFolderLock&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

RunFolderLock::~RunFolderLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the flock
}

PreparedRun prepare_run(const RunConfig& cfg) {
  install_stop_handlers();
  dist::init(cfg.distributed);
  set_signal_rank(dist::rank());
  std::error_code ec;
  // A checkpoint folder as run.out_dir: its config.yaml (and train.log) would be overwritten,
  // and the checkpoint would fail its own MANIFEST check from then on.
  if (std::filesystem::exists(std::filesystem::path(cfg.run.out_dir) / "MANIFEST.json", ec))
    throw ConfigError("run.out_dir '" + cfg.run.out_dir +
                      "' is a checkpoint folder (it holds MANIFEST.json), not a run folder; training there would "
                      "overwrite that checkpoint's files. Choose another run.out_dir (to start from these weights, "
                      "name the checkpoint in init_from)");
  check_run_folder(cfg.run.out_dir);
  std::filesystem::create_directories(cfg.run.out_dir, ec);
  if (ec || !std::filesystem::is_directory(cfg.run.out_dir))
    throw ConfigError("run.out_dir: cannot create '" + cfg.run.out_dir + "': " + ec.message());
  PreparedRun prepared;
  // Rank 0 alone writes the folder, so it alone holds it; every rank learns the outcome, so all
  // stop alike instead of the others waiting in a collective for a rank that has gone.
  std::string refused;
  if (dist::is_main()) {
    try {
      prepared.lock = RunFolderLock::acquire(cfg.run.out_dir);
    } catch (const ConfigError& e) {
      refused = e.what();
    }
  }
  if (dist::sum(refused.empty() ? 0.0 : 1.0, "run.out_dir lock") > 0)
    throw ConfigError(!refused.empty() ? refused
                                       : "run.out_dir '" + cfg.run.out_dir +
                                             "' is in use by another trialign process (rank 0 names it)");
  init_logging((std::filesystem::path(cfg.run.out_dir) / "train.log").string(), dist::rank());
  // Ranks sharing a machine share its cores: "all cores" means this rank's part of them.
  int threads = cfg.run.threads;
  if (threads == 0 && dist::local_world_size() > 1)
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / dist::local_world_size());
  threads = setup_threads(threads);
  if (dist::active())
    spdlog::info("data parallel: {} ranks ({} per machine), backend {}; train.batch_size {} per rank = {} samples per step",
                 dist::world_size(), dist::local_world_size(), dist::backend(), cfg.train.batch_size,
                 global_batch(cfg));
  prepared.threads = threads;
  return prepared;
}

int64_t global_batch(const RunConfig& cfg) { return static_cast<int64_t>(cfg.train.batch_size) * dist::world_size(); }

int world_size() { return dist::world_size(); }
int rank() { return dist::rank(); }

void sync_across_ranks(const std::vector<torch::Tensor>& tensors) {
  dist::broadcast(tensors, "broadcast of rank 0's parameters");
}

void reduce_gradients(const RunConfig& cfg, const std::vector<torch::Tensor>& params) {
  dist::all_reduce_gradients(params, cfg.distributed.bucket_mb << 20);
}

double sum_across_ranks(double v, const std::string& what) { return dist::sum(v, what); }

std::string save_on_main(const std::function<std::string()>& save) { return dist::is_main() ? save() : std::string(); }

MetricsLog open_metrics_log(const RunConfig& cfg) {
  if (!dist::is_main()) return MetricsLog();
  return MetricsLog((std::filesystem::path(cfg.run.out_dir) / "metrics.jsonl").string());
}

void write_run_text(const RunConfig& cfg, const std::string& name, const std::string& text) {
  if (dist::is_main()) atomic_write_text((std::filesystem::path(cfg.run.out_dir) / name).string(), text);
}

bool cpu_has_bf16() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("flags", 0) == 0)
      return line.find(" avx512_bf16") != std::string::npos || line.find(" amx_bf16") != std::string::npos;
  return false;
}

std::string resolve_precision(const std::string& requested) {
  if (requested != "auto") return requested;
  return cpu_has_bf16() ? "bf16" : "fp32";
}

AutocastGuard::AutocastGuard(bool enabled) : enabled_(enabled) {
  if (!enabled_) return;
  prev_enabled_ = at::autocast::is_cpu_enabled();
  prev_dtype_ = at::autocast::get_autocast_cpu_dtype();
  at::autocast::set_cpu_enabled(true);
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
}

AutocastGuard::~AutocastGuard() {
  if (!enabled_) return;
  at::autocast::set_cpu_enabled(prev_enabled_);
  at::autocast::set_autocast_cpu_dtype(prev_dtype_);
  at::autocast::clear_cache();
}

double lr_at(const ScheduleConfig& s, double base_lr, int64_t step, int64_t total) {
  if (s.warmup_steps > 0 && step < s.warmup_steps) return base_lr * (step + 1) / static_cast<double>(s.warmup_steps);
  if (s.type == "constant") return base_lr;
  const double span = std::max<int64_t>(1, total - s.warmup_steps);
  const double progress = std::min(1.0, (step - s.warmup_steps) / span);
  const double min_lr = s.min_lr_ratio * base_lr;
  if (s.type == "linear") return min_lr + (base_lr - min_lr) * (1.0 - progress);
  return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

std::vector<torch::optim::OptimizerParamGroup> adamw_groups(
    const std::vector<std::pair<std::string, torch::Tensor>>& named_trainable, const OptimConfig& cfg) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& [name, p] : named_trainable) {
    const bool is_embedding = name.find("embedding") != std::string::npos || name.find("embed_tokens") != std::string::npos;
    if (p.dim() >= 2 && !is_embedding) decay.push_back(p);
    else no_decay.push_back(p);
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  auto opts = [&](double wd) {
    auto o = std::make_unique<torch::optim::AdamWOptions>(cfg.lr);
    o->weight_decay(wd).betas({cfg.betas.at(0), cfg.betas.at(1)}).eps(cfg.eps);
    return o;
  };
  if (!decay.empty()) groups.emplace_back(decay, opts(cfg.weight_decay));
  if (!no_decay.empty()) groups.emplace_back(no_decay, opts(0.0));
  return groups;
}

void set_lr(torch::optim::Optimizer& opt, double lr) {
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
}

ParamPlan plan_param_groups(const std::vector<std::pair<std::string, torch::Tensor>>& named, const OptimConfig& cfg) {
  const auto& rules = cfg.param_groups;
  std::vector<int64_t> hits(rules.size(), 0);
  // Trainable weights per lr source (a rule's index, or -1 for optim.lr), for the log's lr.
  std::map<int, int64_t> numel_by_source;
  std::vector<double> lrs;  // distinct peak lrs in order of first appearance
  std::vector<std::vector<std::pair<std::string, torch::Tensor>>> by_lr;
  ParamPlan plan;
  for (const auto& [name, p] : named) {
    const ParamGroupRule* rule = nullptr;
    int rule_index = -1;
    for (size_t i = 0; i < rules.size() && !rule; ++i) {
      const auto& m = rules[i].match;
      if (m == component_of(name) || fnmatch(m.c_str(), name.c_str(), 0) == 0) {
        rule = &rules[i];
        rule_index = static_cast<int>(i);
        ++hits[i];
      }
    }
    if (rule && rule->freeze) {
      p.requires_grad_(false);
      plan.frozen.push_back(name);
      continue;
    }
    p.requires_grad_(true);
    plan.trainable.emplace_back(name, p);
    const double lr = rule && rule->lr > 0 ? rule->lr : cfg.lr;
    numel_by_source[rule && rule->lr > 0 ? rule_index : -1] += p.numel();
    auto it = std::find(lrs.begin(), lrs.end(), lr);
    if (it == lrs.end()) {
      lrs.push_back(lr);
      by_lr.emplace_back();
      it = lrs.end() - 1;
    }
    by_lr[static_cast<size_t>(it - lrs.begin())].emplace_back(name, p);
  }
  for (size_t i = 0; i < rules.size(); ++i)
    if (hits[i] == 0)
      throw ConfigError("optim.param_groups[" + std::to_string(i) + "].match: '" + rules[i].match +
                        "' matches no parameter (a component: vision_model, mm_projector, language_model in stages 2-3; "
                        "vision_model, text_model, visual_projection, text_projection in stage 1; or a glob such as "
                        "'model.layers.*'), or an earlier rule took all of them");
  if (plan.trainable.empty())
    throw ConfigError("optim.param_groups: every parameter is frozen; nothing would train");
  // Which lr each source applies (optim.lr, then the rules in order); optim.lr named when it reaches nothing,
  // so that `--set optim.lr=...` over rules that set their own lr is not mistaken for a change.
  int64_t most = -1;
  for (const auto& [source, numel] : numel_by_source) {
    const double lr = source < 0 ? cfg.lr : rules[static_cast<size_t>(source)].lr;
    if (numel > most) most = numel, plan.logged_lr = lr;
    if (!plan.lr_summary.empty()) plan.lr_summary += ", ";
    plan.lr_summary += (source < 0 ? std::string("optim.lr") : "param_groups[" + std::to_string(source) + "] (" +
                                                                   rules[static_cast<size_t>(source)].match + ")") +
                       " " + fmt::format("{:g}", lr) + " on " + std::to_string(numel) + " weights";
  }
  if (!numel_by_source.count(-1))
    plan.lr_summary += "; optim.lr (" + fmt::format("{:g}", cfg.lr) +
                       ") reaches no trainable parameter: set the rules' lr to change these";
  for (size_t k = 0; k < lrs.size(); ++k) {
    OptimConfig c = cfg;
    c.lr = lrs[k];
    for (auto& g : adamw_groups(by_lr[k], c)) {
      plan.groups.push_back(std::move(g));
      plan.base_lrs.push_back(lrs[k]);
    }
  }
  return plan;
}

void set_lr_scaled(torch::optim::Optimizer& opt, const std::vector<double>& base_lrs, double factor) {
  auto& groups = opt.param_groups();
  for (size_t g = 0; g < groups.size(); ++g)
    static_cast<torch::optim::AdamWOptions&>(groups[g].options()).lr(base_lrs.at(g) * factor);
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  std::vector<torch::Tensor> norms;
  for (const auto& p : params)
    if (p.grad().defined()) norms.push_back(p.grad().detach().norm(2).to(torch::kFloat32));
  if (norms.empty()) return 0.0;
  const double total = torch::stack(norms).norm(2).item<double>();
  if (max_norm > 0 && total > max_norm) {
    const double scale = max_norm / (total + 1e-6);
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().detach().mul_(scale);
  }
  return total;
}

torch::Tensor get_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

namespace {

// LibTorch keys an optimizer's per-parameter state by the parameter's TensorImpl address.
std::string state_key(const torch::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); }

torch::optim::AdamWOptions& adamw_options(torch::optim::OptimizerParamGroup& g, const std::string& path) {
  auto* o = dynamic_cast<torch::optim::AdamWOptions*>(&g.options());
  if (!o) throw DataError(path + ": only AdamW optimizer state is saved and restored");
  return *o;
}

}  // namespace

void save_optimizer_state(torch::optim::Optimizer& optim, const std::string& path) {
  NamedTensors tensors;
  nlohmann::json groups = nlohmann::json::array();
  int64_t i = 0;
  for (auto& g : optim.param_groups()) {
    const auto& o = adamw_options(g, path);
    groups.push_back({{"params", g.params().size()},
                      {"lr", o.lr()},
                      {"betas", {std::get<0>(o.betas()), std::get<1>(o.betas())}},
                      {"eps", o.eps()},
                      {"weight_decay", o.weight_decay()},
                      {"amsgrad", o.amsgrad()}});
    for (const auto& p : g.params()) {
      const std::string name = "state." + std::to_string(i++) + ".";
      auto it = optim.state().find(state_key(p));
      if (it == optim.state().end()) continue;  // never stepped (e.g. no gradient yet)
      const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      tensors.emplace_back(name + "step", torch::tensor({s.step()}, torch::kInt64));
      tensors.emplace_back(name + "exp_avg", s.exp_avg());
      tensors.emplace_back(name + "exp_avg_sq", s.exp_avg_sq());
      if (s.max_exp_avg_sq().defined()) tensors.emplace_back(name + "max_exp_avg_sq", s.max_exp_avg_sq());
    }
  }
  save_safetensors(path, tensors, {{"format", "trialign.adamw"}, {"param_groups", json_text(groups)}});
}

namespace {

void load_optimizer_state(torch::optim::Optimizer& optim, const std::string& path, const std::string& remedy) {
  auto fail = [&](const std::string& why) {
    throw DataError(path + " does not restore this run's optimizer (" + why + ")" + remedy);
  };
  std::map<std::string, std::string> meta;
  std::map<std::string, torch::Tensor> tensors;
  try {
    tensors = load_safetensors(path, &meta);
  } catch (const DataError& e) {
    fail(e.what());
  }
  nlohmann::json groups;
  try {
    groups = nlohmann::json::parse(meta.at("param_groups"));
  } catch (const std::exception&) {
    fail("no readable 'param_groups' in its metadata");
  }
  auto& ours = optim.param_groups();
  if (!groups.is_array() || groups.size() != ours.size())
    fail("it has " + std::to_string(groups.is_array() ? groups.size() : 0) + " parameter groups, this run has " +
         std::to_string(ours.size()));
  int64_t i = 0;
  std::vector<std::pair<std::string, std::unique_ptr<torch::optim::AdamWParamState>>> restored;
  std::vector<torch::optim::AdamWOptions> options;
  for (size_t gi = 0; gi < ours.size(); ++gi) {
    const auto& gj = groups[gi];
    auto& g = ours[gi];
    if (gj.value("params", size_t{0}) != g.params().size())
      fail("group " + std::to_string(gi) + " has " + std::to_string(gj.value("params", size_t{0})) +
           " parameters, this run's " + std::to_string(g.params().size()));
    try {
      auto o = adamw_options(g, path);  // a copy: the optimizer changes only once all of the file fits
      o.lr(gj.at("lr").get<double>());
      o.betas({gj.at("betas").at(0).get<double>(), gj.at("betas").at(1).get<double>()});
      o.eps(gj.at("eps").get<double>());
      o.weight_decay(gj.at("weight_decay").get<double>());
      o.amsgrad(gj.at("amsgrad").get<bool>());
      options.push_back(o);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("group ") + std::to_string(gi) + " options: " + e.what());
    }
    for (const auto& p : g.params()) {
      const std::string name = "state." + std::to_string(i++) + ".";
      auto step = tensors.find(name + "step");
      if (step == tensors.end()) continue;
      if (step->second.numel() != 1 || step->second.is_floating_point())
        fail(name + "step must hold one integer, got shape " + c10::str(step->second.sizes()));
      auto s = std::make_unique<torch::optim::AdamWParamState>();
      for (const char* part : {"exp_avg", "exp_avg_sq"}) {
        auto t = tensors.find(name + part);
        if (t == tensors.end() || !t->second.sizes().equals(p.sizes()) || t->second.scalar_type() != p.scalar_type())
          fail(name + part +
               (t == tensors.end() ? " is missing"
                                   : " is " + c10::str(t->second.scalar_type(), " ", t->second.sizes())) +
               ", the parameter " + c10::str(p.scalar_type(), " ", p.sizes()));
      }
      s->step(step->second.item<int64_t>());
      s->exp_avg(tensors.at(name + "exp_avg").to(p.device()));
      s->exp_avg_sq(tensors.at(name + "exp_avg_sq").to(p.device()));
      if (auto m = tensors.find(name + "max_exp_avg_sq"); m != tensors.end()) s->max_exp_avg_sq(m->second.to(p.device()));
      restored.emplace_back(state_key(p), std::move(s));
    }
  }
  size_t used = 0;
  for (const auto& [key, s] : restored) used += 3 + (s->max_exp_avg_sq().defined() ? 1 : 0);
  if (used != tensors.size()) fail(std::to_string(tensors.size() - used) + " of its entries belong to no parameter of this run");
  for (size_t gi = 0; gi < ours.size(); ++gi) adamw_options(ours[gi], path) = options[gi];
  optim.state().clear();
  for (auto& [key, s] : restored) optim.state()[key] = std::move(s);
}

}  // namespace

void load_resume_state(const std::string& dir, torch::optim::Optimizer& optim) {
  const std::string remedy = ": resume from an earlier checkpoint (move this one aside), or start a fresh run";
  const std::string optimizer = dir + "/optimizer.safetensors", legacy = dir + "/optimizer.pt";
  if (std::filesystem::exists(optimizer) || !std::filesystem::exists(legacy)) {
    load_optimizer_state(optim, optimizer, remedy);
  } else {
    try {
      torch::load(optim, legacy);
    } catch (const c10::Error& e) {
      throw DataError(legacy + " does not restore this run's optimizer (" + e.what_without_backtrace() + ")" + remedy);
    }
  }
  const std::string rng = dir + "/rng.safetensors";
  const auto tensors = load_safetensors(rng);
  const auto it = tensors.find("torch_cpu");
  if (it == tensors.end()) throw DataError(rng + " holds no 'torch_cpu' tensor (the CPU generator's state)" + remedy);
  try {
    set_rng_state(it->second);
  } catch (const c10::Error& e) {
    throw DataError(rng + ": 'torch_cpu' is not a CPU generator state (" + e.what_without_backtrace() + ")" + remedy);
  }
}

nlohmann::json metrics_json(const std::map<std::string, torch::Tensor>& metrics) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [k, v] : metrics) j[k] = v.item<double>();
  return j;
}

namespace {

void flatten(const ConfigNode& n, const std::string& prefix, std::map<std::string, std::string>& out) {
  if (n.is_map()) {
    for (const auto& kv : n.map) flatten(kv.second, prefix.empty() ? kv.first : prefix + "." + kv.first, out);
    return;
  }
  out[prefix] = to_yaml(n);
}

// Two flattened values are the same, or numbers equal to 10 significant digits: configs saved
// before 2026-12-07 wrote every number with 10 digits (1.333333333 for 4/3).
bool same_value(const std::string& a, const std::string& b) {
  if (a == b) return true;
  auto number = [](const std::string& s, double& v) {
    char* end = nullptr;
    v = std::strtod(s.c_str(), &end);
    while (end && (*end == '\n' || *end == ' ')) ++end;
    return end != s.c_str() && end && *end == '\0' && std::isfinite(v);
  };
  double x = 0, y = 0;
  if (!number(a, x) || !number(b, y)) return false;
  return std::fabs(x - y) <= 1e-9 * std::max(std::fabs(x), std::fabs(y));
}

// Which optimizer group each source of an lr joins: optim.lr, then each rule in order (-1: frozen).
// plan_param_groups makes one group per distinct lr, so sources that share an lr share a group;
// numbered by first appearance, two configs give the same vector when their lrs group alike.
std::vector<int> lr_grouping(const OptimConfig& o) {
  std::vector<double> lrs;
  auto group = [&](double lr) {
    auto it = std::find(lrs.begin(), lrs.end(), lr);
    if (it == lrs.end()) it = lrs.insert(lrs.end(), lr);
    return static_cast<int>(it - lrs.begin());
  };
  std::vector<int> out = {group(o.lr)};
  for (const auto& r : o.param_groups) out.push_back(r.freeze ? -1 : group(r.lr > 0 ? r.lr : o.lr));
  return out;
}

bool safe_to_change(const std::string& key) {
  static const char* safe[] = {"run.name", "run.out_dir", "run.threads", "run.device", "train.steps",
                               "train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "train.keep_every",
                               "data.workers", "data.prefetch", "data.val", "data.val_limit", "data.check_images", "eval.", "bench.",
                               "distributed.",
                               // What happens on a bad batch or a non-finite step: the remedies the
                               // stop messages name, so a resume must accept them.
                               "train.on_bad_batch", "train.on_nonfinite", "train.max_skipped_steps"};
  for (const char* s : safe) {
    const std::string p(s);
    if (key == p || (p.back() == '.' && key.compare(0, p.size(), p) == 0)) return true;
  }
  return false;
}

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal_rank{0};  // the rank that says so when a signal arrives: 0

void set_signal_rank(int rank) { g_signal_rank.store(rank); }

// write(2) alone is safe in a signal handler (no logger, no allocation).
void say_in_handler(const char* text) {
  if (g_signal_rank.load() != 0) return;
  const ssize_t ignored = ::write(STDERR_FILENO, text, std::strlen(text));
  (void)ignored;
}

// First signal: finish the step and checkpoint. Second: the default action (terminate now).
// Both are said at once: the step in progress may take a while to finish.
extern "C" void on_stop_signal(int sig) {
  const int saved_errno = errno;  // the interrupted code may be about to read it
  if (g_stop.exchange(true)) {
    say_in_handler("\ntrialign: second stop signal: stopping now, without a checkpoint (the last one written "
                   "stands)\n");
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  say_in_handler("\ntrialign: stop requested: training finishes its current step (an evaluation in progress is "
                 "abandoned), writes a checkpoint and exits with code 75; a second signal stops at once without one\n");
  errno = saved_errno;
}

}  // namespace

ConfigDiff diff_for_resume(const std::string& saved_yaml, const std::string& current_yaml) {
  // Both sides through the typed config and back, so a key that a newer version added (written
  // out with its default) or a value spelled differently (1e-3 vs 0.001) is not a change. Text
  // that is not a valid run config is compared as it is.
  auto typed = [](const std::string& yaml, const std::string& label) -> std::optional<RunConfig> {
    try {
      return run_config_from_tree(parse_config_string(yaml, label), label);
    } catch (const std::exception&) {
      return std::nullopt;
    }
  };
  const auto saved = typed(saved_yaml, "checkpoint config"), current = typed(current_yaml, "current config");
  std::map<std::string, std::string> a, b;
  flatten(parse_config_string(saved ? resolved_yaml(*saved) : saved_yaml, "checkpoint config"), "", a);
  flatten(parse_config_string(current ? resolved_yaml(*current) : current_yaml, "current config"), "", b);
  // optim.param_groups counts as a learning-rate change when only the rules' lr differ: the same
  // rules (match, freeze) in the same order.
  const bool same_rules = saved && current && [&] {
    const auto &x = saved->optim.param_groups, &y = current->optim.param_groups;
    if (x.size() != y.size()) return false;
    for (size_t i = 0; i < x.size(); ++i)
      if (x[i].match != y[i].match || x[i].freeze != y[i].freeze) return false;
    return true;
  }();
  ConfigDiff d;
  auto record = [&](const std::string& k) { (safe_to_change(k) ? d.safe : d.unsafe).push_back(k); };
  for (const auto& [k, v] : a) {
    auto it = b.find(k);
    if (it != b.end() && same_value(it->second, v)) continue;
    if (it != b.end() && (k == "optim.lr" || (k == "optim.param_groups" && same_rules)))
      d.learning_rate.push_back(k);
    else
      record(k);
  }
  for (const auto& [k, v] : b)
    if (!a.count(k)) record(k);
  // Not configs to reason about: not a change to allow.
  if (!d.learning_rate.empty())
    d.lr_regrouped = !saved || !current || lr_grouping(saved->optim) != lr_grouping(current->optim);
  return d;
}

namespace {

// A fresh run in a folder where an earlier attempt stopped before its first checkpoint: that
// attempt's metrics would otherwise be continued by this run's steps 1, 2, ... in one file.
void set_aside_old_metrics(const std::string& run_dir) {
  namespace fs = std::filesystem;
  const fs::path old = fs::path(run_dir) / "metrics.jsonl";
  std::error_code ec;
  if (!fs::exists(old, ec) || fs::file_size(old, ec) == 0) return;
  fs::path aside;
  for (int k = 1;; ++k) {
    aside = fs::path(run_dir) / ("metrics.abandoned-" + std::to_string(k) + ".jsonl");
    if (!fs::exists(aside, ec)) break;
  }
  fs::rename(old, aside, ec);
  if (ec) throw DataError("cannot move the earlier attempt's " + old.string() + " aside: " + ec.message());
  spdlog::warn("{} held the metrics of an earlier attempt that wrote no checkpoint; moved to {}", old.string(),
               aside.filename().string());
}

std::string select_resume_checkpoint_here(const std::string& run_dir, const std::string& resume) {
  if (resume.empty()) {
    if (has_checkpoints(run_dir))
      throw ConfigError("run.out_dir '" + run_dir +
                        "' already holds checkpoints: pass --resume auto to continue that run, or choose another run.out_dir");
    set_aside_old_metrics(run_dir);
    return "";
  }
  auto warn = [](const std::string& w) { spdlog::warn(w); };
  for (const auto& line : recover_checkpoints(run_dir)) warn(line);
  if (resume != "auto") return resolve_checkpoint(resume, warn);
  const std::string dir = find_latest_checkpoint(run_dir, warn);
  // Starting fresh over damaged checkpoints would let keep_last delete them: a run's progress
  // is never given up without the user's say.
  if (dir.empty() && has_checkpoints(run_dir))
    throw DataError("resume auto: every checkpoint in '" + run_dir +
                    "/checkpoints' is damaged (the warnings above name the files); not starting over, which would "
                    "replace them. Restore the files, pass --resume with a good copy, or move the checkpoints folder "
                    "aside to start fresh");
  if (dir.empty()) {
    spdlog::info("resume auto: no checkpoint in {}, starting fresh", run_dir);
    set_aside_old_metrics(run_dir);
  }
  return dir;
}

}  // namespace

std::string select_resume_checkpoint(const std::string& run_dir, const std::string& resume) {
  // Rank 0 alone tidies the run folder and chooses; the others take its choice (resuming needs
  // the run folder on storage every rank can read).
  return dist::broadcast_string(dist::is_main() ? select_resume_checkpoint_here(run_dir, resume) : std::string());
}

void warn_unknown_tokens(const Tokenizer& tok, const Tokenizer::Coverage& before, const RunConfig& cfg) {
  const std::string note = unknown_tokens_note(tok.coverage_since(before), "data.train", cfg.data.tokenizer);
  if (!note.empty() && dist::is_main()) spdlog::warn(note);
}

uint32_t model_weights_crc(const std::string& checkpoint) {
  const std::string path = checkpoint + "/MANIFEST.json";
  try {
    return nlohmann::json::parse(read_text_file(path)).at("files").at("model.safetensors").at("crc32").get<uint32_t>();
  } catch (const nlohmann::json::exception& e) {
    throw DataError(path + ": no checksum for model.safetensors (" + e.what() + "); train that stage again");
  }
}

nlohmann::json train_data_record(const RunConfig& cfg, int64_t records) {
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(cfg.data.train, ec);
  if (ec) return nlohmann::json();  // the loader has read it; a file that vanished since is not this check's to report
  return {{"path", cfg.data.train}, {"bytes", bytes}, {"crc32", crc32_file(cfg.data.train)}, {"records", records}};
}

namespace {

// The manifest orders the samples, so an edited one (records added, removed, reordered) makes the
// resumed run see other batches than the run it continues would have: allowed, but said.
void warn_if_train_data_changed(const nlohmann::json& saved, const RunConfig& cfg) try {
  if (!saved.is_object() || !dist::is_main()) return;  // checkpoints from before the record
  const nlohmann::json now = train_data_record(cfg, -1);
  if (now.is_null() || (now["bytes"] == saved.value("bytes", nlohmann::json()) &&
                        now["crc32"] == saved.value("crc32", nlohmann::json())))
    return;
  spdlog::warn("resume: data.train {} is not the file the checkpoint's run read ({} bytes, {} records, CRC32 {:08x} "
               "then; {} bytes, CRC32 {:08x} now): the resumed run sees other batches than an uninterrupted run would. "
               "Restore the file for an exact resume, or start a new run with init_from naming the checkpoint",
               cfg.data.train, saved.value("bytes", int64_t{0}), saved.value("records", int64_t{0}),
               saved.value("crc32", uint32_t{0}), now["bytes"].get<int64_t>(), now["crc32"].get<uint32_t>());
} catch (const nlohmann::json::exception&) {
  // A hand-edited record of the wrong types: the check is advice, not a condition of resuming.
}

}  // namespace

void warn_if_train_records_changed(const std::string& dir, const RunConfig& cfg, const nlohmann::json& now) try {
  if (!dist::is_main() || !now.is_object()) return;
  const auto saved =
      nlohmann::json::parse(read_text_file(dir + "/trainer_state.json")).value("data", nlohmann::json::object());
  // Another file is warned about by check_resume_checkpoint; this is the same file read otherwise.
  if (!saved.contains("records") || saved.value("bytes", nlohmann::json()) != now["bytes"] ||
      saved.value("crc32", nlohmann::json()) != now["crc32"] || saved["records"] == now["records"])
    return;
  spdlog::warn("resume: data.train {} now gives {} usable records, the checkpoint's run had {} (records skipped by "
               "data.on_bad_record or left out by data.check_images differ: an image missing or damaged since, or repaired): the resumed run sees other "
               "batches than an uninterrupted run would. Restore the images for an exact resume",
               cfg.data.train, now["records"].get<int64_t>(), saved["records"].get<int64_t>());
} catch (const std::exception&) {
  // check_resume_checkpoint has read the file; a record of the wrong type is advice lost, not a stop
}

int64_t check_resume_checkpoint(const std::string& dir, const RunConfig& cfg) {
  const auto info = verify_checkpoint(dir);
  if (info.trainer != cfg.trainer)
    throw ConfigError("checkpoint '" + dir + "' was written by the '" + info.trainer + "' trainer; this config runs '" +
                      cfg.trainer + "'");
  // The sample order is a function of the global batch, so it resumes only at the same world size.
  int saved_world = 1;
  nlohmann::json saved_data;
  try {
    const auto state = nlohmann::json::parse(read_text_file(dir + "/trainer_state.json"));
    saved_world = state.value("world_size", 1);
    saved_data = state.value("data", nlohmann::json());
  } catch (const nlohmann::json::exception& e) {
    throw DataError(dir + "/trainer_state.json: unreadable (" + e.what() + ")");
  }
  if (saved_world != dist::world_size())
    throw ConfigError("checkpoint '" + dir + "' was written by a run of " + std::to_string(saved_world) +
                      " rank(s); this run has " + std::to_string(dist::world_size()) +
                      ". The data order follows the global batch (train.batch_size x ranks), so resume with " +
                      std::to_string(saved_world) + " rank(s) (--nproc / torchrun --nproc_per_node), or start a new run " +
                      "with init_from naming this checkpoint");
  check_checkpoint_tokenizer(dir, cfg.data.tokenizer, "resume");
  warn_if_train_data_changed(saved_data, cfg);
  const auto diff = diff_for_resume(read_text_file(dir + "/config.yaml"), resolved_yaml(cfg));
  if (!diff.unsafe.empty()) {
    std::string keys;
    for (const auto& k : diff.unsafe) keys += "\n  " + k;
    throw ConfigError("cannot resume from '" + dir +
                      "': the config changed in keys that alter the model, data or optimisation:" + keys +
                      "\nrestore them, or start a new run (another run.out_dir)");
  }
  if (diff.lr_regrouped)
    throw ConfigError("cannot resume from '" + dir +
                      "' with these learning rates: sources that shared an lr (and so an optimizer group: "
                      "optim.lr and the optim.param_groups rules that set one) no longer do, or the reverse, so the "
                      "saved optimizer state does not map onto the new groups. Change them together (e.g. scale "
                      "every one by the same factor), or start a new run with init_from naming the checkpoint");
  if (!diff.learning_rate.empty()) {
    std::string keys;
    for (const auto& k : diff.learning_rate) keys += " " + k;
    spdlog::warn("resume: the learning rate changed ({}): from here on the run no longer repeats the original one",
                 keys.substr(1));
  }
  if (!diff.safe.empty()) {
    std::string keys;
    for (const auto& k : diff.safe) keys += " " + k;
    spdlog::info("resume: config changes allowed:{}", keys);
    if (std::find(diff.safe.begin(), diff.safe.end(), "train.steps") != diff.safe.end() && cfg.schedule.type != "constant")
      spdlog::warn("resume: train.steps changed, so the {} schedule now spans {} steps: from here on the learning rate "
                   "differs from the original run's",
                   cfg.schedule.type, cfg.train.steps);
  }
  if (info.step >= cfg.train.steps && dist::is_main())
    spdlog::warn("resume: the checkpoint is at step {} and train.steps is {}: nothing is left to train, only the final "
                 "evaluation runs; raise train.steps to train on",
                 info.step, cfg.train.steps);
  return info.step;
}

void forget_after_step(const std::string& run_dir, int64_t step) {
  std::string error;
  if (dist::is_main()) try {
      for (const auto& name : set_aside_checkpoints_after(run_dir, step))
        spdlog::warn("resume: a checkpoint newer than the resumed step {} is set aside: {}", step, name);
      truncate_metrics_after((std::filesystem::path(run_dir) / "metrics.jsonl").string(), step);
    } catch (const std::exception& e) {
      error = e.what();
    }
  // Rank 0 alone touches the files; every rank stops when it could not, rank 0 with the reason.
  if (dist::any(!error.empty()))
    throw DataError(!error.empty() ? error
                                   : "rank 0 could not set aside what followed step " + std::to_string(step) +
                                         " in " + run_dir + " (its log says why)");
}

nlohmann::json record_train_step(MetricsLog& log, TrainResult& result, int64_t step, const torch::Tensor& loss,
                                 const std::map<std::string, torch::Tensor>& metrics, double lr, double grad_norm,
                                 double data_wait_s, int64_t skipped_steps) {
  // Every rank's share summed: the global batch's values (a collective: every rank logs here).
  torch::Tensor total = loss;
  auto summed = metrics;
  dist::sum_metrics(total, summed);
  const double l = total.item<double>();
  result.logged_losses.push_back(l);
  nlohmann::json rec = {{"step", step}, {"split", "train"}, {"loss", l}, {"lr", lr}, {"grad_norm", grad_norm}};
  rec["metrics"] = metrics_json(summed);
  rec["data_wait_s"] = data_wait_s;
  if (skipped_steps > 0) rec["skipped_steps"] = skipped_steps;
  log.write(rec);
  // A gradient of exactly zero is not a small one: no trainable weight depends on the loss (a
  // path cut by freezing, saturated or dead activations, a loss at a constant). Said once, at the
  // third logged step in a row: one zero step happens (GRPO groups that all scored alike).
  static int zero_streak = 0;
  zero_streak = grad_norm == 0.0 ? zero_streak + 1 : 0;
  if (zero_streak == 3 && dist::is_main())
    spdlog::warn("step {}: the gradient norm has been exactly 0 at three logged steps in a row: the loss reaches no "
                 "trainable weight (check optim.param_groups, or the run diverged into dead activations; under GRPO, "
                 "every group's completions scored alike), so only AdamW's momentum and weight decay move the weights",
                 step);
  return rec;
}

bool after_step(const RunConfig& cfg, const TrainOptions& opt, int64_t step, TrainResult& result,
                const std::function<std::string()>& save, const std::function<void()>& eval) {
  const int64_t steps = cfg.train.steps;
  // Rank 0 evaluates while the others wait at the next step's first collective.
  if (cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0 && step != steps && dist::is_main())
    evaluate_unless_stopped([&] { return eval(), nlohmann::json(); }, step);
  // Agreed by every rank, so all of them stop after the same step.
  if (dist::any(stop_requested() || step == opt.stop_at_step)) {
    result.checkpoint = dist::broadcast_string(save_on_main(save));
    if (dist::is_main())
      spdlog::warn("stop requested: checkpoint {} written at step {}; continue with --resume auto", result.checkpoint, step);
    result.interrupted = true;
    result.final_step = step;
    return true;
  }
  if (cfg.train.save_every > 0 && step % cfg.train.save_every == 0 && step != steps) result.checkpoint = save_on_main(save);
  return false;
}

void finish_run(const RunConfig& cfg, int64_t start, int64_t step, const std::string& resumed_from, double elapsed_s,
                TrainResult& result, const std::function<std::string()>& save,
                const std::function<nlohmann::json()>& eval) {
  result.final_step = step;
  result.checkpoint = start < step ? save_on_main(save) : resumed_from;  // a resumed, finished run: nothing new to save
  if (dist::is_main()) {
    if (const auto j = evaluate_unless_stopped(eval, step)) {
      result.final_eval = *j;
      if (!result.final_eval.is_null())
        atomic_write_text((std::filesystem::path(cfg.run.out_dir) / "eval.json").string(), json_text(result.final_eval, 2) + "\n");
    } else {
      // The weights are final and saved; only the figures are missing. Reported as a stop (exit
      // 75), so a pipeline does not take the stage as done, and --resume auto evaluates again.
      // An eval.json of an earlier finish (before train.steps was raised) describes other weights.
      std::error_code ec;
      std::filesystem::remove(std::filesystem::path(cfg.run.out_dir) / "eval.json", ec);
      result.interrupted = true;
      spdlog::warn("the final checkpoint {} is written; continue with --resume auto to run the final evaluation",
                   result.checkpoint);
    }
  }
  // The others leave only once rank 0 has written everything: a pipeline's next stage reads it.
  dist::barrier("waiting for rank 0 to finish the stage (final checkpoint and evaluation)");
  result.checkpoint = dist::broadcast_string(result.checkpoint);
  result.interrupted = dist::any(result.interrupted);  // every rank's pipeline stops alike
  spdlog::info("{} done: {} steps in {}, checkpoint {}", cfg.run.name, step - start, format_duration(elapsed_s),
               result.checkpoint);
}

bool StepGuard::batch_ok(int64_t step, const std::string& error) {
  if (!dist::any(!error.empty())) return true;
  const std::string what =
      error.empty() ? "another rank could not build its part of the batch (its log names the record)" : error;
  if (!error.empty() && dist::rank() != 0) spdlog::warn("step {}: {}", step, error);  // rank 0 logs the decision
  if (cfg_.train.on_bad_batch == "skip") {
    skip(step, "the batch could not be built: " + what);
    return false;
  }
  const auto ck = save_on_main(save_);
  dist::barrier("waiting for rank 0's checkpoint");  // the launcher must not stop rank 0 mid-save
  throw DataError(what + "\n(stopped before step " + std::to_string(step) + "; " +
                  (ck.empty() ? std::string("rank 0 wrote a checkpoint of") : "checkpoint " + ck + " holds") +
                  " the last good state: fix or remove the record, or set train.on_bad_batch: skip, then --resume auto)");
}

std::optional<double> StepGuard::clip(int64_t step, const torch::Tensor& loss, const std::vector<torch::Tensor>& params) {
  if (opt_.nonfinite_at_step > 0 && step >= opt_.nonfinite_at_step && step < opt_.nonfinite_at_step + opt_.nonfinite_steps)
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().fill_(std::numeric_limits<float>::quiet_NaN());
  const double gnorm = clip_grad_norm(params, cfg_.optim.grad_clip);  // global: after the all-reduce
  const double l = loss.item<double>();
  if (!dist::any(!std::isfinite(gnorm) || !std::isfinite(l))) {
    in_a_row_ = 0;
    return gnorm;
  }
  const std::string what = "non-finite " + std::string(std::isfinite(l) ? "gradient norm" : "loss") + " (loss " +
                           std::to_string(l) + ", gradient norm " + std::to_string(gnorm) + ")";
  if (cfg_.train.on_nonfinite == "skip") {
    skip(step, what);
    return std::nullopt;
  }
  const auto ck = save_on_main(save_);  // never apply (or checkpoint) a NaN/inf update
  dist::barrier("waiting for rank 0's checkpoint");
  throw std::runtime_error("step " + std::to_string(step) + ": " + what + "; nothing was applied. " +
                           (ck.empty() ? std::string("Rank 0's checkpoint") : "Checkpoint " + ck) +
                           " holds the last good state; lower the learning rate (optim.lr, or the lr of the "
                           "optim.param_groups rules that set one) or check the loss options, or set "
                           "train.on_nonfinite: skip, then --resume auto");
}

void StepGuard::skip(int64_t step, const std::string& why) {
  ++skipped_;
  if (++in_a_row_ > cfg_.train.max_skipped_steps) {
    const auto ck = save_on_main(save_);
    dist::barrier("waiting for rank 0's checkpoint");
    throw std::runtime_error("step " + std::to_string(step) + ": " + why + "; " + std::to_string(in_a_row_) +
                             " steps in a row skipped (train.max_skipped_steps " +
                             std::to_string(cfg_.train.max_skipped_steps) + "), so the run stops. " +
                             (ck.empty() ? std::string("Rank 0's checkpoint") : "Checkpoint " + ck) +
                             " holds the last good state");
  }
  if (dist::rank() == 0) spdlog::warn("step {}: {}; update skipped ({} skipped so far)", step, why, skipped_);
}

void install_stop_handlers() {
  g_stop.store(false);
  // Until dist::init confirms it, the launcher's environment says which rank this is.
  for (const char* var : {"RANK", "SLURM_PROCID"})
    if (const char* v = std::getenv(var)) {
      set_signal_rank(std::atoi(v));
      break;
    }
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
}

bool stop_requested() { return g_stop.load(); }

void stop_point() {
  if (stop_requested()) throw EvaluationStopped();
}

static std::function<void(int64_t)>& evaluation_hook() {
  static std::function<void(int64_t)> hook;
  return hook;
}

void set_evaluation_hook(std::function<void(int64_t step)> hook) { evaluation_hook() = std::move(hook); }

static std::function<void(const std::string&)>& before_training_hook() {
  static std::function<void(const std::string&)> hook;
  return hook;
}

void set_before_training_hook(std::function<void(const std::string&)> hook) { before_training_hook() = std::move(hook); }

void stop_before_training_if_requested(const std::string& during) {
  if (before_training_hook()) before_training_hook()(during);
  if (dist::any(stop_requested()))
    throw StoppedBeforeTraining("stop requested during " + during +
                                ", before the first training step: nothing was trained and no checkpoint written "
                                "(run the same command again; with --resume auto a run that has checkpoints goes on "
                                "from its last one)");
}

bool eval_record_due(const RunConfig& cfg, int64_t step, int64_t start) {
  std::error_code ec;
  return step > start || (step > 0 && !std::filesystem::exists(std::filesystem::path(cfg.run.out_dir) / "eval.json", ec));
}

std::optional<nlohmann::json> evaluate_unless_stopped(const std::function<nlohmann::json()>& eval, int64_t step) {
  try {
    if (evaluation_hook()) evaluation_hook()(step);
    return eval();
  } catch (const EvaluationStopped&) {
    spdlog::warn("evaluation at step {} abandoned: stop requested (its figures are not recorded)", step);
    return std::nullopt;
  }
}

}  // namespace trialign
