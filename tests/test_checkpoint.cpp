// Saved state round trips: safetensors (ours and bytes written by hand), checkpoint
// directories with checksums, and partial saves that must never be resumed from.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "core/checkpoint.h"
#include "core/errors.h"
#include "core/logging.h"
#include "core/safetensors.h"
#include "test_helpers.h"
#include "trainers/common.h"
#include "trainers/resume_state.h"

using namespace trialign;
using trialign::test::TempDir;
using trialign::test::write_file;
namespace fs = std::filesystem;

namespace {

// Runs `write` under a file-size limit, which makes writes fail as on a full disk (EFBIG instead
// of ENOSPC), and returns the message of what it threw ("" if nothing).
std::string error_with_file_size_limit(rlim_t bytes, const std::function<void()>& write) {
  struct rlimit old {};
  ::getrlimit(RLIMIT_FSIZE, &old);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old;
  small.rlim_cur = bytes;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  std::string error;
  try {
    write();
  } catch (const std::exception& e) {
    error = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  return error;
}

}  // namespace

TEST_CASE("safetensors round trip keeps names, dtypes, shapes and values", "[checkpoint][safetensors]") {
  TempDir d("st");
  auto a = torch::randn({3, 4});
  auto b = torch::arange(5, torch::kInt64);
  auto c = torch::randn({2}).to(torch::kBFloat16);
  save_safetensors(d.file("x.safetensors"), {{"layer.weight", a}, {"ids", b}, {"half", c}}, {{"format", "pt"}});
  std::map<std::string, std::string> meta;
  auto back = load_safetensors(d.file("x.safetensors"), &meta);
  CHECK(meta.at("format") == "pt");
  REQUIRE(back.size() == 3);
  CHECK(torch::equal(back.at("layer.weight"), a));
  CHECK(torch::equal(back.at("ids"), b));
  CHECK(back.at("half").scalar_type() == torch::kBFloat16);
  CHECK(torch::equal(back.at("half"), c));
}

TEST_CASE("safetensors written by hand (an independent writer) load into the right tensors", "[checkpoint][safetensors]") {
  // Header JSON, then F32 little-endian data: "w" = [[1, 2], [3, 4]] at bytes 0..16, "b" = [0.5] at 16..20.
  const std::string header = R"({"b":{"dtype":"F32","shape":[1],"data_offsets":[16,20]},"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  std::string bytes;
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  bytes += header;
  const float vals[] = {1, 2, 3, 4, 0.5f};
  bytes.append(reinterpret_cast<const char*>(vals), sizeof vals);
  TempDir d("st");
  write_file(d.file("hand.safetensors"), bytes);
  auto t = load_safetensors(d.file("hand.safetensors"));
  CHECK(torch::equal(t.at("w"), torch::tensor({{1.f, 2.f}, {3.f, 4.f}})));
  CHECK(t.at("b").item<float>() == 0.5f);

  // Into a module by parameter name; mismatches are reported by name.
  torch::nn::Linear lin(2, 2);
  std::map<std::string, torch::Tensor> named = {{"weight", t.at("w")}, {"bias", torch::tensor({0.5f, -0.5f})}};
  auto rep = load_state(*lin, named);
  CHECK(rep.loaded == 2);
  CHECK(torch::equal(lin->weight, t.at("w")));
  named["bias"] = torch::zeros({3});
  named["extra"] = torch::zeros({1});
  CHECK_THROWS_WITH(load_state(*lin, named, "", true, "hand.safetensors"),
                    Catch::Contains("unexpected (1): extra") && Catch::Contains("mis-shaped (1): bias (file [3], model [2])"));

  // A shape whose byte count overflows 64 bits is caught before any allocation.
  const std::string huge = R"({"x":{"dtype":"F64","shape":[2147483648,1073741824],"data_offsets":[0,0]}})";
  std::string hb;
  for (int i = 0; i < 8; ++i) hb.push_back(static_cast<char>((uint64_t(huge.size()) >> (8 * i)) & 0xff));
  write_file(d.file("huge.safetensors"), hb + huge);
  CHECK_THROWS_WITH(load_safetensors(d.file("huge.safetensors")), Catch::Contains("tensor 'x': shape needs"));

  // Truncation: offsets beyond the data are caught, not read.
  write_file(d.file("cut.safetensors"), bytes.substr(0, bytes.size() - 4));
  CHECK_THROWS_WITH(load_safetensors(d.file("cut.safetensors")), Catch::Contains("tensor 'b': data_offsets [16, 20] outside"));
}

TEST_CASE("checkpoint commit: manifest with checksums, latest, pruning", "[checkpoint]") {
  TempDir d("ckpt");
  for (int64_t step : {10, 20, 30}) {
    CheckpointWriter w(d.path.string(), step, "contrastive");
    w.add_text("payload.txt", "state at " + std::to_string(step));
    w.commit(/*keep_last=*/2);
  }
  const fs::path root = d.path / "checkpoints";
  CHECK_FALSE(fs::exists(root / "step_00000010"));  // pruned
  CHECK(fs::exists(root / "step_00000020"));
  std::ifstream latest(root / "latest");
  std::string name;
  latest >> name;
  CHECK(name == "step_00000030");
  auto info = verify_checkpoint((root / "step_00000030").string());
  CHECK(info.step == 30);
  CHECK(info.trainer == "contrastive");
  // CRC-32 of "state at 30" (zlib.crc32 gives the same number).
  CHECK(info.manifest["files"]["payload.txt"]["crc32"].get<uint32_t>() == crc32_bytes("state at 30", 11));
  CHECK(crc32_bytes("123456789", 9) == 0xCBF43926u);  // the standard CRC-32 check value
}

TEST_CASE("pruning never removes the checkpoint just written nor later ones, and a re-save replaces in place", "[checkpoint]") {
  TempDir d("ckpt");
  auto save = [&](int64_t step, const std::string& text, int keep) {
    CheckpointWriter w(d.path.string(), step, "contrastive");
    w.add_text("payload.txt", text);
    return w.commit(keep);
  };
  for (int64_t s : {1, 2, 3, 4}) save(s, "first run", 3);
  const std::string re = save(3, "second run", 1);  // e.g. resumed from step 2 with keep_last 1
  CHECK(fs::exists(re));
  CHECK(verify_checkpoint(re).step == 3);
  CHECK_FALSE(fs::exists(d.path / "checkpoints" / "step_00000002"));  // pruned: older than 3
  CHECK(fs::exists(d.path / "checkpoints" / "step_00000004"));        // newer: not this commit's to prune
  std::ifstream f(fs::path(re) / "payload.txt");
  std::string text;
  std::getline(f, text);
  CHECK(text == "second run");
  int leftovers = 0;
  for (const auto& e : fs::directory_iterator(d.path / "checkpoints"))
    leftovers += e.path().filename().string().rfind(".", 0) == 0;
  CHECK(leftovers == 0);  // no temporary or set-aside folders left behind
}

TEST_CASE("resuming twice from an early step sets each abandoned future aside under its own name, and moves latest",
          "[checkpoint][resume]") {
  TempDir d("ckpt");
  const fs::path root = d.path / "checkpoints";
  auto save = [&](int64_t step, const std::string& text) {
    CheckpointWriter w(d.path.string(), step, "contrastive");
    w.add_text("payload.txt", text);
    return w.commit(/*keep_last=*/10);
  };
  auto latest = [&] {
    std::ifstream f(root / "latest");
    std::string name;
    f >> name;
    return name;
  };
  for (int64_t s : {1, 2, 3}) save(s, "first");
  CHECK(set_aside_checkpoints_after(d.path.string(), 1) ==
        std::vector<std::string>{"step_00000002 -> abandoned-step_00000002", "step_00000003 -> abandoned-step_00000003"});
  CHECK(latest() == "step_00000001");
  CHECK(find_latest_checkpoint(d.path.string()) == (root / "step_00000001").string());
  // The resumed run saves steps 2 and 3 again, and is resumed from step 1 once more.
  for (int64_t s : {2, 3}) save(s, "second");
  const auto moved = set_aside_checkpoints_after(d.path.string(), 1);
  CHECK(moved == std::vector<std::string>{"step_00000002 -> abandoned-step_00000002-2",
                                          "step_00000003 -> abandoned-step_00000003-2"});
  CHECK_FALSE(fs::exists(root / "step_00000002"));
  CHECK_FALSE(fs::exists(root / "step_00000003"));
  CHECK(latest() == "step_00000001");
  CHECK(find_latest_checkpoint(d.path.string()) == (root / "step_00000001").string());
  std::ifstream first(root / "abandoned-step_00000003" / "payload.txt"), second(root / "abandoned-step_00000003-2" / "payload.txt");
  std::string a, b;
  first >> a;
  second >> b;
  CHECK(a == "first");
  CHECK(b == "second");
  // Resumed from before every checkpoint (step 0): nothing is left for latest to name.
  CHECK(set_aside_checkpoints_after(d.path.string(), 0).size() == 1);
  CHECK_FALSE(fs::exists(root / "latest"));
  CHECK(find_latest_checkpoint(d.path.string()).empty());
}

TEST_CASE("a manifest with wrongly typed fields is a named DataError, and resolve_checkpoint explains", "[checkpoint]") {
  TempDir d("ckpt");
  CheckpointWriter w(d.path.string(), 1, "contrastive");
  w.add_text("a.txt", "x");
  const std::string good = w.commit(3);
  fs::create_directories(d.path / "checkpoints" / "step_00000009");
  write_file((d.path / "checkpoints" / "step_00000009" / "MANIFEST.json").string(),
             R"({"format_version": 1, "step": "9", "files": {"a.txt": {"bytes": 1, "crc32": 0}}})");
  CHECK_THROWS_WITH(verify_checkpoint((d.path / "checkpoints" / "step_00000009").string()), Catch::Contains("damaged manifest"));
  CHECK(resolve_checkpoint(d.path.string()) == good);  // the damaged newer one is skipped
  CHECK_THROWS_WITH(resolve_checkpoint(d.file("nope")), Catch::Contains("does not exist"));
}

TEST_CASE("a damaged or partial checkpoint is detected, named, and skipped by resume auto", "[checkpoint]") {
  TempDir d("ckpt");
  for (int64_t step : {1, 2}) {
    CheckpointWriter w(d.path.string(), step, "contrastive");
    w.add_text("weights.bin", std::string(1000, static_cast<char>('a' + step)));
    w.commit(5);
  }
  const fs::path newest = d.path / "checkpoints" / "step_00000002";
  // Flip one byte: same size, wrong checksum.
  {
    std::fstream f(newest / "weights.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(500);
    f.put('z');
  }
  CHECK_THROWS_WITH(verify_checkpoint(newest.string()),
                    Catch::Contains((newest / "weights.bin").string() + "' fails its checksum"));
  std::vector<std::string> warnings;
  CHECK(find_latest_checkpoint(d.path.string(), [&](const std::string& w) { warnings.push_back(w); }) ==
        (d.path / "checkpoints" / "step_00000001").string());
  CHECK(warnings.size() == 1);

  // Truncated file.
  fs::resize_file(newest / "weights.bin", 10);
  CHECK_THROWS_WITH(verify_checkpoint(newest.string()), Catch::Contains("has 10 bytes, expected 1000"));

  // A save that never committed (writer destroyed) leaves no trace; a directory without a
  // manifest (killed before the rename completed its contents) is ignored.
  {
    CheckpointWriter w(d.path.string(), 3, "contrastive");
    w.add_text("weights.bin", "partial");
  }
  CHECK_FALSE(fs::exists(d.path / "checkpoints" / "step_00000003"));
  fs::create_directories(d.path / "checkpoints" / "step_00000004");
  write_file((d.path / "checkpoints" / "step_00000004" / "weights.bin").string(), "x");
  CHECK(find_latest_checkpoint(d.path.string()) == (d.path / "checkpoints" / "step_00000001").string());
}

TEST_CASE("damaged training state (optimizer, RNG) stops a resume but not the readers of the weights", "[checkpoint]") {
  TempDir d("ckpt_state");
  for (int64_t step : {1, 2}) {
    CheckpointWriter w(d.path.string(), step, "contrastive");
    w.add_text("model.safetensors", std::string(1000, static_cast<char>('a' + step)));
    w.add_text("optimizer.safetensors", std::string(2000, 'o'));
    w.add_text("rng.safetensors", std::string(100, 'r'));
    w.commit(5);
  }
  const fs::path older = d.path / "checkpoints" / "step_00000001", newest = d.path / "checkpoints" / "step_00000002";
  for (const char* file : {"optimizer.safetensors", "rng.safetensors"}) {
    INFO(file);
    const std::string path = (newest / file).string();
    const std::string good = read_text_file(path);
    write_file(path, std::string(good.size(), 'x'));  // same size, wrong checksum
    CHECK_THROWS_WITH(verify_checkpoint(newest.string()), Catch::Contains(path + "' fails its checksum"));
    CHECK(verify_checkpoint(newest.string(), CheckpointUse::Weights).step == 2);
    std::vector<std::string> warnings;
    auto warn = [&](const std::string& w) { warnings.push_back(w); };
    CHECK(resolve_checkpoint(d.path.string(), warn) == older.string());  // resume: the newest whole one
    CHECK(warnings.size() == 1);
    CHECK(resolve_checkpoint(d.path.string(), warn, CheckpointUse::Weights) == newest.string());
    CHECK(warnings.size() == 1);
    write_file(path, good);
  }
  // The weights themselves damaged: readers skip the checkpoint too.
  write_file((newest / "model.safetensors").string(), std::string(1000, 'x'));
  CHECK_THROWS_WITH(verify_checkpoint(newest.string(), CheckpointUse::Weights),
                    Catch::Contains((newest / "model.safetensors").string() + "' fails its checksum"));
  CHECK(resolve_checkpoint(d.path.string(), {}, CheckpointUse::Weights) == older.string());
}

TEST_CASE("resume auto refuses to start over when every checkpoint is damaged", "[checkpoint]") {
  TempDir d("ckpt_all_bad");
  CHECK(select_resume_checkpoint(d.path.string(), "auto").empty());  // nothing there: a fresh start
  {
    CheckpointWriter w(d.path.string(), 2, "contrastive");
    w.add_text("weights.bin", std::string(1000, 'w'));
    w.commit(5);
  }
  const fs::path only = d.path / "checkpoints" / "step_00000002";
  CHECK(select_resume_checkpoint(d.path.string(), "auto") == only.string());
  fs::resize_file(only / "weights.bin", 10);
  // Starting fresh here would let keep_last delete the damaged checkpoint.
  CHECK_THROWS_WITH(select_resume_checkpoint(d.path.string(), "auto"),
                    Catch::Contains("resume auto: every checkpoint in '" + d.path.string() + "/checkpoints' is damaged") &&
                        Catch::Contains("not starting over"));
  CHECK(fs::exists(only / "weights.bin"));
}

TEST_CASE("keep_every: milestones survive pruning and do not count against keep_last", "[checkpoint]") {
  TempDir d("ckpt");
  for (int64_t step = 1; step <= 7; ++step) {
    CheckpointWriter w(d.path.string(), step, "contrastive");
    w.add_text("payload.txt", std::to_string(step));
    w.commit(/*keep_last=*/2, /*keep_every=*/3);
  }
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(d.path / "checkpoints"))
    if (e.is_directory()) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  CHECK(left == std::vector<std::string>{"step_00000003", "step_00000006", "step_00000007"});
}

namespace {

// Saves checkpoints step, step+1, ... of two 256 KiB files each in a child process, which a
// fault hook or the parent kills. Only the filesystem is touched in the child (no LibTorch).
pid_t spawn_writer(const std::string& run_dir, int64_t first_step, const char* kill_at, int kill_hit) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  int hits = 0;
  if (kill_at)
    set_checkpoint_fault_hook([&](const char* point) {
      if (std::strcmp(point, kill_at) == 0 && ++hits == kill_hit) ::raise(SIGKILL);
    });
  for (int64_t step = first_step; step < first_step + 200; ++step) {
    CheckpointWriter w(run_dir, step, "contrastive");
    w.add_text("a.bin", std::string(256 << 10, static_cast<char>('a' + step % 26)));
    w.add_text("b.bin", std::string(256 << 10, static_cast<char>('A' + step % 26)));
    w.commit(2);
  }
  ::_exit(0);
}

// After a kill: `latest` names a complete checkpoint, resume auto finds one at least as new,
// and a resumed writer tidies what the dead one left.
int64_t check_after_kill(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  recover_checkpoints(run_dir);  // what a resuming trainer does first
  std::ifstream latest(root / "latest");
  std::string name;
  latest >> name;
  REQUIRE_FALSE(name.empty());
  const auto named = verify_checkpoint((root / name).string());  // throws if damaged
  const std::string found = find_latest_checkpoint(run_dir);
  REQUIRE_FALSE(found.empty());
  const auto info = verify_checkpoint(found);
  CHECK(info.step >= named.step);
  for (const auto& e : fs::directory_iterator(root)) {
    const std::string n = e.path().filename().string();
    INFO(n);
    CHECK((n == "latest" || n.rfind("step_", 0) == 0));
  }
  return info.step;
}

}  // namespace

