#include "data/shapes_preference.h"

#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>

#include "core/rng.h"
#include "data/shapes_negatives.h"
#include "data/shapes_pope.h"
#include "data/shapes_questions.h"

namespace trialign::shapes {

using json = nlohmann::json;

std::string hallucination_level(const std::string& kind) {
  if (kind == "shape") return "object";
  // A colour bound to the wrong object is an attribute error about that object.
  if (kind == "colour" || kind == "size" || kind == "binding") return "attribute";
  if (kind == "relation") return "relation";
  throw std::invalid_argument("hallucination_level: unknown negative kind '" + kind + "'");
}

std::vector<json> preference_records(const Scene& scene, const std::string& image, const GeneratorOptions& opts,
                                     uint64_t seed) {
  std::vector<json> out;
  const std::string chosen = caption(scene);
  for (const auto& n : hard_negatives(scene, opts, seed)) {
    json r = json::object();
    r["id"] = scene.id + "-" + n.kind;
    r["image"] = image;
    r["prompt"] = "<image>\nDescribe the image.";
    r["chosen"] = chosen;
    r["rejected"] = n.caption;
    r["level"] = hallucination_level(n.kind);
    r["kind"] = n.kind;
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<json> yes_no_preference_records(const Scene& scene, const std::string& image, const SplitStats& stats,
                                            const GeneratorOptions& opts, uint64_t seed) {
  // pope_records gives, per level and sampling, one probe whose answer is yes and one whose answer
  // is no; one of them per level becomes a pair, so about half the chosen answers are "yes" and a
  // model cannot satisfy the pairs by always denying.
  const auto probes = pope_records(scene, image, stats, opts, seed);
  std::map<std::string, std::vector<const json*>> by_level;
  for (const auto& p : probes) {
    const std::string type = p["question_type"];  // pope/{level}/{sampling}
    const auto a = type.find('/') + 1, b = type.find('/', a);
    by_level[type.substr(a, b - a)].push_back(&p);
  }
  Rng rng(mix_seed({seed, fnv1a64("yes_no")}));
  std::vector<json> out;
  for (const std::string level : {"object", "attribute", "relation"}) {
    const auto it = by_level.find(level);
    if (it == by_level.end()) continue;
    const json& p = *it->second[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(it->second.size()) - 1))];
    const std::string answer = p["answer"], type = p["question_type"];
    json r = json::object();
    r["id"] = scene.id + "-yes_no-" + level;
    r["image"] = image;
    r["prompt"] = p["conversations"][0]["value"];
    r["chosen"] = answer;
    r["rejected"] = answer == "yes" ? "no" : "yes";
    r["level"] = level;
    r["kind"] = "yes_no";
    r["sampling"] = type.substr(type.rfind('/') + 1);
    // A "no" stays true on mDPO's corrupted image (a crop of the scene): no conditional preference.
    if (answer == "no") r["image_conditional"] = false;
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<json> grpo_prompt_records(const Scene& scene, const std::string& image, const GeneratorOptions& opts,
                                      uint64_t seed) {
  std::vector<json> out;
  for (const auto& qa : make_questions(scene, opts, seed)) {
    if (qa.type != "count" && qa.type != "colour" && qa.type != "existence" && qa.type != "relation") continue;
    json r = json::object();
    r["id"] = scene.id + "-" + qa.type;
    r["image"] = image;
    r["prompt"] = "<image>\n" + qa.question;
    r["answer"] = qa.answer;
    r["question_type"] = qa.type;
    out.push_back(std::move(r));
  }
  return out;
}

uint64_t preference_seed(uint64_t seed, const std::string& split, int64_t index) {
  return ::trialign::mix_seed({seed, fnv1a64("preference"), fnv1a64(split), static_cast<uint64_t>(index)});
}

uint64_t grpo_seed(uint64_t seed, const std::string& split, int64_t index) {
  return ::trialign::mix_seed({seed, fnv1a64("grpo"), fnv1a64(split), static_cast<uint64_t>(index)});
}

PreferenceSummary write_preference_data(const std::string& out_dir, int64_t n_train, int64_t n_val,
                                        const GeneratorOptions& opts) {
  validate(opts);
  if (n_train < 0 || n_val < 0) throw std::invalid_argument("write_preference_data: scene counts must be >= 0");
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  const std::filesystem::path root(out_dir);
  // The caption pairs (each rejected caption carries one controlled hallucination) and, in their
  // own files, the yes/no pairs. The yes/no pairs' popular / adversarial choices use the split's
  // own frequencies, as val_pope.jsonl does.
  auto caption_pairs = [&](const std::string& split) {
    return [&opts, split](int64_t i) {
      return preference_records(sample_scene(opts, split, i), scene_image_path(split, i), opts,
                                preference_seed(opts.seed, split, i));
    };
  };
  auto yes_no_pairs = [&](const std::string& split, int64_t n) {
    auto stats = std::make_shared<SplitStats>();
    for (int64_t i = 0; i < n; ++i) stats->add(sample_scene(opts, split, i));
    return [&opts, split, stats](int64_t i) {
      return yes_no_preference_records(sample_scene(opts, split, i), scene_image_path(split, i), *stats, opts,
                                       preference_seed(opts.seed, split, i));
    };
  };
  PreferenceSummary s;
  s.train_pairs = write_jsonl_records((root / "train_pref.jsonl").string(), n_train, "write_preference_data",
                                      caption_pairs("train"));
  s.val_pairs = write_jsonl_records((root / "val_pref.jsonl").string(), n_val, "write_preference_data", caption_pairs("val"));
  s.train_yes_no = write_jsonl_records((root / "train_pref_yesno.jsonl").string(), n_train, "write_preference_data",
                                       yes_no_pairs("train", n_train));
  s.val_yes_no = write_jsonl_records((root / "val_pref_yesno.jsonl").string(), n_val, "write_preference_data",
                                     yes_no_pairs("val", n_val));
  auto prompts = [&](const std::string& split) {
    return [&opts, split](int64_t i) {
      return grpo_prompt_records(sample_scene(opts, split, i), scene_image_path(split, i), opts,
                                 grpo_seed(opts.seed, split, i));
    };
  };
  s.train_prompts = write_jsonl_records((root / "train_grpo.jsonl").string(), n_train, "write_preference_data", prompts("train"));
  s.val_prompts = write_jsonl_records((root / "val_grpo.jsonl").string(), n_val, "write_preference_data", prompts("val"));
  return s;
}

}  // namespace trialign::shapes
