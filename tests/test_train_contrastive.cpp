// Stage 1 end to end on a tiny shapes-world corpus: the loss falls, accumulation equals one big
// batch, and stop + resume equals an uninterrupted run bit for bit.
#include <catch2/catch.hpp>

#include <filesystem>

#include "core/config_tree.h"
#include "core/safetensors.h"
#include "data/shapes_world.h"
#include "data/tokenizer.h"
#include "test_helpers.h"
#include "trainers/contrastive.h"

using namespace trialign;
using trialign::test::quiet;
using trialign::test::TempDir;

namespace {

// 64 training and 32 held-out 32x32 scenes, a tokenizer, and a tiny config over them.
struct TinyCorpus {
  TempDir dir{"stage1"};
  TinyCorpus() {
    shapes::GeneratorOptions g;
    g.image_size = 32;
    g.max_objects = 2;
    g.seed = 3;
    shapes::write_dataset(dir.file("data"), 64, 32, g);
    trialign::test::train_test_tokenizer(dir.file("data/train.jsonl"), dir.file("data/tok"), 48);
  }
  RunConfig config(const std::string& out, int64_t steps, std::vector<std::string> extra = {}) const {
    std::vector<std::string> sets = {
        "data.train=" + dir.file("data/train.jsonl"), "data.val=" + dir.file("data/val.jsonl"),
        "data.tokenizer=" + dir.file("data/tok.model"), "data.image_size=32", "data.max_text_len=24",
        "data.workers=2", "run.out_dir=" + dir.file(out), "run.threads=1", "run.seed=5", "run.precision=fp32",
        "model.vision.image_size=32", "model.vision.hidden_size=32", "model.vision.intermediate_size=64",
        "model.vision.num_hidden_layers=2", "model.vision.num_attention_heads=2", "model.text.hidden_size=32",
        "model.text.intermediate_size=64", "model.text.num_hidden_layers=2", "model.text.num_attention_heads=2",
        "model.text.max_position_embeddings=24", "model.projection_dim=32", "train.batch_size=16",
        "train.steps=" + std::to_string(steps), "train.log_every=1", "optim.lr=2e-3", "schedule.warmup_steps=2",
        "eval.recall_at=[1, 5]"};
    sets.insert(sets.end(), extra.begin(), extra.end());
    return trialign::test::config_from_overrides(sets, "tiny");
  }
};

}  // namespace

TEST_CASE("stage 1 on tiny shapes world: the loss falls and the pairs it trained on are retrieved", "[train][slow]") {
  TinyCorpus c;
  // Evaluate on the 64 training pairs: 64 images are too few to generalise, but a working
  // trainer must fit them (chance R@5 = 5/64 = 0.08).
  constexpr int64_t kSteps = 400;
  auto r = train_contrastive(
      c.config("run", kSteps, {"data.val=" + c.dir.file("data/train.jsonl"), "optim.lr=3e-3", "eval.at_start=true"}),
      quiet());
  REQUIRE(r.logged_losses.size() == kSteps);
  const auto& l = r.logged_losses;
  const double first = (l[0] + l[1] + l[2]) / 3;
  const double last = (l[kSteps - 3] + l[kSteps - 2] + l[kSteps - 1]) / 3;
  INFO("first " << first << " last " << last << " eval " << r.final_eval.dump());
  CHECK(first == Approx(std::log(16.0)).margin(0.3));  // near-uniform start: ln(batch)
  CHECK(last < 0.3 * first);
  CHECK(r.final_eval["i2t/R@5"].get<double>() > 0.6);
  CHECK(r.final_eval["t2i/R@5"].get<double>() > 0.6);
  // Representation-level alignment rises with retrieval: the random encoders' image and text
  // neighbourhoods agree little (0.26 here; chance for 10 of 63 neighbours is 0.16), the trained
  // ones mostly (0.85).
  INFO("start " << r.start_eval.dump());
  CHECK(r.start_eval["alignment/mutual_knn@10"].get<double>() < 0.4);
  CHECK(r.final_eval["alignment/mutual_knn@10"].get<double>() > r.start_eval["alignment/mutual_knn@10"].get<double>() + 0.3);
  CHECK(r.final_eval["alignment/cka"].get<double>() > r.start_eval["alignment/cka"].get<double>());
  CHECK(std::filesystem::exists(c.dir.file("run/metrics.jsonl")));
  CHECK(std::filesystem::exists(c.dir.file("run/config.yaml")));
}

