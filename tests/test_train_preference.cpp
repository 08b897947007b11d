// The preference trainer on tiny shapes-world data: shapes-world pairs and prompts, data checks,
// response log-probs against a full forward, accumulation equivalence, the first-step loss where
// the policy still equals its reference (DPO ln 2, mDPO 3 ln 2), reference left untouched, and
// exact resume for DPO and GRPO.
#include <catch2/catch.hpp>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "core/config_tree.h"
#include "core/errors.h"
#include "core/checkpoint.h"
#include "core/registry.h"
#include "core/safetensors.h"
#include "data/manifest.h"
#include "data/preference_dataset.h"
#include "data/shapes_pope.h"
#include "data/shapes_preference.h"
#include "data/shapes_questions.h"
#include "data/shapes_world.h"
#include "losses/rewards.h"
#include "test_helpers.h"
#include "trainers/preference.h"
#include "trainers/vlm.h"

using namespace trialign;
using trialign::test::quiet;
using Catch::Matchers::WithinAbs;
using trialign::test::message_of;
using trialign::test::TempDir;

namespace {

struct TinyPreferenceCorpus {
  TempDir dir{"pref"};
  TinyPreferenceCorpus() {
    test::write_tiny_shapes_corpus(dir.file("data"), 16, 6);
    test::write_file(dir.file("base.yaml"), R"(
trainer: preference
run: {threads: 1, seed: 5, precision: fp32}
data: {image_size: 32, max_seq_len: 128, workers: 1, tokenizer: )" + dir.file("data/tok.model") + R"(}
model:
  vision: {image_size: 32, patch_size: 8, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}
  projector: {type: mlp2x_gelu, spatial_merge: 2}
  llm: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 128}
optim: {lr: 1.0e-2, param_groups: [{match: vision_model, freeze: true}]}
train: {batch_size: 4, log_every: 1, steps: 4}
schedule: {warmup_steps: 0}
eval: {max_new_tokens: 4}
)");
  }
  RunConfig config(const std::string& out, const std::string& extra) const {
    const std::string path = dir.file(out + ".yaml");
    test::write_file(path, "include: base.yaml\nrun: {out_dir: " + dir.file(out) + "}\n" + extra);
    return load_run_config(path);
  }
  std::string pairs() const { return dir.file("data/train_pref.jsonl"); }
  std::string yes_no_pairs() const { return dir.file("data/train_pref_yesno.jsonl"); }
};

std::map<std::string, torch::Tensor> weights(const TrainResult& r) {
  return load_safetensors(r.checkpoint + "/model.safetensors");
}

}  // namespace

TEST_CASE("shapes preference data: chosen is the caption, rejected has one tagged hallucination", "[preference][data]") {
  shapes::GeneratorOptions g;
  g.max_objects = 3;
  int64_t checked = 0;
  std::set<std::string> levels;
  for (int64_t i = 0; i < 20; ++i) {
    const auto scene = shapes::sample_scene(g, "train", i);
    for (const auto& r : shapes::preference_records(scene, "x.png", g, shapes::preference_seed(0, "train", i))) {
      CHECK(r["chosen"] == shapes::caption(scene));
      CHECK(r["rejected"] != r["chosen"]);
      CHECK(r["prompt"] == "<image>\nDescribe the image.");
      CHECK(r["level"] == shapes::hallucination_level(r["kind"]));
      levels.insert(r["level"]);
      ++checked;
    }
    for (const auto& r : shapes::grpo_prompt_records(scene, "x.png", g, shapes::grpo_seed(0, "train", i))) {
      const std::string t = r["question_type"];
      CHECK((t == "count" || t == "colour" || t == "existence" || t == "relation"));
      CHECK(r["prompt"].get<std::string>().rfind("<image>\n", 0) == 0);
    }
  }
  CHECK(checked > 20);
  CHECK(levels == std::set<std::string>{"attribute", "object", "relation"});
  CHECK(shapes::hallucination_level("size") == "attribute");
  CHECK(shapes::hallucination_level("binding") == "attribute");
}

