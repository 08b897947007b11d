// Faults in the middle of a run: a non-finite loss or gradient (injected) and a batch that cannot
// be built (an image whose body is corrupt), under train.on_nonfinite / train.on_bad_batch skip
// and stop; a stopped run resumes from the last good state.
#include <catch2/catch.hpp>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/checkpoint.h"
#include "core/config_tree.h"
#include "core/errors.h"
#include "core/safetensors.h"
#include "data/manifest.h"
#include "data/shapes_world.h"
#include "data/tokenizer.h"
#include "test_helpers.h"
#include "trainers/common.h"
#include "tools/data_check.h"
#include "trainers/contrastive.h"

#include <unistd.h>

namespace fs = std::filesystem;
using namespace trialign;
using trialign::test::quiet;
using trialign::test::TempDir;

namespace {

struct Corpus {
  TempDir dir{"faults"};
  Corpus() {
    shapes::GeneratorOptions g;
    g.image_size = 32;
    g.max_objects = 2;
    g.seed = 3;
    shapes::write_dataset(dir.file("data"), 32, 0, g);
    trialign::test::train_test_tokenizer(dir.file("data/train.jsonl"), dir.file("data/tok"), 48);
  }
  RunConfig config(const std::string& out, int64_t steps, std::vector<std::string> extra = {}) const {
    return trialign::test::config_from_overrides(sets(out, steps, std::move(extra)), "faults");
  }
  std::vector<std::string> sets(const std::string& out, int64_t steps, std::vector<std::string> extra = {}) const {
    std::vector<std::string> sets = {
        "data.train=" + dir.file("data/train.jsonl"), "data.tokenizer=" + dir.file("data/tok.model"),
        "data.image_size=32", "data.max_text_len=24", "data.workers=1", "run.out_dir=" + dir.file(out),
        "run.threads=1", "run.seed=5", "run.precision=fp32", "model.vision.image_size=32", "model.vision.hidden_size=16",
        "model.vision.intermediate_size=32", "model.vision.num_hidden_layers=1", "model.vision.num_attention_heads=2",
        "model.text.hidden_size=16", "model.text.intermediate_size=32", "model.text.num_hidden_layers=1",
        "model.text.num_attention_heads=2", "model.text.max_position_embeddings=24", "model.projection_dim=16",
        "train.batch_size=8", "train.steps=" + std::to_string(steps), "train.log_every=1", "train.save_every=1",
        "train.keep_last=20", "optim.lr=2e-3", "schedule.warmup_steps=0"};
    sets.insert(sets.end(), extra.begin(), extra.end());
    return sets;
  }
  std::map<std::string, torch::Tensor> weights(const std::string& run, int64_t step) const;
};

std::string checkpoint_name(int64_t step);

std::map<std::string, torch::Tensor> Corpus::weights(const std::string& run, int64_t step) const {
  return load_safetensors(dir.file(run) + "/checkpoints/" + checkpoint_name(step) + "/model.safetensors");
}

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::vector<nlohmann::json> train_records(const std::string& run) {
  std::vector<nlohmann::json> out;
  std::ifstream in(run + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["split"] == "train") out.push_back(j);
  }
  return out;
}

bool same(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  for (const auto& [k, v] : a)
    if (!torch::equal(v, b.at(k))) return false;
  return true;
}

}  // namespace

