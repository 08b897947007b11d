// Data parallel over c10d/Gloo on loopback: the launch environment, 2 ranks x batch B against one
// process with batch 2B (stage 1 with the feature all-gather, stage 3, DPO), resume at the same
// world size, a refused resume at another, and a dead rank making the other fail in bounded time.
#include <catch2/catch.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "core/checkpoint.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/safetensors.h"
#include "test_helpers.h"

namespace fs = std::filesystem;
using namespace trialign;
using test::TempDir;
using test::write_file;

namespace {

dist::EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

struct Corpus {
  TempDir dir{"dist"};
  Corpus() {
    test::write_tiny_shapes_corpus(dir.file("data"), 32, 4);
    const std::string common = R"(
run: {threads: 1, seed: 5, precision: fp32}
train: {batch_size: 8, log_every: 1, steps: 3}
schedule: {warmup_steps: 0}
)";
    const std::string vlm_model = R"(
model:
  vision: {image_size: 32, patch_size: 8, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}
  projector: {type: mlp2x_gelu, spatial_merge: 2}
  llm: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 320}
optim: {lr: 1.0e-2}
)";
    write_file(dir.file("clip.yaml"), "trainer: contrastive\n" + common + R"(
data: {image_size: 32, max_text_len: 24, workers: 1, tokenizer: )" + dir.file("data/tok.model") +
                                          ", train: " + dir.file("data/train.jsonl") + R"(}
model:
  vision: {image_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}
  text: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 24}
  projection_dim: 8
optim: {lr: 2.0e-3}
eval: {recall_at: [1]}
)");
    write_file(dir.file("vlm.yaml"), "trainer: finetune\n" + common + vlm_model + R"(
data: {image_size: 32, max_seq_len: 320, on_too_long: truncate, workers: 1, tokenizer: )" +
                                         dir.file("data/tok.model") + ", train: " + dir.file("data/train_instruct.jsonl") + "}\n");
    write_file(dir.file("dpo.yaml"), "trainer: preference\n" + common + vlm_model + R"(
data: {image_size: 32, max_seq_len: 320, on_too_long: truncate, workers: 1, tokenizer: )" +
                                         dir.file("data/tok.model") + ", train: " + dir.file("data/train_pref.jsonl") + R"(}
loss: {type: dpo, sft_weight: 0.5}
)");
  }
};

int run_cli(const std::string& args, std::string* out = nullptr) {
  return test::run_command(std::string(TRIALIGN_BINARY) + " " + args, out);
}

// Runs the trialign binary and requires exit code `code`, showing its output when it differs.
std::string require_cli(const std::string& args, int code = 0) {
  std::string out;
  const int rc = run_cli(args, &out);
  INFO("trialign " << args << "\n" << out);
  REQUIRE(rc == code);
  return out;
}

// A run's final weights (model and, for stage 1, the loss's temperature).
std::map<std::string, torch::Tensor> final_weights(const std::string& run) {
  const std::string ck = find_latest_checkpoint(run, [](const std::string&) {});
  auto w = load_safetensors(ck + "/model.safetensors");
  if (fs::exists(ck + "/loss.safetensors"))
    for (auto& [k, v] : load_safetensors(ck + "/loss.safetensors")) w["loss." + k] = v;
  return w;
}

std::vector<double> logged_losses(const std::string& run) {
  std::vector<double> out;
  std::ifstream in(run + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    if (j.value("split", "") == "train") out.push_back(j["loss"].get<double>());
  }
  return out;
}