TEST_CASE("shapes yes/no preference pairs: a probe of each level, its true answer chosen", "[preference][data]") {
  shapes::GeneratorOptions g;
  g.max_objects = 3;
  shapes::SplitStats stats;
  for (int64_t i = 0; i < 200; ++i) stats.add(shapes::sample_scene(g, "train", i));
  std::map<std::string, int64_t> chosen_yes, pairs;
  for (int64_t i = 0; i < 200; ++i) {
    const auto scene = shapes::sample_scene(g, "train", i);
    const uint64_t seed = shapes::preference_seed(0, "train", i);
    const auto probes = shapes::pope_records(scene, "x.png", stats, g, seed);
    std::set<std::string> levels_with_probes, levels;
    for (const auto& p : probes) {
      const std::string t = p["question_type"];
      levels_with_probes.insert(t.substr(5, t.find('/', 5) - 5));
    }
    for (const auto& r : shapes::yes_no_preference_records(scene, "x.png", stats, g, seed)) {
      const std::string level = r["level"];
      CHECK(levels.insert(level).second);  // one pair per level
      CHECK(r["kind"] == "yes_no");
      CHECK(r["id"] == scene.id + "-yes_no-" + level);
      // the pair is one of the scene's probes: same question, same level and sampling, its answer chosen
      int64_t matches = 0;
      for (const auto& p : probes)
        matches += p["conversations"][0]["value"] == r["prompt"] && p["answer"] == r["chosen"] &&
                   p["question_type"] == "pope/" + level + "/" + r["sampling"].get<std::string>();
      CHECK(matches >= 1);
      CHECK(((r["chosen"] == "yes" && r["rejected"] == "no") || (r["chosen"] == "no" && r["rejected"] == "yes")));
      // a "no" is as right on mDPO's corrupted crop: no conditional image preference for it
      CHECK(r.value("image_conditional", true) == (r["chosen"] == "yes"));
      chosen_yes[level] += r["chosen"] == "yes";
      ++pairs[level];
    }
    CHECK(levels == levels_with_probes);  // every level the scene can probe gives a pair
  }
  // yes and no chosen about equally often at every level (a fair coin over 100+ pairs: within 0.35-0.65)
  for (const std::string level : {"object", "attribute", "relation"}) {
    REQUIRE(pairs[level] > 60);
    CHECK(static_cast<double>(chosen_yes[level]) / pairs[level] == Approx(0.5).margin(0.15));
  }
}

TEST_CASE("shapes preference files: caption pairs in train_pref, yes/no pairs in files of their own", "[preference][data]") {
  // The default training file holds only pairs whose rejected reply carries one controlled
  // hallucination; the yes/no pairs are opt-in (they teach a balanced stage 3 a "yes" lean).
  TempDir dir("pref-files");
  shapes::GeneratorOptions g;
  g.max_objects = 3;
  const int64_t n_train = 12, n_val = 5;
  const auto summary = shapes::write_preference_data(dir.file("d"), n_train, n_val, g);
  for (const auto& [split, n] : {std::pair<std::string, int64_t>{"train", n_train}, {"val", n_val}}) {
    shapes::SplitStats stats;
    for (int64_t i = 0; i < n; ++i) stats.add(shapes::sample_scene(g, split, i));
    std::vector<nlohmann::json> captions, yes_no;
    for (int64_t i = 0; i < n; ++i) {
      const auto scene = shapes::sample_scene(g, split, i);
      const auto image = shapes::scene_image_path(split, i);
      const uint64_t seed = shapes::preference_seed(g.seed, split, i);
      for (auto& r : shapes::preference_records(scene, image, g, seed)) captions.push_back(std::move(r));
      for (auto& r : shapes::yes_no_preference_records(scene, image, stats, g, seed)) yes_no.push_back(std::move(r));
    }
    auto read = [&](const std::string& file) {
      std::vector<nlohmann::json> out;
      for (const auto& rec : read_manifest(dir.file("d/" + file))) out.push_back(rec.json);
      return out;
    };
    CHECK(read(split + "_pref.jsonl") == captions);
    CHECK(read(split + "_pref_yesno.jsonl") == yes_no);
    for (const auto& r : captions) CHECK(r["kind"] != "yes_no");
    CHECK(static_cast<int64_t>(captions.size()) == (split == "train" ? summary.train_pairs : summary.val_pairs));
    CHECK(static_cast<int64_t>(yes_no.size()) == (split == "train" ? summary.train_yes_no : summary.val_yes_no));
    CHECK(yes_no.size() >= static_cast<size_t>(2 * n));  // every scene has object and attribute probes
  }
}