TEST_CASE("a non-finite gradient: skip leaves the weights as they were and counts it", "[faults]") {
  Corpus c;
  TrainOptions o = quiet();
  o.nonfinite_at_step = 2;
  const auto r = train_contrastive(c.config("run", 4, {"train.on_nonfinite=skip"}), o);
  CHECK(r.final_step == 4);
  CHECK(same(c.weights("run", 1), c.weights("run", 2)));       // step 2 applied nothing
  CHECK_FALSE(same(c.weights("run", 2), c.weights("run", 3)));  // training goes on
  const auto recs = train_records(c.dir.file("run"));
  REQUIRE(recs.size() == 4);
  CHECK_FALSE(recs[0].contains("skipped_steps"));
  CHECK(recs[1]["grad_norm"].is_null());  // NaN in JSON
  CHECK(recs[1]["skipped_steps"] == 1);
  CHECK(recs[3]["skipped_steps"] == 1);
  CHECK(std::isfinite(recs[3]["loss"].get<double>()));

  SECTION("more skips in a row than train.max_skipped_steps stop the run with a checkpoint") {
    TrainOptions many = quiet();
    many.nonfinite_at_step = 2;
    many.nonfinite_steps = 3;
    CHECK_THROWS_WITH(train_contrastive(c.config("many", 6, {"train.on_nonfinite=skip", "train.max_skipped_steps=2"}), many),
                      Catch::Contains("3 steps in a row skipped (train.max_skipped_steps 2)"));
    CHECK(find_latest_checkpoint(c.dir.file("many")).find(checkpoint_name(3)) != std::string::npos);
  }
}

TEST_CASE("a non-finite gradient: stop writes the last good state, and resuming from it equals a clean run",
          "[faults][resume]") {
  Corpus c;
  const auto clean = train_contrastive(c.config("clean", 4), quiet());
  TrainOptions o = quiet();
  o.nonfinite_at_step = 3;
  CHECK_THROWS_WITH(train_contrastive(c.config("run", 4), o),
                    Catch::Contains("step 3: non-finite gradient norm") && Catch::Contains("nothing was applied") &&
                        Catch::Contains(checkpoint_name(2) + " holds the last good state"));
  CHECK(find_latest_checkpoint(c.dir.file("run")).find(checkpoint_name(2)) != std::string::npos);
  CHECK(same(c.weights("run", 2), c.weights("clean", 2)));
  TrainOptions resume = quiet();
  resume.resume = "auto";
  const auto r = train_contrastive(c.config("run", 4), resume);
  CHECK(r.final_step == 4);
  CHECK(same(c.weights("run", 4), c.weights("clean", 4)));
}

