// Shapes-world preference data for DPO / mDPO and verifiable prompts for GRPO, derived from the
// scene graphs like every other shapes-world file (pure functions of a seed; no torch).
//
// A preference pair's chosen reply is the scene's true caption; the rejected one carries exactly
// one controlled hallucination (data/shapes_negatives.h), tagged with its misalignment level:
//   object     an object that is not there (one object's shape replaced)
//   attribute  a wrong colour or size
//   relation   a swapped spatial relation
// Each scene also gives yes/no pairs in the form of the POPE probes (data/shapes_pope.h): the
// question, the true answer chosen and the other rejected, one per level, in files of their own.
// They are not the default training data: on a stage 3 that answers the probes without a "yes"
// lean, DPO and mDPO on them teach one (docs/benchmarks.md); they serve a model that has a lean
// to remove.
// GRPO prompts are count / colour / existence / relation questions with one-word answers.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/shapes_world.h"

namespace trialign::shapes {

// "object" for shape, "attribute" for colour and size, "relation" for relation.
std::string hallucination_level(const std::string& negative_kind);

// One record per hard negative of the scene (none for an empty scene):
//   {"id": "{scene.id}-{kind}", "image": image, "prompt": "<image>\nDescribe the image.",
//    "chosen": caption(scene), "rejected": ..., "level": ..., "kind": ...}
std::vector<nlohmann::json> preference_records(const Scene& scene, const std::string& image,
                                               const GeneratorOptions& opts, uint64_t seed);

struct SplitStats;

// One yes/no pair per level the scene supports, drawn from pope_records(scene, image, stats, opts,
// seed) (any sampling, yes or no answer):
//   {"id": "{scene.id}-yes_no-{level}", "image": image, "prompt": "<image>\n{question}",
//    "chosen": answer, "rejected": the other answer, "level": ..., "kind": "yes_no", "sampling": ...,
//    "image_conditional": false when the answer is "no" (data/preference_dataset.h)}
std::vector<nlohmann::json> yes_no_preference_records(const Scene& scene, const std::string& image,
                                                      const SplitStats& stats, const GeneratorOptions& opts,
                                                      uint64_t seed);

// The scene's count / colour / existence / relation questions (make_questions with `seed`):
//   {"id": "{scene.id}-{type}", "image": image, "prompt": "<image>\n{question}",
//    "answer": ..., "question_type": type}
std::vector<nlohmann::json> grpo_prompt_records(const Scene& scene, const std::string& image,
                                                const GeneratorOptions& opts, uint64_t seed);

// Seeds of both, on their own hash chains (so they differ from stage 1's negatives and the
// instruction data's questions).
uint64_t preference_seed(uint64_t seed, const std::string& split, int64_t index);
uint64_t grpo_seed(uint64_t seed, const std::string& split, int64_t index);

struct PreferenceSummary {
  int64_t train_pairs = 0, val_pairs = 0, train_yes_no = 0, val_yes_no = 0, train_prompts = 0, val_prompts = 0;
};

// Writes OUT/train_pref.jsonl, OUT/val_pref.jsonl (caption pairs), OUT/train_pref_yesno.jsonl,
// OUT/val_pref_yesno.jsonl (yes/no pairs), OUT/train_grpo.jsonl, OUT/val_grpo.jsonl (prompts)
// for the scenes write_dataset writes with the same options; atomic like the other manifests.
PreferenceSummary write_preference_data(const std::string& out_dir, int64_t n_train, int64_t n_val,
                                        const GeneratorOptions& opts);

}  // namespace trialign::shapes