TEST_CASE("preference data: only the response is labelled, the LLaVA form, bad records named", "[preference][data]") {
  TinyPreferenceCorpus c;
  const auto cfg = c.config("data", "data: {train: " + c.pairs() + "}\n");
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  const std::string img = "images/train/000000.png";
  const std::string m = c.dir.file("data/mixed.jsonl");
  test::write_file(m, R"({"id": "a", "image": ")" + img + R"(", "prompt": "<image>\nDescribe the image.", "chosen": "a red star", "rejected": "a blue star"}
{"id": "b", "image": ")" + img + R"(", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}, {"from": "human", "value": "Describe the image."}], "chosen": "a red star", "rejected": "a red circle", "image_conditional": false}
)");
  PreferenceDataset d(m, cfg.data, tok, 4, PreferenceDataset::Kind::Pairs, false);
  REQUIRE(d.size() == 2);
  CHECK(d.sample(0).image_conditional);  // the default
  CHECK_FALSE(d.sample(1).image_conditional);
  for (int64_t i = 0; i < 2; ++i) {
    const auto& s = d.sample(i);
    // Labels start exactly where the prompt ends and cover the reply and its eos.
    const auto reply = tok.encode("a red star");
    CHECK(response_tokens(s.chosen.labels) == static_cast<int64_t>(reply.size()) + 1);
    CHECK(std::vector<int64_t>(s.chosen.ids.begin(), s.chosen.ids.begin() + s.prompt.size()) == s.prompt);
    for (size_t t = 0; t < s.prompt.size(); ++t) CHECK(s.chosen.labels[t] == kIgnoreIndex);
  }
  // Record b's earlier assistant turn ("red") is prompt, not response.
  CHECK(response_tokens(d.sample(1).chosen.labels) == response_tokens(d.sample(0).chosen.labels));

  const std::string bad = c.dir.file("data/bad.jsonl");
  test::write_file(bad, R"({"id": "same", "image": ")" + img + R"(", "prompt": "<image>\nx", "chosen": "a", "rejected": "a"}
{"id": "ends", "image": ")" + img + R"(", "conversations": [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}], "chosen": "a", "rejected": "b"}
{"id": "noimg", "image": "missing.png", "prompt": "<image>\nx", "chosen": "a", "rejected": "b"}
{"id": "cond", "image": ")" + img + R"(", "prompt": "<image>\nx", "chosen": "a", "rejected": "b", "image_conditional": "no"}
)");
  const auto msg = message_of<DataError>([&] { PreferenceDataset(bad, cfg.data, tok, 4, PreferenceDataset::Kind::Pairs, false); });
  CHECK_THAT(msg, Catch::Contains("bad.jsonl:1 (id same): 'chosen' and 'rejected' are the same reply"));
  CHECK_THAT(msg, Catch::Contains("bad.jsonl:2 (id ends): 'conversations' must end with the user's turn"));
  CHECK_THAT(msg, Catch::Contains("bad.jsonl:3 (id noimg): image"));
  CHECK_THAT(msg, Catch::Contains("bad.jsonl:4 (id cond): 'image_conditional' must be true or false"));

  // Prompts: a VQA record serves as it is, its final reply being the answer.
  PreferenceDataset vqa(c.dir.file("data/val_vqa.jsonl"), cfg.data, tok, 4, PreferenceDataset::Kind::Prompts, false, 3, 4);
  CHECK(vqa.size() == 3);
  CHECK_FALSE(vqa.sample(0).answer.empty());
  CHECK(vqa.sample(0).prompt_text.find("<image>") == std::string::npos);
}

TEST_CASE("response log-probs equal log-softmax sums of a full forward, accumulation equals one batch",
          "[preference][accum]") {
  TinyPreferenceCorpus c;
  auto cfg = c.config("acc", "data: {train: " + c.pairs() + "}\n");
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  torch::manual_seed(3);
  VlmModel policy = build_vlm_model(cfg, tok);
  torch::manual_seed(4);
  VlmModel reference = build_vlm_model(cfg, tok);  // differs from the policy: a real log-ratio
  PreferenceDataset data(cfg.data.train, cfg.data, tok, policy->tokens_per_image(), PreferenceDataset::Kind::Pairs, false);
  const auto batch = data.range(0, 4);

  // Full forward, log-softmax over every position (on logits / temperature), read off by hand
  // token by token over the chosen reply: each token in its left-aligned column.
  std::vector<std::vector<int64_t>> ids, labels;
  for (auto i : batch.indices) ids.push_back(data.sample(i).chosen.ids), labels.push_back(data.sample(i).chosen.labels);
  for (double temperature : {1.0, 2.0}) {
    INFO("temperature " << temperature);
    const auto lp = response_logps(policy, ids, labels, batch.pixels, tok.image_id(), false, temperature);
    torch::NoGradGuard ng;
    auto in = policy->build_inputs(batch.pixels, ids, labels, tok.image_id());
    auto logits = policy->llm->logits(policy->llm->forward_hidden(in.embeds, in.attention_mask));
    auto logp = torch::log_softmax(logits / temperature, -1);
    for (int64_t b = 0; b < 4; ++b) {
      int64_t n = 0;
      for (int64_t t = 0; t + 1 < in.labels.size(1); ++t) {
        const int64_t y = in.labels[b][t + 1].item<int64_t>();
        if (y == kIgnoreIndex) continue;
        CHECK_THAT(lp.token_logps[b][n].item<double>(), WithinAbs(logp[b][t][y].item<double>(), 1e-5));
        CHECK(lp.mask[b][n].item<float>() == 1);
        ++n;
      }
      CHECK(lp.count()[b].item<double>() == n);
      if (n < lp.mask.size(1)) CHECK(lp.mask[b][n].item<float>() == 0);
    }
  }

  // DPO gradient over 4 pairs at once == the sum over two micro-batches of 2 with share 1/2.
  TypedSpec spec{"dpo", {}, "loss"};
  spec.options.kind = ConfigNode::Kind::Map;
  auto loss = preference_losses().create_or_throw(spec);
  auto grads = [&](int accum) {
    policy->zero_grad();
    double total = 0;
    for (int j = 0; j < accum; ++j) {
      const int64_t m = 4 / accum;
      auto in = pair_passes(*loss, policy, &reference, data, batch.slice(j * m, (j + 1) * m), tok.image_id(), false, 1);
      in.share = 1.0 / accum;
      auto o = loss->forward(in);
      o.loss.backward();
      total += o.loss.item<double>();
    }
    std::vector<torch::Tensor> g;
    for (const auto& p : policy->parameters())
      if (p.grad().defined()) g.push_back(p.grad().clone());
    return std::make_pair(total, g);
  };
  const auto [l1, g1] = grads(1);
  const auto [l2, g2] = grads(2);

  // One small gradient step on the DPO loss raises every pair's margin of chosen over rejected
  // (relative to the reference), and leaves the reference model untouched.
  std::map<std::string, torch::Tensor> ref_before;
  for (const auto& p : reference->named_parameters()) ref_before[p.key()] = p.value().detach().clone();
  auto margins = [&] {
    torch::NoGradGuard ng;
    auto in = pair_passes(*loss, policy, &reference, data, batch, tok.image_id(), false, 1);
    return ((in.at("policy/chosen").sum() - in.at("policy/rejected").sum()) -
            (in.at("reference/chosen").sum() - in.at("reference/rejected").sum()));
  };
  const auto before = margins();
  grads(1);
  {
    torch::NoGradGuard ng;
    for (auto& p : policy->parameters())
      if (p.grad().defined()) p.sub_(1e-2 * p.grad());
  }
  const auto after = margins();
  INFO("margins before " << before << " after " << after);
  CHECK(after.sum().item<double>() > before.sum().item<double>());
  for (const auto& p : reference->named_parameters()) CHECK(torch::equal(p.value(), ref_before.at(p.key())));
  CHECK_THAT(l1, WithinAbs(l2, 1e-5));
  REQUIRE(g1.size() == g2.size());
  REQUIRE_FALSE(g1.empty());
  for (size_t k = 0; k < g1.size(); ++k) CHECK(torch::allclose(g1[k], g2[k], 1e-4, 1e-6));
}