TEST_CASE("a batch that cannot be built (an image with a corrupt body): skip or stop, then resume", "[faults][resume]") {
  Corpus c;
  // Keep the PNG signature (the load-time check passes) and cut the rest: decoding fails mid-run.
  const auto records = read_manifest(c.dir.file("data/train.jsonl"));
  const std::string image = c.dir.file("data/" + records.at(5).json["image"].get<std::string>());
  const std::string original = read_text_file(image);
  test::write_file(image, original.substr(0, 40));

  SECTION("data.check_images (the default) finds it before the first step") {
    CHECK_THROWS_WITH(train_contrastive(c.config("run", 4), quiet()),
                      Catch::Contains("data.check_images: 1 of 32 training images cannot be decoded") &&
                          Catch::Contains(image) && Catch::Contains("train.on_bad_batch: skip"));
    CHECK(find_latest_checkpoint(c.dir.file("run")).empty());  // nothing trained, nothing saved
    test::write_file(image, original);
    CHECK(train_contrastive(c.config("run", 1), quiet()).final_step == 1);
    CHECK(fs::exists(c.dir.file("run/image_check.json")));  // a resume over the same files skips the check
  }
  SECTION("skip: data.check_images leaves the record out; the run equals one on the manifest without it") {
    const auto r = train_contrastive(c.config("run", 4, {"train.on_bad_batch=skip"}), quiet());
    CHECK(r.final_step == 4);
    for (const auto& rec : train_records(c.dir.file("run"))) CHECK_FALSE(rec.contains("skipped_steps"));
    // The checkpoints record the 31 records trained on, and the check keeps what it found.
    const auto state = nlohmann::json::parse(read_text_file(c.dir.file("run/checkpoints/" + checkpoint_name(4)) +
                                                            "/trainer_state.json"));
    CHECK(state["data"]["records"] == 31);
    const auto stamp = nlohmann::json::parse(read_text_file(c.dir.file("run/image_check.json")));
    CHECK(stamp["undecodable"] == nlohmann::json::array({image}));
    // The sampler draws the other 31 in their order, as it would a manifest that lacks the record.
    std::string without;
    std::istringstream lines(read_text_file(c.dir.file("data/train.jsonl")));
    int64_t n = 0;
    for (std::string line; std::getline(lines, line);)
      if (n++ != 5) without += line + "\n";
    test::write_file(c.dir.file("data/without.jsonl"), without);
    train_contrastive(c.config("ref", 4, {"data.train=" + c.dir.file("data/without.jsonl")}), quiet());
    for (int64_t s = 1; s <= 4; ++s) {
      INFO("step " << s);
      CHECK(same(c.weights("run", s), c.weights("ref", s)));
    }
    // A resume over the same files reads the list from image_check.json without decoding again;
    // under stop, the list is the error.
    TrainOptions resume = quiet();
    resume.resume = "auto";
    CHECK(train_contrastive(c.config("run", 6, {"train.on_bad_batch=skip"}), resume).final_step == 6);
    CHECK_THROWS_WITH(train_contrastive(c.config("run", 8), resume),
                      Catch::Contains("data.check_images: 1 of 32 training images cannot be decoded") &&
                          Catch::Contains(image + ": found by an earlier check of the same files"));
  }
  SECTION("skip without data.check_images: the step whose batch holds the image applies nothing; the run finishes") {
    const auto r = train_contrastive(c.config("run", 4, {"train.on_bad_batch=skip", "data.check_images=false"}), quiet());
    CHECK(r.final_step == 4);
    const auto recs = train_records(c.dir.file("run"));
    REQUIRE(recs.size() == 3);  // the skipped step has nothing to log
    CHECK(recs.back()["skipped_steps"] == 1);
    int64_t skipped = 1;  // the step missing from the log
    for (const auto& rec : recs) skipped += rec["step"] == skipped;
    // The 32 records fill steps 1-4 once: the record's step applied nothing, the others did.
    for (int64_t s = 2; s <= 4; ++s) {
      INFO("step " << s << ", skipped " << skipped);
      CHECK(same(c.weights("run", s - 1), c.weights("run", s)) == (s == skipped));
    }
  }
  SECTION("stop (the default): the error names the image, a checkpoint holds the last good state, resume finishes") {
    std::string message;
    try {  // without the check before the first step, the loader meets the image mid-run
      train_contrastive(c.config("run", 4, {"data.check_images=false"}), quiet());
    } catch (const DataError& e) {
      message = e.what();
    }
    CHECK_THAT(message, Catch::Contains(image));
    CHECK_THAT(message, Catch::Contains("holds the last good state"));
    CHECK_THAT(message, Catch::Contains("train.on_bad_batch: skip"));
    test::write_file(image, original);  // fixed
    TrainOptions resume = quiet();
    resume.resume = "auto";
    const auto r = train_contrastive(c.config("run", 4, {"data.check_images=false"}), resume);
    CHECK(r.final_step == 4);
    const auto clean = train_contrastive(c.config("clean", 4), quiet());
    CHECK(same(c.weights("run", 4), c.weights("clean", 4)));
  }
}