TEST_CASE("a writer killed at every point of a save leaves the previous checkpoint loadable", "[checkpoint][crash]") {
  TempDir d("kill");
  {
    CheckpointWriter w(d.path.string(), 1, "contrastive");
    w.add_text("a.bin", "first");
    w.commit(2);
  }
  int64_t newest = 1;
  // Deterministic points: mid-files, checksummed, manifest written, renamed, latest moved, pruned,
  // each in a new step's save and in a re-save of an existing step (which first moves it aside).
  for (const char* point : {"file", "checksummed", "manifest", "aside", "renamed", "latest", "pruned"}) {
    for (const int64_t first : {newest + 1, newest}) {
      if (std::strcmp(point, "aside") == 0 && first != newest) continue;  // only re-saves move one aside
      INFO(point << " first step " << first);
      const pid_t pid = spawn_writer(d.path.string(), first, point, first == newest ? 1 : 2);
      int status = 0;
      ::waitpid(pid, &status, 0);
      CHECK(WIFSIGNALED(status));
      newest = check_after_kill(d.path.string());
    }
  }
  // Random points: kill from outside after a random delay, 20 times.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    const pid_t pid = spawn_writer(d.path.string(), newest + 1, nullptr, 0);
    ::usleep(std::uniform_int_distribution<int>(0, 40000)(rng));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    INFO("trial " << trial);
    newest = check_after_kill(d.path.string());
  }
  CHECK(newest > 1);  // the writers did get checkpoints through
}

