// POPE-style yes/no hallucination probes on shapes-world scenes (Li et al. 2023, "Evaluating
// Object Hallucination in Large Vision-Language Models"), at the three misalignment levels and
// with three ways of choosing the "no" probes. Pure functions of a seed, like the rest of the
// shapes-world data.
//
//   level      yes probe                               no probe
//   object     "Is there a {shape}?"                    a shape that is not in the scene
//   attribute  "Is there a {colour} {shape}?"          a shape that is there, in a colour it does not have
//   relation   "Is the {c} {s} {pred} the {c} {s}?"    a true relation of two identifiable objects, negated
//
//   sampling     object                        attribute                         relation
//   random       any absent shape              any colour the shape lacks        the opposite predicate
//   popular      the absent shape most frequent the colour most frequent in the  (not defined: skipped)
//                in the split's scenes         split that the shape lacks
//   adversarial  the absent shape that most    a colour of another object of     subject and object swapped,
//                often co-occurs with the      the same scene (a binding error)  predicate kept
//                scene's shapes in the split
//
// Every (level, sampling) gets one yes and one no probe per scene that supports both, so each
// split is balanced and yes_ratio 0.5 is the unbiased answer rate.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/shapes_world.h"

namespace trialign::shapes {

// Frequencies over a split's scenes, for "popular" and "adversarial" choices.
struct SplitStats {
  std::map<std::string, int64_t> shape_count;                          // scenes containing the shape
  std::map<std::string, int64_t> colour_count;                         // objects of the colour
  std::map<std::pair<std::string, std::string>, int64_t> cooccur;      // scenes with both shapes (a < b)
  void add(const Scene& scene);
};

// Probe records of one scene:
//   {"id": "{scene.id}-pope-{level}-{sampling}-{yes|no}", "image": image,
//    "question_type": "pope/{level}/{sampling}", "answer": "yes"|"no",
//    "conversations": [{"from":"human","value":"<image>\n{question}"}, {"from":"gpt","value": answer}]}
std::vector<nlohmann::json> pope_records(const Scene& scene, const std::string& image, const SplitStats& stats,
                                         const GeneratorOptions& opts, uint64_t seed);

uint64_t pope_seed(uint64_t seed, const std::string& split, int64_t index);

// Writes OUT/val_pope.jsonl for the first n_val held-out scenes write_dataset writes with the same
// options. Returns the number of probes.
int64_t write_pope_data(const std::string& out_dir, int64_t n_val, const GeneratorOptions& opts);

}  // namespace trialign::shapes