TEST_CASE("a run folder another process trains in is refused before anything is written, and is free after a run",
          "[faults][lock]") {
  Corpus c;
  const std::string run = c.dir.file("busy");
  fs::create_directories(run);
  std::vector<std::string> files_before;
  {
    // flock locks belong to an open file, so a second open in this same process is refused just
    // as another process would be.
    const RunFolderLock other = RunFolderLock::acquire(run);
    REQUIRE(other.held());
    const std::string msg = test::message_of<ConfigError>([&] { train_contrastive(c.config("busy", 2), quiet()); });
    CHECK_THAT(msg, Catch::Contains("run.out_dir '" + run + "' is in use by another trialign process (pid " +
                                    std::to_string(::getpid()) + " on "));
    CHECK_THAT(msg, Catch::Contains("choose another run.out_dir"));
    for (const auto& e : fs::directory_iterator(run)) files_before.push_back(e.path().filename().string());
    CHECK(files_before == std::vector<std::string>{".trialign.lock"});  // no config.yaml, train.log, metrics
  }
  CHECK(train_contrastive(c.config("busy", 2), quiet()).final_step == 2);
  CHECK(RunFolderLock::acquire(run).held());  // the trainer let go when it returned

  // Across processes, through the CLI: flock(1) holds the lock while trialign runs under it, one
  // process and two ranks (rank 0 holds the folder; both ranks must stop, neither hangs).
  std::string cmd = "flock " + c.dir.file("cli") + "/.trialign.lock " + TRIALIGN_BINARY + " train " +
                    test::source_dir() + "/configs/stage1_contrastive.yaml";
  for (const auto& s : c.sets("cli", 2, {"data.val=" + c.dir.file("data/train.jsonl")})) cmd += " --set '" + s + "'";
  fs::create_directories(c.dir.file("cli"));
  for (const std::string nproc : {"", " --nproc 2"}) {
    INFO("trialign train" << nproc);
    std::string out;
    CHECK(test::run_command(cmd + nproc, &out) == 2);
    // flock(1) created the file and wrote no holder: not taken for a trialign process.
    CHECK_THAT(out, Catch::Contains("run.out_dir '" + c.dir.file("cli") + "' is locked by another process:"));
    CHECK(!fs::exists(c.dir.file("cli/train.log")));
    CHECK(!fs::exists(c.dir.file("cli/checkpoints")));
  }
  {
    // The text of a trialign process that has ended, with something else holding the lock now.
    char host[128] = {0};
    ::gethostname(host, sizeof(host) - 1);
    test::write_file(c.dir.file("cli/.trialign.lock"), "pid 999999999 on " + std::string(host) + "\n");
    std::string stale;
    CHECK(test::run_command(cmd, &stale) == 2);
    CHECK_THAT(stale, Catch::Contains("is locked by another process (not pid 999999999, the last trialign process "
                                      "recorded there: it has ended)"));
  }
  std::string out;
  CHECK(test::run_command(cmd.substr(cmd.find(TRIALIGN_BINARY)), &out) == 0);  // free: the same command trains
  CHECK(fs::exists(c.dir.file("cli/checkpoints/latest")));
}