TEST_CASE("dpo trainer: first loss ln 2 (policy = reference), reward accuracy per level, exact resume",
          "[preference][train][slow]") {
  TinyPreferenceCorpus c;
  const std::string data = "data: {train: " + c.pairs() + ", val: " + c.dir.file("data/val_pref.jsonl") + "}\n";
  auto r = train_preference(c.config("dpo", data + "train: {grad_accum: 2}\neval: {at_start: true}\n"), quiet());
  REQUIRE(r.logged_losses.size() == 4);
  // Before the first step the policy is its reference: every implicit reward margin is exactly 0.
  CHECK(r.start_eval["val"]["preference_accuracy"].get<double>() == 0.0);
  CHECK(r.start_eval["val"]["rewards/margins"].get<double>() == 0.0);
  CHECK_THAT(r.start_eval["val"]["loss"].get<double>(), WithinAbs(std::log(2.0), 1e-6));
  CHECK(r.start_eval["val"].contains("likelihood_accuracy/relation"));
  CHECK_THAT(r.logged_losses[0], WithinAbs(std::log(2.0), 1e-6));
  {
    // The trained policy prefers the chosen replies of the pairs it saw more than its reference
    // (the seeded initial model) did: their DPO loss fell below ln 2.
    auto cfg = c.config("dpo-check", data);
    const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
    torch::manual_seed(cfg.run.seed);
    VlmModel reference = build_vlm_model(cfg, tok);
    VlmModel policy = build_vlm_model(cfg, tok);
    load_state(*policy, weights(r), "", true, "final");
    PreferenceDataset pairs(cfg.data.train, cfg.data, tok, policy->tokens_per_image(), PreferenceDataset::Kind::Pairs, false);
    EpochSampler order(cfg.run.seed, pairs.size());
    std::vector<SampleRef> seen;
    for (int64_t s = 0; s < 4; ++s)
      for (const auto& ref : order.batch(s, 4)) seen.push_back(ref);
    TypedSpec spec{"dpo", {}, "loss"};
    spec.options.kind = ConfigNode::Kind::Map;
    auto loss = preference_losses().create_or_throw(spec);
    policy->eval();
    torch::NoGradGuard ng;
    auto in = pair_passes(*loss, policy, &reference, pairs, pairs.collate(seen, 0), tok.image_id(), false, 1);
    CHECK(loss->forward(in).loss.item<double>() < std::log(2.0));
  }
  const auto& e = r.final_eval["val"];
  for (const char* k : {"preference_accuracy", "preference_accuracy/object", "preference_accuracy/attribute",
                        "preference_accuracy/relation", "rewards/accuracies", "rewards/margins", "loss"})
    CHECK(e.contains(k));

  // Reference log-probs cached once before the first step: the same run, to float tolerance (the
  // reference forwards batch the pairs differently), and the reference model released.
  auto cached = train_preference(
      c.config("dpo-cached", data + "train: {grad_accum: 2}\npreference: {cache_reference: true}\n"), quiet());
  REQUIRE(cached.logged_losses.size() == 4);
  for (size_t k = 0; k < 4; ++k) CHECK_THAT(cached.logged_losses[k], WithinAbs(r.logged_losses[k], 1e-5));
  CHECK_THAT(cached.final_eval["val"]["loss"].get<double>(), WithinAbs(r.final_eval["val"]["loss"].get<double>(), 1e-4));
  for (const auto& [name, t] : weights(cached)) {
    INFO(name);
    CHECK(torch::allclose(t, weights(r).at(name), 1e-3, 1e-4));
  }

  // 2 steps, stop, resume for 2 more: bit-identical weights and logged losses.
  TrainOptions stop = quiet();
  stop.stop_at_step = 2;
  auto cut = train_preference(c.config("dpo-cut", data + "train: {grad_accum: 2}\n"), stop);
  REQUIRE(cut.interrupted);
  TrainOptions resume = quiet();
  resume.resume = "auto";
  auto rest = train_preference(c.config("dpo-cut", data + "train: {grad_accum: 2}\n"), resume);
  test::check_same_tensors(weights(r), weights(rest));
  CHECK(rest.logged_losses == std::vector<double>(r.logged_losses.begin() + 2, r.logged_losses.end()));

  // Started from a checkpoint: init_from.json records its weights' CRC-32, and a resume refuses
  // to rebuild the reference model from a checkpoint that holds other weights since.
  const std::string from = "init_from: [{checkpoint: " + r.checkpoint +
                           ", components: [vision_model, mm_projector, language_model]}]\n";
  stop.stop_at_step = 1;
  REQUIRE(train_preference(c.config("dpo-init", data + from), stop).interrupted);
  const std::string record_file = c.dir.file("dpo-init/init_from.json");
  auto record = nlohmann::json::parse(read_text_file(record_file));
  REQUIRE(record.size() == 1);
  CHECK(record[0]["model_crc32"] == model_weights_crc(r.checkpoint));
  auto tampered = record;
  tampered[0]["model_crc32"] = record[0]["model_crc32"].get<uint32_t>() ^ 1u;
  test::write_file(record_file, tampered.dump(2));
  CHECK_THAT(test::message_of<DataError>([&] { train_preference(c.config("dpo-init", data + from), resume); }),
             Catch::Contains(record_file + ": " + r.checkpoint + " holds other weights than when this run started"));
  test::write_file(record_file, record.dump(2));
  CHECK(train_preference(c.config("dpo-init", data + from), resume).final_step == 4);
}