// One process with batch 2B against 2 ranks with batch B each: the same losses at every step
// and the same weights after the last one, to float tolerance (the sum over ranks is ordered
// differently from the sum over one batch).
void check_two_ranks_equal_one(const Corpus& c, const std::string& config, const std::vector<std::string>& sets = {}) {
  std::string extra;
  for (const auto& s : sets) extra += " --set " + s;
  const std::string one = c.dir.file("one-" + config), two = c.dir.file("two-" + config);
  require_cli("train " + c.dir.file(config) + " --set run.out_dir=" + one + " --set train.batch_size=8" + extra);
  const auto out =
      require_cli("train " + c.dir.file(config) + " --nproc 2 --set run.out_dir=" + two + " --set train.batch_size=4" + extra);
  CHECK_THAT(out, Catch::Contains("data parallel: 2 ranks"));
  CHECK_THAT(out, Catch::Contains("4 per rank = 8 samples per step"));
  const auto l1 = logged_losses(one), l2 = logged_losses(two);
  REQUIRE(l1.size() == 3);
  REQUIRE(l2.size() == 3);  // rank 0 alone logs
  for (size_t i = 0; i < l1.size(); ++i) CHECK(l2[i] == Approx(l1[i]).epsilon(1e-5));
  const auto w1 = final_weights(one), w2 = final_weights(two);
  REQUIRE(w1.size() == w2.size());
  double moved = 0;
  for (const auto& [name, t] : w1) {
    INFO(name);
    REQUIRE(w2.count(name));
    const double diff = (t - w2.at(name)).abs().max().item<double>();
    CHECK(diff < 2e-5 * std::max(1.0, t.abs().max().item<double>()));
  }
  // Training did move the weights: the comparison is not between two untouched initialisations.
  const auto start = c.dir.file("start-" + config);
  require_cli("train " + c.dir.file(config) + " --set run.out_dir=" + start + " --set train.steps=1 --set optim.lr=1e-12" +
              extra);
  for (const auto& [name, t] : final_weights(start)) moved = std::max(moved, (t - w1.at(name)).abs().max().item<double>());
  CHECK(moved > 1e-3);
}

}  // namespace