TEST_CASE("a stop signal during an evaluation abandons it: the checkpoint comes at once, and resuming equals a clean run",
          "[faults][resume]") {
  Corpus c;
  // The training records double as held-out pairs: only the evaluation's timing matters here.
  const std::vector<std::string> ev = {"data.val=" + c.dir.file("data/train.jsonl"), "train.eval_every=2",
                                       "train.save_every=0", "data.check_images=false"};
  const auto clean = train_contrastive(c.config("clean", 4, ev), quiet());
  REQUIRE(clean.final_eval.contains("i2t/R@1"));
  struct HookReset {
    ~HookReset() { set_evaluation_hook({}); }
  } reset;
  int64_t stop_at = -1;
  std::vector<int64_t> begun;
  set_evaluation_hook([&](int64_t step) {
    begun.push_back(step);
    if (step == stop_at) std::raise(SIGTERM);  // the real handler: as if Ctrl-C came as it began
  });
  auto val_steps = [&](const std::string& run) {
    std::vector<int64_t> steps;
    std::ifstream in(c.dir.file(run) + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line);
      if (j["split"] == "val") steps.push_back(j["step"].get<int64_t>());
    }
    return steps;
  };
  std::vector<int64_t> resumed_val_steps;
  SECTION("the evaluation after step 2: abandoned, checkpoint of step 2, resume goes on to 4") {
    stop_at = 2;
    resumed_val_steps = {4};
    const auto r = train_contrastive(c.config("run", 4, ev), quiet());
    CHECK(r.interrupted);
    CHECK(r.final_step == 2);
    CHECK(fs::path(r.checkpoint).filename() == "step_00000002");
    CHECK(val_steps("run").empty());  // an abandoned evaluation records nothing
    CHECK(begun == std::vector<int64_t>{2});
  }
  SECTION("the final evaluation: the final checkpoint stands, no eval.json, resume evaluates") {
    stop_at = 4;
    resumed_val_steps = {2, 4};
    const auto r = train_contrastive(c.config("run", 4, ev), quiet());
    CHECK(r.interrupted);  // exit 75: a pipeline does not take the stage as done
    CHECK(r.final_step == 4);
    CHECK(fs::path(r.checkpoint).filename() == "step_00000004");
    CHECK(!fs::exists(c.dir.file("run/eval.json")));
    CHECK(val_steps("run") == std::vector<int64_t>{2});
    CHECK(same(c.weights("run", 4), c.weights("clean", 4)));
  }
  stop_at = -1;
  TrainOptions resume = quiet();
  resume.resume = "auto";
  const auto r = train_contrastive(c.config("run", 4, ev), resume);
  CHECK(!r.interrupted);
  CHECK(r.final_step == 4);
  CHECK(r.final_eval == clean.final_eval);
  CHECK(fs::exists(c.dir.file("run/eval.json")));
  CHECK(same(c.weights("run", 4), c.weights("clean", 4)));
  CHECK(val_steps("clean") == std::vector<int64_t>{2, 4});
  // An abandoned evaluation in mid-run stays unrecorded; an abandoned final one is recorded by
  // the resume, once.
  CHECK(val_steps("run") == resumed_val_steps);
}

TEST_CASE("a stop signal before the first step: no step trains, no checkpoint, and the next start is a clean run",
          "[faults][resume]") {
  Corpus c;
  const std::vector<std::string> ev = {"data.val=" + c.dir.file("data/train.jsonl"), "eval.at_start=true"};
  const auto clean = train_contrastive(c.config("clean", 2, ev), quiet());
  struct HookReset {
    ~HookReset() {
      set_evaluation_hook({});
      set_before_training_hook({});
    }
  } reset;
  std::vector<std::string> phases;
  set_before_training_hook([&](const std::string& during) { phases.push_back(during); });
  std::string expected;
  size_t phases_seen = 0;  // the phases that ended before the stop: the image check, then the evaluation
  SECTION("during the evaluation before the first step") {
    phases_seen = 2;
    set_evaluation_hook([](int64_t step) {
      if (step == 0) std::raise(SIGTERM);  // the real handler, as the evaluation begins
    });
    expected = "stop requested during the evaluation before the first step (eval.at_start), before the first training "
               "step: nothing was trained and no checkpoint written";
  }
  SECTION("during the check of the training images") {
    set_before_training_hook([&](const std::string& during) {
      phases.push_back(during);
      if (during.find("check of the training images") != std::string::npos) std::raise(SIGTERM);
    });
    phases_seen = 1;
    expected = "stop requested during the check of the training images (data.check_images)";
  }
  CHECK_THAT(test::message_of<StoppedBeforeTraining>([&] { train_contrastive(c.config("run", 2, ev), quiet()); }),
             Catch::Contains(expected));
  CHECK(phases.size() == phases_seen);
  CHECK_FALSE(fs::exists(c.dir.file("run/checkpoints")));
  {
    std::ifstream in(c.dir.file("run/metrics.jsonl"));
    for (std::string line; std::getline(in, line);) CHECK(nlohmann::json::parse(line)["split"] != "train");
  }
  set_evaluation_hook({});
  set_before_training_hook({});
  TrainOptions resume = quiet();
  resume.resume = "auto";  // finds no checkpoint: starts from the beginning
  const auto r = train_contrastive(c.config("run", 2, ev), resume);
  CHECK(r.final_step == 2);
  CHECK(r.start_eval == clean.start_eval);
  CHECK(same(c.weights("run", 2), c.weights("clean", 2)));
}