TEST_CASE("mdpo trainer: first loss 3 ln 2 (2 ln 2 without the conditional term), the frozen vision tower unchanged, exact resume", "[preference][train][slow]") {
  TinyPreferenceCorpus c;
  auto r = train_preference(c.config("mdpo", "data: {train: " + c.pairs() + "}\nloss: {type: mdpo}\ntrain: {steps: 2}\n"), quiet());
  // Policy = reference at step 1: each of the three terms is ln 2 for a pair, except the
  // conditional one of a pair marked image_conditional false (the generator's yes/no pairs
  // whose answer is "no").
  {
    auto records = read_manifest(c.pairs());
    for (auto& rec : read_manifest(c.yes_no_pairs())) records.push_back(std::move(rec));
    std::string conditional, not_conditional;
    for (const auto& rec : records)
      (rec.json.value("image_conditional", true) ? conditional : not_conditional) += rec.json.dump() + "\n";
    REQUIRE_FALSE(not_conditional.empty());
    test::write_file(c.dir.file("data/cond.jsonl"), conditional);
    test::write_file(c.dir.file("data/not_cond.jsonl"), not_conditional);
    for (const auto& [file, terms] : std::vector<std::pair<std::string, double>>{{"cond", 3}, {"not_cond", 2}}) {
      const auto f = train_preference(c.config("mdpo_" + file, "data: {train: " + c.dir.file("data/" + file + ".jsonl") +
                                                                  "}\nloss: {type: mdpo}\ntrain: {steps: 1}\n"),
                                      quiet());
      CHECK_THAT(f.logged_losses[0], WithinAbs(terms * std::log(2.0), 1e-6));
    }
  }
  // The caption pairs: every one has a conditional term.
  CHECK_THAT(r.logged_losses[0], WithinAbs(3 * std::log(2.0), 1e-6));
  // Seeded initialisation: a fresh model with the same seed is the reference the run started from.
  auto cfg = c.config("mdpo-ref", "data: {train: " + c.pairs() + "}\n");
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  torch::manual_seed(cfg.run.seed);
  VlmModel init = build_vlm_model(cfg, tok);
  const auto w = weights(r);
  int64_t frozen_same = 0, trained_changed = 0, frozen = 0;
  for (const auto& p : init->named_parameters(true)) {
    const bool is_frozen = component_of(p.key()) == "vision_model";
    frozen += is_frozen;
    if (is_frozen) frozen_same += torch::equal(p.value(), w.at(p.key()));
    else trained_changed += !torch::equal(p.value(), w.at(p.key()));
  }
  CHECK(frozen_same == frozen);
  CHECK(trained_changed > 0);

  // Stop after step 1 and resume: the corrupted images are drawn from (seed, step), so the run
  // ends bit-identical, logged losses included.
  const std::string cfg_text = "data: {train: " + c.pairs() + "}\nloss: {type: mdpo}\ntrain: {steps: 2}\n";
  TrainOptions stop = quiet();
  stop.stop_at_step = 1;
  REQUIRE(train_preference(c.config("mdpo-cut", cfg_text), stop).interrupted);
  TrainOptions resume = quiet();
  resume.resume = "auto";
  auto rest = train_preference(c.config("mdpo-cut", cfg_text), resume);
  CHECK(rest.logged_losses == std::vector<double>{r.logged_losses[1]});
  test::check_same_tensors(w, weights(rest));
}