TEST_CASE("a resume drops later metrics records, and on a full disk leaves the file as it was", "[checkpoint][crash]") {
  TempDir d("metrics");
  const std::string path = d.file("metrics.jsonl");
  std::string text;
  for (int step = 1; step <= 4000; ++step)
    text += "{\"step\": " + std::to_string(step) + ", \"split\": \"train\", \"loss\": 0.125}\n";
  write_file(path, text + "{\"step\": 4001, \"spl");  // the last line cut by a crash
  // Nothing after step 4000 but the cut line: it goes, the rest stays byte for byte.
  truncate_metrics_after(path, 4000);
  CHECK(read_text_file(path) == text);
  // A file-size limit makes the rewrite fail as on a full disk: an error naming the file, which
  // keeps every record (the kept 2,000 lines are over the limit).
  const std::string error = error_with_file_size_limit(64 << 10, [&] { truncate_metrics_after(path, 2000); });
  CHECK_THAT(error, Catch::Contains("cannot drop the records after step 2000 from " + path) &&
                        Catch::Contains("the file is unchanged"));
  CHECK(read_text_file(path) == text);
  int others = 0;
  for (const auto& e : fs::directory_iterator(d.path)) others += e.path().filename() != "metrics.jsonl";
  CHECK(others == 0);  // the partial copy is gone
  // With room again, exactly steps 1-2000 remain.
  truncate_metrics_after(path, 2000);
  CHECK(read_text_file(path) == text.substr(0, text.find("{\"step\": 2001,")));
}