TEST_CASE("stop at step k + resume equals an uninterrupted run, bit for bit", "[train][resume]") {
  TinyCorpus c;
  auto full = train_contrastive(c.config("full", 8, {"train.grad_accum=2"}), quiet());

  TrainOptions stop = quiet();
  stop.stop_at_step = 3;
  auto part1 = train_contrastive(c.config("split", 8, {"train.grad_accum=2"}), stop);
  CHECK(part1.interrupted);
  CHECK(part1.final_step == 3);
  TrainOptions resume = quiet();
  resume.resume = "auto";
  auto part2 = train_contrastive(c.config("split", 8, {"train.grad_accum=2"}), resume);
  CHECK_FALSE(part2.interrupted);

  std::vector<double> joined = part1.logged_losses;
  joined.insert(joined.end(), part2.logged_losses.begin(), part2.logged_losses.end());
  CHECK(joined == full.logged_losses);  // identical, not approximately
  auto a = load_safetensors(full.checkpoint + "/model.safetensors");
  auto b = load_safetensors(part2.checkpoint + "/model.safetensors");
  REQUIRE(a.size() == b.size());
  for (const auto& [name, t] : a) {
    INFO(name);
    CHECK(torch::equal(t, b.at(name)));
  }
  CHECK(torch::equal(load_safetensors(full.checkpoint + "/loss.safetensors").at("logit_scale"),
                     load_safetensors(part2.checkpoint + "/loss.safetensors").at("logit_scale")));

  // A fresh run into a directory with checkpoints is refused; a model change refuses the resume.
  CHECK_THROWS_WITH(train_contrastive(c.config("split", 8, {"train.grad_accum=2"}), quiet()),
                    Catch::Contains("--resume auto"));
  CHECK_THROWS_WITH(train_contrastive(c.config("split", 9, {"train.grad_accum=2", "model.projection_dim=16"}), resume),
                    Catch::Contains("model.projection_dim"));
}

TEST_CASE("gradient accumulation keeps full-batch negatives: same gradients as one big batch", "[train][accum]") {
  TinyCorpus c;
  for (const int hard : {0, 2}) {  // also with each row's hard-negative captions in the batch
    INFO("data.hard_negatives " << hard);
    RunConfig cfg = c.config("unused", 4, {"data.hard_negatives=" + std::to_string(hard)});
    torch::manual_seed(0);
    auto tok = Tokenizer::load(cfg.data.tokenizer);
    ClipModel model = build_clip_model(cfg, tok);
    auto loss = contrastive_losses().create_or_throw(cfg.loss);
    CaptionDataset ds(cfg.data.train, cfg.data, tok, true);
    EpochSampler sampler(1, ds.size());
    auto batch = ds.collate(sampler.batch(0, 16), 1);
    if (hard > 0) {
      REQUIRE(batch.neg_counts.size() == 16);
      // Shapes world writes shape, colour, size (and, with two objects, relation) negatives.
      for (auto n : batch.neg_counts) CHECK(n == 2);
      REQUIRE(batch.neg_ids.size(0) == 32);
    } else {
      CHECK_FALSE(batch.neg_ids.defined());
    }

    auto grads = [&](int accum) {
      model->zero_grad();
      loss->zero_grad();
      auto out = contrastive_step(model, *loss, batch, accum);
      std::vector<torch::Tensor> g;
      for (const auto& p : model->parameters()) g.push_back(p.grad().clone());
      g.push_back(loss->parameters()[0].grad().clone());
      return std::make_pair(out.loss.item<double>(), g);
    };
    auto [l1, g1] = grads(1);
    auto [l4, g4] = grads(4);
    CHECK(l4 == Approx(l1).epsilon(1e-6));
    REQUIRE(g1.size() == g4.size());
    for (size_t i = 0; i < g1.size(); ++i) {
      INFO("parameter " << i);
      // Relative to the gradient's largest entry: float32 sums in another order differ by ~1e-7 of
      // it, which an element-wise tolerance would count against entries near zero.
      const double scale = g1[i].abs().max().item<double>();
      CHECK((g1[i] - g4[i]).abs().max().item<double>() <= 1e-5 * scale + 1e-8);
    }
    // Independent micro-batches (each with only its own negatives) would give a different loss:
    // the 16-way contrastive problem starts near ln 16, a 4-way one near ln 4.
    CHECK(l1 > std::log(8.0));
  }
}