TEST_CASE("grpo trainer: rewards from sampled completions, exact resume", "[preference][train][slow]") {
  TinyPreferenceCorpus c;
  const std::string cfg = "data: {train: " + c.dir.file("data/train_grpo.jsonl") + ", val: " +
                          c.dir.file("data/val_vqa.jsonl") + ", val_limit: 6}\n" +
                          "loss: {type: grpo, group_size: 4, max_new_tokens: 4, beta: 0.04, temperature: 1.0}\n"
                          "rewards: [{type: exact_match}, {type: format, weight: 0.5, max_words: 1}]\n"
                          "train: {batch_size: 2, steps: 3}\n";
  auto r = train_preference(c.config("grpo", cfg), quiet());
  REQUIRE(r.logged_losses.size() == 3);
  CHECK(r.final_eval["val"]["records"] == 6);
  CHECK(r.final_eval["val"].contains("exact_match"));
  // The metrics of the last step are in metrics.jsonl with the reward functions' means.
  std::ifstream f(c.dir.file("grpo/metrics.jsonl"));
  std::string line, last_train;
  while (std::getline(f, line))
    if (line.find("\"train\"") != std::string::npos) last_train = line;
  const auto j = nlohmann::json::parse(last_train)["metrics"];
  for (const char* k : {"reward/mean", "reward/std", "reward/exact_match", "reward/format", "kl", "clip_ratio",
                        "completion_length"})
    CHECK(j.contains(k));
  CHECK(j["completion_length"].get<double>() >= 1.0);
  CHECK(j["completion_length"].get<double>() <= 4.0);

  TrainOptions stop = quiet();
  stop.stop_at_step = 1;
  REQUIRE(train_preference(c.config("grpo-cut", cfg), stop).interrupted);
  TrainOptions resume = quiet();
  resume.resume = "auto";
  auto rest = train_preference(c.config("grpo-cut", cfg), resume);
  CHECK(rest.logged_losses == std::vector<double>(r.logged_losses.begin() + 1, r.logged_losses.end()));
  test::check_same_tensors(weights(r), weights(rest));
}

TEST_CASE("dpo: a stop signal while reference log-probs are cached stops the run before its first step",
          "[preference][faults]") {
  TinyPreferenceCorpus c;
  struct HookReset {
    ~HookReset() { set_before_training_hook({}); }
  } reset;
  set_before_training_hook([](const std::string& during) {
    if (during.find("reference log-probs") != std::string::npos) std::raise(SIGTERM);
  });
  const std::string yaml = "data: {train: " + c.pairs() + "}\npreference: {cache_reference: true}\n";
  CHECK_THAT(test::message_of<StoppedBeforeTraining>([&] { train_preference(c.config("stop", yaml), quiet()); }),
             Catch::Contains("stop requested during the caching of reference log-probs (preference.cache_reference)"));
  CHECK_FALSE(std::filesystem::exists(c.dir.file("stop/checkpoints")));
  set_before_training_hook({});
  const auto r = train_preference(c.config("stop", yaml), quiet());  // the next start trains
  CHECK(r.final_step == 4);
}

namespace {

// A run of `yaml` that a stop signal interrupts as its final evaluation (at `final_step`) begins:
// it ends interrupted, with its final checkpoint and no evaluation written; the resume then
// evaluates exactly as an uninterrupted run (`metric` names a figure that evaluation reports).
void check_stop_in_final_evaluation(TinyPreferenceCorpus& c, const std::string& yaml, int64_t final_step,
                                    const std::string& metric) {
  const auto clean = train_preference(c.config("clean", yaml), quiet());
  REQUIRE(clean.final_eval["val"].contains(metric));
  struct HookReset {
    ~HookReset() { set_evaluation_hook({}); }
  } reset;
  set_evaluation_hook([final_step](int64_t step) {
    if (step == final_step) std::raise(SIGTERM);  // the real handler, as the final evaluation begins
  });
  const auto stopped = train_preference(c.config("run", yaml), quiet());
  CHECK(stopped.interrupted);
  CHECK(stopped.final_step == final_step);
  CHECK(stopped.final_eval.is_null());
  CHECK_FALSE(std::filesystem::exists(c.dir.file("run/eval.json")));
  set_evaluation_hook({});
  TrainOptions resume = quiet();
  resume.resume = "auto";
  const auto r = train_preference(c.config("run", yaml), resume);
  CHECK_FALSE(r.interrupted);
  CHECK(r.final_eval == clean.final_eval);
  test::check_same_tensors(weights(clean), weights(r));
}

}  // namespace

TEST_CASE("dpo: a stop signal during the final evaluation keeps the final checkpoint, and the resume evaluates it",
          "[preference][faults]") {
  TinyPreferenceCorpus c;
  check_stop_in_final_evaluation(
      c, "data: {train: " + c.pairs() + ", val: " + c.dir.file("data/val_pref.jsonl") + "}\n", 4, "preference_accuracy");
}