TEST_CASE("disk full or an output folder that cannot be made: a clear error, the last checkpoint intact", "[checkpoint][crash]") {
  TempDir d("full");
  {
    CheckpointWriter w(d.path.string(), 1, "contrastive");
    w.add_text("a.bin", "good");
    w.commit(2);
  }
  const std::string error = error_with_file_size_limit(64 << 10, [&] {
    CheckpointWriter w(d.path.string(), 2, "contrastive");
    w.add_text("a.bin", std::string(1 << 20, 'x'));
    w.commit(2);
  });
  CHECK_THAT(error, Catch::Contains("a.bin") && Catch::Contains("disk full?"));
  CHECK(find_latest_checkpoint(d.path.string()) == (d.path / "checkpoints" / "step_00000001").string());
  CHECK_FALSE(fs::exists(d.path / "checkpoints" / "step_00000002"));
  int hidden = 0;
  for (const auto& e : fs::directory_iterator(d.path / "checkpoints")) hidden += e.path().filename().string()[0] == '.';
  CHECK(hidden == 0);  // the failed save's temporary folder is gone

  // A run folder under a regular file cannot be created, whoever runs the test (root included).
  write_file(d.file("plainfile"), "x");
  CHECK_THROWS_WITH(CheckpointWriter(d.file("plainfile/run"), 1, "contrastive"),
                    Catch::Contains("cannot create checkpoint folder") && Catch::Contains("plainfile/run"));
}