TEST_CASE("the image check before training stops early when asked, recording nothing", "[faults][data]") {
  Corpus c;
  auto cfg = c.config("run", 1);
  std::filesystem::create_directories(cfg.run.out_dir);
  const std::string bad = c.dir.file("bad.png");
  test::write_file(bad, "\x89PNG\r\n\x1a\n not really");
  const ImageRefs refs = {{"bad.jsonl:1", bad}, {"bad.jsonl:2", bad}};
  int asked = 0;
  check_images_before_training(cfg, refs, [&] { return ++asked > 0; });  // stop before the first image
  CHECK(asked == 1);
  CHECK_FALSE(fs::exists(cfg.run.out_dir + "/image_check.json"));
  CHECK_THAT(test::message_of<DataError>([&] { check_images_before_training(cfg, refs, [] { return false; }); }),
             Catch::Contains("data.check_images: 1 of 1 training images cannot be decoded"));
}

TEST_CASE("resuming after an image vanished from a skip-bad-records run says the record count changed",
          "[faults][resume]") {
  Corpus c;
  TrainOptions stop = quiet();
  stop.stop_at_step = 2;
  REQUIRE(train_contrastive(c.config("run", 4, {"data.on_bad_record=skip"}), stop).interrupted);
  const std::string warning = "now gives 31 usable records, the checkpoint's run had 32";
  TrainOptions resume = quiet();
  resume.resume = "auto";
  SECTION("every image still there: no warning") {
    CHECK(train_contrastive(c.config("run", 4, {"data.on_bad_record=skip"}), resume).final_step == 4);
    CHECK_THAT(read_text_file(c.dir.file("run/train.log")), !Catch::Contains("usable records"));
  }
  SECTION("one image gone: the manifest is the same file, the warning names both counts") {
    fs::remove(c.dir.file("data/images/train/000005.png"));
    CHECK(train_contrastive(c.config("run", 4, {"data.on_bad_record=skip"}), resume).final_step == 4);
    CHECK_THAT(read_text_file(c.dir.file("run/train.log")),
               Catch::Contains(warning) && !Catch::Contains("is not the file the checkpoint's run read"));
  }
}

TEST_CASE("checkpoints record the training manifest, and resuming after it changed says so", "[faults][resume]") {
  Corpus c;
  TrainOptions stop = quiet();
  stop.stop_at_step = 2;
  REQUIRE(train_contrastive(c.config("run", 4), stop).interrupted);
  const std::string manifest = c.dir.file("data/train.jsonl");
  const std::string text = read_text_file(manifest);
  const auto state = nlohmann::json::parse(read_text_file(find_latest_checkpoint(c.dir.file("run")) + "/trainer_state.json"));
  CHECK(state["data"]["path"] == manifest);
  CHECK(state["data"]["bytes"] == text.size());
  CHECK(state["data"]["crc32"] == crc32_bytes(text.data(), text.size()));
  CHECK(state["data"]["records"] == 32);
  TrainOptions resume = quiet();
  resume.resume = "auto";
  const std::string warning = "resume: data.train " + manifest + " is not the file the checkpoint's run read";
  SECTION("the same file: no warning") {
    CHECK(train_contrastive(c.config("run", 4), resume).final_step == 4);
    CHECK_THAT(read_text_file(c.dir.file("run/train.log")), !Catch::Contains(warning));
  }
  SECTION("one record removed: resumed with a warning naming both sizes") {
    const std::string shorter = text.substr(0, text.rfind('\n', text.size() - 2) + 1);
    test::write_file(manifest, shorter);
    CHECK(train_contrastive(c.config("run", 4), resume).final_step == 4);
    CHECK_THAT(read_text_file(c.dir.file("run/train.log")),
               Catch::Contains(warning + " (" + std::to_string(text.size()) + " bytes, 32 records") &&
                   Catch::Contains("then; " + std::to_string(shorter.size()) + " bytes"));
  }
}