TEST_CASE("grpo: a stop signal during the final prompt evaluation keeps the final checkpoint, and the resume evaluates it",
          "[preference][faults]") {
  TinyPreferenceCorpus c;
  // Greedy and sampled completions of the held-out prompts: both loops pass the stop point.
  check_stop_in_final_evaluation(c,
                                 "data: {train: " + c.dir.file("data/train_grpo.jsonl") + ", val: " +
                                     c.dir.file("data/val_vqa.jsonl") + ", val_limit: 6}\n" +
                                     "loss: {type: grpo, group_size: 2, max_new_tokens: 3, beta: 0.04}\n"
                                     "rewards: [{type: exact_match}, {type: test_text_length}]\n"
                                     "eval: {samples: 2}\ntrain: {batch_size: 2, steps: 2}\n",
                                 2, "sampled/reward");
}

TEST_CASE("micro-batches on threads: mdpo and grpo give the losses and weights of the same micro-batches in order",
          "[preference][micro_batches][slow]") {
  TinyPreferenceCorpus c;
  // mdpo: the corrupted images are drawn per micro-batch from its seed, the reference runs in
  // each thread. grpo: completions are sampled once for the step, then scored in micro-batches.
  // One LibTorch thread per micro-batch both ways (run.threads: 1): bit-for-bit agreement.
  struct Case {
    std::string name, yaml, train;
  };
  const std::vector<Case> cases = {
      {"mdpo", "data: {train: " + c.pairs() + "}\nloss: {type: mdpo}\n", "steps: 2, grad_accum: 4"},
      {"grpo",
       "data: {train: " + c.dir.file("data/train_grpo.jsonl") + "}\n" +
           "loss: {type: grpo, group_size: 2, max_new_tokens: 3, beta: 0.04}\n"
           "rewards: [{type: format, max_words: 1}, {type: test_text_length}]\n",
       "batch_size: 4, steps: 2, grad_accum: 2"}};
  for (const auto& k : cases) {
    INFO(k.name);
    auto in_order = train_preference(c.config(k.name + "_in_order", k.yaml + "train: {" + k.train + "}\n"), quiet());
    auto threaded = train_preference(
        c.config(k.name + "_threaded", k.yaml + "train: {" + k.train + ", micro_batch_threads: 2}\n"), quiet());
    REQUIRE(in_order.logged_losses.size() == 2);
    CHECK(threaded.logged_losses == in_order.logged_losses);
    test::check_same_tensors(weights(in_order), weights(threaded));
  }
}

// A reward that tells completions apart even when an untrained model answers nothing right:
// the completion's length in characters, plus 1 when it ended by itself.
class TextLengthRewardImpl : public RewardFnImpl {
 public:
  std::vector<double> score(const std::vector<RewardInput>& in) const override {
    std::vector<double> out;
    for (const auto& r : in) out.push_back(static_cast<double>(r.completion.size()) + (r.finished ? 1.0 : 0.0));
    return out;
  }
};
TRIALIGN_REGISTER(reward_functions(), "test_text_length", "test only: characters of the completion (+1 if finished)",
                  [](ConfigReader&) -> std::shared_ptr<RewardFnImpl> { return std::make_shared<TextLengthRewardImpl>(); });

TEST_CASE("grpo eval: sampled completions at a vanishing temperature score as the greedy one", "[preference][train]") {
  TinyPreferenceCorpus c;
  // Both decodings score the same final policy. At temperature 1e-4 every draw is the argmax
  // token (the tiny model's top-two logit gaps are far above 1e-4 x ln(draws)), so the 3 draws
  // per prompt must earn exactly the greedy reward: the same texts, not merely the same zeros.
  auto cfg = [&](double temperature) {
    return "data: {train: " + c.dir.file("data/train_grpo.jsonl") + ", val: " + c.dir.file("data/val_vqa.jsonl") +
           ", val_limit: 6}\nloss: {type: grpo, group_size: 2, max_new_tokens: 4, temperature: " +
           std::to_string(temperature) + "}\nrewards: [{type: exact_match}, {type: test_text_length}]\n" +
           "eval: {samples: 3}\ntrain: {batch_size: 2, steps: 1}\n";
  };
  const auto e = train_preference(c.config("grpo-eval", cfg(1e-4)), quiet()).final_eval["val"];
  INFO(e.dump());
  REQUIRE(e["reward"].get<double>() > 1.0);  // the texts are not empty
  int keys = 0;
  for (const auto& [k, v] : e.items()) {
    if (k.rfind("sampled/", 0) != 0) continue;
    ++keys;
    INFO(k);
    CHECK(v.get<double>() == e[k.substr(8)].get<double>());
  }
  CHECK(keys >= 3);  // reward, exact_match and at least one question type
  // At temperature 3 the draws leave the argmax: the mean reward of 18 draws differs from greedy's.
  const auto hot = train_preference(c.config("grpo-eval-hot", cfg(3.0)), quiet()).final_eval["val"];
  CHECK(hot["sampled/reward"].get<double>() != hot["reward"].get<double>());

  // A pair loss draws nothing: the key is refused, not ignored.
  CHECK_THAT(message_of<ConfigError>([&] {
               train_preference(c.config("dpo-eval", "data: {train: " + c.dir.file("data/train_pref.jsonl") +
                                                         "}\neval: {samples: 2}\n"),
                                quiet());
             }),
             Catch::Contains("eval.samples: loss 'dpo' scores given pairs and draws no completions"));
}