TEST_CASE("bf16 autocast trains the tiny config as fp32 does", "[train][bf16]") {
  TinyCorpus c;
  constexpr int64_t kSteps = 150;
  auto run = [&](const std::string& precision) {
    auto r = train_contrastive(c.config(precision, kSteps, {"run.precision=" + precision, "optim.lr=3e-3"}), quiet());
    REQUIRE(r.logged_losses.size() == kSteps);
    const auto& l = r.logged_losses;
    return std::make_pair((l[0] + l[1] + l[2]) / 3, (l[kSteps - 3] + l[kSteps - 2] + l[kSteps - 1]) / 3);
  };
  const auto [first32, last32] = run("fp32");
  const auto [first16, last16] = run("bf16");
  INFO("fp32 " << first32 << " -> " << last32 << ", bf16 " << first16 << " -> " << last16);
  CHECK(first16 != first32);                         // bf16 arithmetic really ran
  CHECK(first16 == Approx(first32).margin(0.05));  // the same start: ln(16) up to bf16 rounding
  CHECK(last16 < 0.6 * first16);  // 150 steps: fp32 2.99 -> 1.49, bf16 2.99 -> 1.52
  CHECK(last16 == Approx(last32).margin(0.3 * last32 + 0.05));
}

TEST_CASE("optim.param_groups in stage 1: a frozen tower keeps its initial weights, with or without accumulation",
          "[train][param_groups]") {
  TinyCorpus c;
  const std::vector<std::string> frozen = {
      "optim.param_groups=[{match: text_model, freeze: true}, {match: text_projection, freeze: true}]"};
  auto with = [&](std::vector<std::string> sets, const std::string& more) {
    sets.push_back(more);
    return sets;
  };
  const auto one = train_contrastive(c.config("frozen1", 3, with(frozen, "train.grad_accum=1")), quiet());
  // The gradient cache re-encodes each micro-batch and carries the loss's gradient back: here only
  // through the image tower, since the text tower's embeddings have no graph.
  const auto two = train_contrastive(c.config("frozen2", 3, with(frozen, "train.grad_accum=2")), quiet());
  REQUIRE(one.logged_losses.size() == 3);
  for (size_t k = 0; k < 3; ++k) CHECK(two.logged_losses[k] == Approx(one.logged_losses[k]).epsilon(1e-5));

  // The initial weights: the trainer seeds with run.seed, then builds the model.
  RunConfig cfg = c.config("init", 3);
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  torch::manual_seed(cfg.run.seed);
  ClipModel init = build_clip_model(cfg, tok);
  int64_t text_same = 0, text_total = 0, vision_changed = 0;
  for (const auto& result : {one, two}) {
    const auto trained = load_safetensors(result.checkpoint + "/model.safetensors");
    for (const auto& p : init->named_parameters(true)) {
      INFO(p.key());
      const auto& t = trained.at(p.key());
      if (p.key().rfind("text_model.", 0) == 0 || p.key().rfind("text_projection", 0) == 0) {
        ++text_total;
        text_same += torch::equal(t, p.value());
      } else if (p.key().rfind("vision_model.", 0) == 0) {
        vision_changed += !torch::equal(t, p.value());
      }
    }
  }
  CHECK(text_total > 0);
  CHECK(text_same == text_total);
  CHECK(vision_changed > 0);

  // A rule that names nothing is refused, as in stages 2-3.
  CHECK_THROWS_WITH(train_contrastive(c.config("typo", 3, {"optim.param_groups=[{match: text_modle, freeze: true}]"}), quiet()),
                    Catch::Contains("optim.param_groups[0].match: 'text_modle' matches no parameter"));
}