TEST_CASE("launch environment: torchrun and Slurm variables, and what is wrong with them", "[distributed]") {
  SECTION("none: one process") {
    const auto li = dist::launch_info(env_of({}));
    CHECK(li.world_size == 1);
    CHECK(li.rank == 0);
    CHECK(li.launcher == "none");
  }
  SECTION("torchrun") {
    const auto li = dist::launch_info(env_of({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                                              {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29400"}}));
    CHECK(li.launcher == "torchrun");
    CHECK(li.rank == 3);
    CHECK(li.world_size == 8);
    CHECK(li.local_rank == 1);
    CHECK(li.local_world_size == 2);
    CHECK(li.master_addr == "node0");
    CHECK(li.master_port == 29400);
    CHECK(li.store_is_server);
    CHECK(li.store_prefix.empty());
  }
  SECTION("torchrun's agent store: the workers join it as clients under its prefix") {
    const auto li = dist::launch_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"},
                                              {"TORCHELASTIC_USE_AGENT_STORE", "True"}, {"TORCHELASTIC_RESTART_COUNT", "2"}}));
    CHECK_FALSE(li.store_is_server);
    CHECK(li.store_prefix == "/worker/attempt_2");
  }
  SECTION("Slurm: a task of an srun step, counts like 4(x2)") {
    const auto li = dist::launch_info(env_of({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_STEP_NUM_TASKS", "8"},
                                              {"SLURM_LOCALID", "1"}, {"SLURM_STEP_TASKS_PER_NODE", "4(x2)"},
                                              {"SLURM_NNODES", "2"}, {"MASTER_ADDR", "n1"}}));
    CHECK(li.launcher == "slurm");
    CHECK(li.rank == 5);
    CHECK(li.world_size == 8);
    CHECK(li.local_rank == 1);
    CHECK(li.local_world_size == 4);
    CHECK(li.master_port == 29500);
  }
  SECTION("Slurm: the batch script itself (no srun step) is one process, not rank 0 of many") {
    const auto li = dist::launch_info(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_NNODES", "2"}}));
    CHECK(li.world_size == 1);
    CHECK(li.launcher == "none");
  }
  SECTION("mistakes are named") {
    auto msg = [](std::map<std::string, std::string> v) {
      return test::message_of<ConfigError>([&] { dist::launch_info(env_of(v)); });
    };
    CHECK_THAT(msg({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}),
               Catch::Contains("rank 2 is outside world size 2"));
    CHECK_THAT(msg({{"RANK", "0"}, {"WORLD_SIZE", "2"}}), Catch::Contains("MASTER_ADDR is not set"));
    CHECK_THAT(msg({{"RANK", "x"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}}),
               Catch::Contains("environment variable RANK='x' is not a number"));
    CHECK_THAT(msg({{"SLURM_PROCID", "0"}, {"SLURM_STEP_NUM_TASKS", "4"}, {"SLURM_NNODES", "2"}}),
               Catch::Contains("export MASTER_ADDR=$(scontrol show hostnames"));
    CHECK_THAT(msg({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}}),
               Catch::Contains("MASTER_PORT=70000 is not a TCP port"));
  }
}

TEST_CASE("logged metric names: the summed signature tells equal name lists from different ones", "[distributed]") {
  auto names = [](std::vector<std::string> keys) {
    std::map<std::string, torch::Tensor> m;
    for (const auto& k : keys) m[k] = torch::rand({});  // values do not matter, only names
    return dist::metric_names_signature(m);
  };
  const auto a = names({"rewards/chosen", "rewards/margins"}), a2 = names({"rewards/margins", "rewards/chosen"});
  const auto b = names({"rewards/chosen", "rewards/rejected"});
  CHECK(a == a2);  // a map: the order the loss inserted them in does not matter
  // What sum_metrics checks after the all-reduce, for 2 and 3 ranks: W * sum(s^2) == sum(s)^2.
  auto agree = [](std::vector<std::pair<double, double>> ranks) {
    double sum = 0, sum_sq = 0;
    for (const auto& [s, sq] : ranks) sum += s, sum_sq += sq;
    return sum_sq * static_cast<double>(ranks.size()) == sum * sum;
  };
  CHECK(agree({a, a2}));
  CHECK(agree({a, a, a}));
  CHECK_FALSE(agree({a, b}));
  CHECK_FALSE(agree({a, a, b}));
  CHECK_FALSE(agree({a, names({"rewards/chosen"})}));
}

TEST_CASE("2 ranks x batch B equal 1 rank x batch 2B: stage 1 with the feature all-gather", "[distributed][slow]") {
  Corpus c;
  SECTION("infonce") { check_two_ranks_equal_one(c, "clip.yaml"); }
  SECTION("siglip, hard negatives (uneven per rank), gradient cache") {
    check_two_ranks_equal_one(c, "clip.yaml", {"loss.type=siglip", "data.hard_negatives=2", "train.grad_accum=2"});
  }
  SECTION("a record whose image does not decode, left out on every rank (train.on_bad_batch: skip)") {
    // Rank 0 alone decodes the images; rank 1 must leave out the same record, or it would draw it.
    std::ifstream in(c.dir.file("data/train.jsonl"));
    std::string first;
    std::getline(in, first);
    const std::string image = c.dir.file("data/" + nlohmann::json::parse(first)["image"].get<std::string>());
    write_file(image, read_text_file(image).substr(0, 40));
    check_two_ranks_equal_one(c, "clip.yaml", {"train.on_bad_batch=skip"});
    CHECK_THAT(read_text_file(c.dir.file("two-clip.yaml/train.log")),
               Catch::Contains("data.check_images: 1 of 32 training records left out"));
  }
}

TEST_CASE("2 ranks x batch B equal 1 rank x batch 2B: stage 3 (token-normalised loss) and DPO", "[distributed][slow]") {
  Corpus c;
  SECTION("stage 3, with accumulation") { check_two_ranks_equal_one(c, "vlm.yaml", {"train.grad_accum=2"}); }
  SECTION("DPO with its SFT term") { check_two_ranks_equal_one(c, "dpo.yaml"); }
}

TEST_CASE("2 ranks: resume equals no resume, and another world size is refused with the reason", "[distributed][slow]") {
  Corpus c;
  const std::string cfg = c.dir.file("vlm.yaml"), straight = c.dir.file("straight"), resumed = c.dir.file("resumed");
  require_cli("train " + cfg + " --nproc 2 --set train.batch_size=4 --set run.out_dir=" + straight);
  require_cli("train " + cfg + " --nproc 2 --set train.batch_size=4 --set train.steps=1 --set run.out_dir=" + resumed);
  auto out = require_cli("train " + cfg + " --nproc 2 --set train.batch_size=4 --resume auto --set run.out_dir=" + resumed);
  CHECK_THAT(out, Catch::Contains("resumed from"));
  // Same world size, same reduction order: bit for bit.
  test::check_same_tensors(final_weights(straight), final_weights(resumed));
  CHECK(logged_losses(straight) == logged_losses(resumed));

  out = require_cli("train " + cfg + " --set train.batch_size=4 --set train.steps=5 --resume auto --set run.out_dir=" + resumed,
                    2);
  CHECK_THAT(out, Catch::Contains("was written by a run of 2 rank(s); this run has 1"));
}

TEST_CASE("a killed rank makes the other exit non-zero within the timeout", "[distributed][slow]") {
  Corpus c;
  const std::string run = c.dir.file("run");
  // Two ranks started by hand with torchrun's variables (no launcher to clean up after them).
  const int port = 20000 + static_cast<int>(::getpid() % 20000);
  auto start_rank = [&](int r) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      const std::string log = c.dir.file("rank" + std::to_string(r) + ".log");
      std::freopen(log.c_str(), "w", stdout);
      std::freopen(log.c_str(), "a", stderr);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", "2", 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      const std::string cfg = c.dir.file("clip.yaml"), out = "run.out_dir=" + run;
      ::execl(TRIALIGN_BINARY, TRIALIGN_BINARY, "train", cfg.c_str(), "--set", out.c_str(), "--set",
              "train.steps=1000000", "--set", "distributed.timeout_s=20", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    return pid;
  };
  const pid_t r0 = start_rank(0), r1 = start_rank(1);
  // Training under way: rank 0 has logged steps.
  REQUIRE(test::wait_for_logged_steps(run, 3));
  ::kill(r1, SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  int status = 0;
  pid_t done = 0;
  while ((done = ::waitpid(r0, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() - killed < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  if (done == 0) ::kill(r0, SIGKILL), ::waitpid(r0, &status, 0);
  ::waitpid(r1, nullptr, 0);
  REQUIRE(done == r0);  // it exited by itself
  CHECK(std::chrono::steady_clock::now() - killed < std::chrono::seconds(25));  // within timeout_s = 20 (+ slack)
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) != 0);
  const std::string log = read_text_file(c.dir.file("rank0.log"));
  CHECK_THAT(log, Catch::Contains("rank 0 of 2:"));
  CHECK_THAT(log, Catch::Contains("failed (another rank exited or did not answer"));
}

TEST_CASE("the --nproc launcher: a failing rank stops the others and its exit code is returned", "[distributed]") {
  Corpus c;
  // A fresh run into a folder that holds checkpoints is refused (exit 2) by rank 0.
  require_cli("train " + c.dir.file("clip.yaml") + " --set train.steps=1 --set run.out_dir=" + c.dir.file("r"));
  const auto out =
      require_cli("train " + c.dir.file("clip.yaml") + " --nproc 2 --set train.steps=1 --set run.out_dir=" + c.dir.file("r"), 2);
  CHECK_THAT(out, Catch::Contains("already holds checkpoints"));
  CHECK_THAT(out, Catch::Contains("trialign --nproc: failed (rank 0 first, exit code 2)"));
}