TEST_CASE("preference config: rewards with a pair loss, unknown loss and reward types", "[preference][config]") {
  TinyPreferenceCorpus c;
  CHECK_THAT(message_of<ConfigError>([&] { c.config("x1", "data: {train: a}\nrewards: [exact_match]\n"); }),
             Catch::Contains("trains on chosen/rejected pairs and uses no reward functions"));
  CHECK_THAT(message_of<ConfigError>([&] { c.config("x2", "data: {train: a}\nloss: {type: dop}\n"); }),
             Catch::Contains("unknown preference loss type 'dop'; registered: dpo, grpo, mdpo"));
  CHECK_THAT(message_of<ConfigError>([&] { c.config("x3", "data: {train: a}\nloss: {type: grpo}\nrewards: [{type: exact}]\n"); }),
             Catch::Contains("unknown reward function type 'exact'"));
  CHECK_THAT(message_of<ConfigError>([&] { c.config("x4", "data: {train: a}\nloss: {type: dpo, betta: 0.1}\n"); }),
             Catch::Contains("betta"));
  // Problems a --set made are named by that --set, not by the line of the file it changed.
  test::write_file(c.dir.file("pref.yaml"), "trainer: preference\ndata: {train: a, tokenizer: t.model}\nloss:\n  type: dpo\n  beta: 0.1\n");
  CHECK_THAT(message_of<ConfigError>([&] {
               preference_losses().create_or_throw(load_run_config(c.dir.file("pref.yaml"), {"loss.type=dpoo"}).loss);
             }),
             Catch::Contains("--set loss.type: loss.type: unknown preference loss type 'dpoo'"));
  CHECK_THAT(message_of<ConfigError>([&] {
               preference_losses().create_or_throw(
                   load_run_config(c.dir.file("pref.yaml"), {"loss.type=mdpo", "loss.min_area=0.5", "loss.max_area=0.1"}).loss);
             }),
             Catch::Contains("--set loss.max_area: loss: min_area 0.500000 is above max_area 0.100000"));
  CHECK_NOTHROW(preference_losses().create_or_throw(load_run_config(c.dir.file("pref.yaml")).loss));
  // A temperature that overflows logits / temperature: refused, not a NaN loss at step 1.
  CHECK_THAT(message_of<ConfigError>([&] { c.config("x7", "data: {train: a}\nloss: {type: grpo, temperature: 1.0e-40}\n"); }),
             Catch::Contains("loss.temperature: must be at least 1e-6"));
  CHECK_THAT(message_of<ConfigError>([&] { c.config("x6", "data: {train: a, template: plain}\n"); }),
             Catch::Contains("data.template: the preference trainer renders prompts and replies with the chat template"));
  CHECK_THAT(message_of<ConfigError>([&] {
               train_preference(c.config("x5", "data: {train: " + c.dir.file("data/train_grpo.jsonl") +
                                                   "}\nloss: {type: grpo, beta: 0.1}\npreference: {cache_reference: true}\n"),
                                quiet());
             }),
             Catch::Contains("samples new completions every step; there is nothing fixed to cache"));
}

TEST_CASE("preference: pairs whose image does not decode are left out of training and of the reference cache",
          "[preference][train][faults]") {
  TinyPreferenceCorpus c;
  // Every pair of the first scene reads its image; cut it after the PNG signature.
  std::string image_field, kept_lines;
  int64_t left = 0, kept = 0;
  {
    std::istringstream lines(read_text_file(c.pairs()));
    for (std::string line; std::getline(lines, line);) {
      const auto j = nlohmann::json::parse(line);
      if (image_field.empty()) image_field = j["image"].get<std::string>();
      if (j["image"] == image_field) ++left;
      else kept_lines += line + "\n", ++kept;
    }
  }
  REQUIRE(left > 0);
  REQUIRE(kept >= 8);
  const std::string image = c.dir.file("data/" + image_field);
  test::write_file(image, read_text_file(image).substr(0, 40));
  test::write_file(c.dir.file("data/kept_pref.jsonl"), kept_lines);
  const std::string cached = "preference: {cache_reference: true}\n";
  auto with = train_preference(
      c.config("skip", "data: {train: " + c.pairs() + "}\n" + cached + "train: {grad_accum: 2, on_bad_batch: skip}\n"),
      quiet());
  auto without = train_preference(
      c.config("ref", "data: {train: " + c.dir.file("data/kept_pref.jsonl") + "}\n" + cached + "train: {grad_accum: 2}\n"),
      quiet());
  REQUIRE(with.logged_losses.size() == 4);
  for (size_t k = 0; k < 4; ++k) CHECK(with.logged_losses[k] == without.logged_losses[k]);
  for (const auto& [name, t] : weights(with)) {
    INFO(name);
    CHECK(torch::equal(t, weights(without).at(name)));
  }
  const auto state = nlohmann::json::parse(read_text_file(with.checkpoint + "/trainer_state.json"));
  CHECK(state["data"]["records"] == kept);
  // Under stop (the default) the check names the image before anything is cached or trained.
  CHECK_THAT(message_of<DataError>([&] { train_preference(c.config("stop", "data: {train: " + c.pairs() + "}\n" + cached), quiet()); }),
             Catch::Contains("data.check_images: 1 of") && Catch::Contains(image));
}
