// Shapes-world instruction / VQA data derived from scene graphs (data/shapes_world.h).
//
// Every question is answerable from the scene graph alone and every answer is one lower-case
// word (two for a position in a corner), so held-out VQA can be scored by exact match. Like the
// scenes themselves, everything here is a pure function of its arguments (a seed in, the same
// bytes out), so instruction data can be regenerated for any dataset without storing it. Plain
// C++ + nlohmann::json; no torch.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "data/shapes_world.h"

namespace trialign::shapes {

// One question with its answer. type is one of the names in question_types().
struct QA {
  std::string type, question, answer;
};

bool operator==(const QA& a, const QA& b);
bool operator!=(const QA& a, const QA& b);
// "[colour] What colour is the circle? -> red" (for test failure messages).
std::ostream& operator<<(std::ostream& os, const QA& qa);

// "an" before a vowel ("an orange circle"), else "a".
std::string indefinite_article(const std::string& word);
// left of <-> right of, above <-> below; std::invalid_argument for another predicate.
std::string opposite_predicate(const std::string& predicate);

// The question types in the order make_questions returns them:
// colour, shape, size, count, existence, relation, position.
const std::vector<std::string>& question_types();

// At most one question per type, in question_types() order, drawn reproducibly from `seed`
// (each type from its own stream, so one type's draws never shift another's). Templates:
//   colour    "What colour is the {shape}?"            object with a unique shape
//   shape     "What shape is the {colour} object?"     object with a unique colour
//   size      "What size is the {colour} {shape}?"     object with a unique (colour, shape)
//   count     "How many objects are there?" or, half the time, "How many {shape}s are there?"
//             (a shape of the scene or of opts.shapes, so "0" occurs) -> "0", "1", ...
//   existence "Is there a/an {colour} {shape}?" -> yes/no with probability 1/2 each; a "no"
//             names an absent pair that shares the shape or the colour of a scene object
//             (colours/shapes from opts), falling back to any absent pair of opts. Half the
//             time (when the scene allows) "Is there a/an {shape}?" instead: "yes" names a
//             shape of the scene, "no" a shape of opts that no object has
//   relation  "Is the {colour} {shape} {predicate} the {colour} {shape}?" -> yes/no, 1/2 each,
//             about a pair from scene.relations whose objects both have a unique
//             (colour, shape); "no" asks the opposite predicate (left of <-> right of,
//             above <-> below).
//   position  "Where is the {colour} {shape}?" -> the cell of the object's centre on a 3 x 3
//             grid over the image: "top left", "top", "top right", "left", "centre", "right",
//             "bottom left", "bottom", "bottom right" (the one answer of two words); object
//             with a unique (colour, shape)
// A type is skipped when the scene cannot support it (e.g. no unique shape: no colour
// question; fewer than two identifiable objects: no relation question). Throws
// std::invalid_argument for a relation with an unknown predicate or an out-of-range index.
std::vector<QA> make_questions(const Scene& scene, const GeneratorOptions& opts, uint64_t seed);

// Training record for a scene: one multi-turn LLaVA conversation (data/conversation.h)
//   {"id": scene.id, "image": image, "question_types": [...one per gpt turn, "caption" for the
//    caption turn...], "conversations": [{"from":"human","value":"<image>\n..."},
//    {"from":"gpt","value":...}, ...]}
// The turns are make_questions(scene, opts, seed) in a shuffled order plus a caption turn
// ("Describe the image." -> caption(scene)) at a random position; only the first human turn
// carries the "<image>\n" prefix. A scene without objects (empty caption) gets no caption turn,
// since an empty reply is not a valid record.
nlohmann::json instruction_record(const Scene& scene, const std::string& image,
                                  const GeneratorOptions& opts, uint64_t seed);

// Held-out evaluation records, one single-turn record per make_questions(scene, opts, seed):
//   {"id": "{scene.id}-{type}", "image": image, "question_type": type,
//    "conversations": [{"from":"human","value":"<image>\n" + question},
//                      {"from":"gpt","value": answer}]}
std::vector<nlohmann::json> vqa_records(const Scene& scene, const std::string& image,
                                        const GeneratorOptions& opts, uint64_t seed);

// Seed of the questions for scene `index` of `split`: a hash of the dataset seed, the tag
// "questions", the split and the index, so it never equals the scene's own scene_seed and the
// questions are independent of generation order.
uint64_t question_seed(uint64_t seed, const std::string& split, int64_t index);
// Image path of a scene relative to the dataset folder, as write_dataset's manifests store it:
// "images/{split}/{index:06d}.png".
std::string scene_image_path(const std::string& split, int64_t index);

// Writes the records(i) of i = 0..count-1 as JSONL to "{path}.tmp", then renames it to `path`,
// so a reader never sees a half-written manifest. Returns the number of lines. Throws
// std::runtime_error "{who}: cannot write '...'" on failure (the .tmp file removed).
int64_t write_jsonl_records(const std::string& path, int64_t count, const std::string& who,
                            const std::function<std::vector<nlohmann::json>(int64_t)>& records);

struct InstructionSummary {
  int64_t train_records = 0, val_records = 0;  // lines written per file
  std::string train_manifest, val_manifest;    // paths of the two files
};

// Writes OUT/train_instruct.jsonl (one instruction_record per train scene) and OUT/val_vqa.jsonl
// (the vqa_records of every val scene), one record per line (json::dump(), keys sorted). Scenes
// are regenerated with sample_scene(opts, split, i), i.e. the scenes write_dataset writes with
// the same options, and questions use question_seed(opts.seed, split, i). No images are written:
// point OUT at the write_dataset folder so the relative image paths resolve. Each file is written
// to "{file}.tmp" and renamed into place, so a reader never sees a half-written manifest.
// Throws std::invalid_argument for bad options or negative counts, std::runtime_error naming
// the path on any write failure.
InstructionSummary write_instruction_data(const std::string& out_dir, int64_t n_train,
                                          int64_t n_val, const GeneratorOptions& opts);

}  // namespace trialign::shapes
