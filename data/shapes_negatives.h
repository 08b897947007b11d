// Hard-negative captions for shapes world: the scene's caption with exactly one controlled
// error, at the three misalignment levels (object, attribute, relation):
//   shape     one object's shape replaced  -> names an object that is not there
//   colour    one object's colour replaced -> a wrong attribute
//   size      one object's size replaced   -> a wrong attribute
//   relation  two objects' descriptions swapped, positions kept -> a wrong relation
//   binding   two objects of different colours and shapes swap colours -> every word of the
//             caption is right, but a colour is bound to the wrong shape ("a red star and a
//             blue circle" -> "a blue star and a red circle")
// Stage 1 uses them as extra text negatives (NegCLIP: Yuksekgonul et al. 2023, "When and why
// vision-language models behave like bags-of-words"): a batch of random captions rarely holds
// two that differ only in one shape, so plain InfoNCE teaches colour long before shape.
// Pure functions of their arguments, like the rest of shapes world. No torch.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/shapes_world.h"

namespace trialign::shapes {

struct Negative {
  std::string kind;     // shape | colour | size | relation | binding
  std::string caption;  // differs from caption(scene)
};

// The kinds in the order hard_negatives returns them.
const std::vector<std::string>& negative_kinds();

// At most one negative per kind, in negative_kinds() order, drawn reproducibly from `seed`
// (each kind from its own stream). A kind is skipped when the scene cannot support it: no
// objects; one value in opts' list for that attribute; relation with fewer than two objects.
// The replacement value is uniform over opts' other values; the relation swap picks two
// objects uniformly; the binding swap picks uniformly among the pairs that differ in both colour
// and shape (none: skipped). Every returned caption differs from caption(scene).
std::vector<Negative> hard_negatives(const Scene& scene, const GeneratorOptions& opts, uint64_t seed);

// [{"kind": ..., "caption": ...}, ...] as the manifests store them under "negatives".
nlohmann::json to_json(const std::vector<Negative>& negatives);

// Seed of the negatives of scene `index` of `split` (its own hash chain, like question_seed).
uint64_t negatives_seed(uint64_t seed, const std::string& split, int64_t index);

}  // namespace trialign::shapes