TEST_CASE("resume state that does not fit is a DataError naming the file, and a good one restores optimizer and RNG",
          "[checkpoint]") {
  test::TempDir d("resume");
  auto w = torch::ones({3}, torch::requires_grad());
  torch::optim::AdamW opt({w}, torch::optim::AdamWOptions(0.1).weight_decay(0.25));
  (w * w).sum().backward();
  opt.step();
  const std::string file = d.file("optimizer.safetensors");
  save_optimizer_state(opt, file);
  torch::manual_seed(5);
  save_safetensors(d.file("rng.safetensors"), {{"torch_cpu", get_rng_state()}});
  const double expected = torch::rand({1}).item<double>();  // the draw right after that state
  const auto& saved = static_cast<const torch::optim::AdamWParamState&>(*opt.state().begin()->second);

  // A good pair: the optimizer's step count, moments, options and the next random draw come back.
  auto w2 = torch::zeros({3}, torch::requires_grad());
  torch::optim::AdamW opt2({w2}, torch::optim::AdamWOptions(0.5));
  torch::manual_seed(99);
  load_resume_state(d.path.string(), opt2);
  CHECK(torch::rand({1}).item<double>() == expected);
  REQUIRE(opt2.state().size() == 1);
  const auto& st = static_cast<const torch::optim::AdamWParamState&>(*opt2.state().at(
      c10::guts::to_string(w2.unsafeGetTensorImpl())));
  CHECK(st.step() == 1);
  CHECK(torch::equal(st.exp_avg(), saved.exp_avg()));
  CHECK(torch::equal(st.exp_avg_sq(), saved.exp_avg_sq()));
  const auto& o2 = static_cast<const torch::optim::AdamWOptions&>(opt2.param_groups()[0].options());
  CHECK(o2.lr() == 0.1);
  CHECK(o2.weight_decay() == 0.25);
  // Written again from the other optimizer (other tensor addresses): the same bytes.
  save_optimizer_state(opt2, d.file("again.safetensors"));
  CHECK(crc32_file(d.file("again.safetensors")) == crc32_file(file));

  auto fails_with = [&](const std::string& text) {
    CHECK_THAT(test::message_of<DataError>([&] { load_resume_state(d.path.string(), opt2); }),
               Catch::Contains(text) && Catch::Contains("resume from an earlier checkpoint (move this one aside)"));
  };
  // Another model's optimizer: two parameters where this one has one.
  auto a = torch::ones({2}, torch::requires_grad()), b = torch::ones({2}, torch::requires_grad());
  torch::optim::AdamW other({a, b}, torch::optim::AdamWOptions(0.1));
  save_optimizer_state(other, file);
  fails_with(file + " does not restore this run's optimizer (group 0 has 2 parameters, this run's 1)");
  // The same count, another shape.
  auto c = torch::ones({4}, torch::requires_grad());
  torch::optim::AdamW wrong({c}, torch::optim::AdamWOptions(0.1));
  (c * c).sum().backward();
  wrong.step();
  save_optimizer_state(wrong, file);
  fails_with("state.0.exp_avg is Float [4], the parameter Float [3]");
  test::write_file(file, "not a safetensors file");
  fails_with(file + " does not restore this run's optimizer");

  // A checkpoint from before optimizer.safetensors: its optimizer.pt is read instead.
  fs::remove(file);
  torch::save(opt, d.file("optimizer.pt"));
  torch::optim::AdamW opt3({w2}, torch::optim::AdamWOptions(0.5));
  load_resume_state(d.path.string(), opt3);
  CHECK(static_cast<const torch::optim::AdamWParamState&>(*opt3.state().begin()->second).step() == 1);
  test::write_file(d.file("optimizer.pt"), "not a zip archive");
  fails_with(d.file("optimizer.pt") + " does not restore this run's optimizer");

  save_optimizer_state(opt, file);
  save_safetensors(d.file("rng.safetensors"), {{"cuda", get_rng_state()}});
  fails_with(d.file("rng.safetensors") + " holds no 'torch_cpu' tensor");
  save_safetensors(d.file("rng.safetensors"), {{"torch_cpu", torch::zeros({7}, torch::kUInt8)}});
  fails_with(d.file("rng.safetensors") + ": 'torch_cpu' is not a CPU generator state");
}
