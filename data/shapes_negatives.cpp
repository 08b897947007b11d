#include "data/shapes_negatives.h"

#include <utility>

namespace trialign::shapes {

namespace {

// A uniformly drawn value of `choices` other than `current`; "" when there is none.
std::string other_value(const std::vector<std::string>& choices, const std::string& current, Rng& rng) {
  std::vector<std::string> others;
  for (const auto& c : choices)
    if (c != current) others.push_back(c);
  if (others.empty()) return "";
  return others[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(others.size()) - 1))];
}

}  // namespace

const std::vector<std::string>& negative_kinds() {
  static const std::vector<std::string> kinds = {"shape", "colour", "size", "relation", "binding"};
  return kinds;
}

std::vector<Negative> hard_negatives(const Scene& scene, const GeneratorOptions& opts, uint64_t seed) {
  std::vector<Negative> out;
  const auto n = static_cast<int64_t>(scene.objects.size());
  if (n == 0) return out;
  const std::string truth = caption(scene);
  auto keep = [&](const std::string& kind, const Scene& changed) {
    const std::string c = caption(changed);
    if (c != truth) out.push_back({kind, c});
  };
  for (size_t k = 0; k < negative_kinds().size(); ++k) {
    const std::string& kind = negative_kinds()[k];
    Rng rng(::trialign::mix_seed({seed, static_cast<uint64_t>(k)}));
    Scene changed = scene;
    if (kind == "binding") {
      // Pairs that differ in both colour and shape: swapping their colours keeps every word of
      // the caption (a bag of words cannot tell it from the truth) but breaks which colour
      // belongs to which shape.
      std::vector<std::pair<size_t, size_t>> pairs;
      for (size_t a = 0; a < scene.objects.size(); ++a)
        for (size_t b = a + 1; b < scene.objects.size(); ++b)
          if (scene.objects[a].colour != scene.objects[b].colour && scene.objects[a].shape != scene.objects[b].shape)
            pairs.emplace_back(a, b);
      if (pairs.empty()) continue;
      const auto& [a, b] = pairs[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(pairs.size()) - 1))];
      std::swap(changed.objects[a].colour, changed.objects[b].colour);
      keep(kind, changed);
      continue;
    }
    if (kind == "relation") {
      if (n < 2) continue;
      const int64_t a = rng.uniform_int(0, n - 1);
      int64_t b = rng.uniform_int(0, n - 2);
      if (b >= a) ++b;  // uniform over the other objects
      auto& oa = changed.objects[static_cast<size_t>(a)];
      auto& ob = changed.objects[static_cast<size_t>(b)];
      std::swap(oa.shape, ob.shape);
      std::swap(oa.colour, ob.colour);
      std::swap(oa.size, ob.size);  // positions (and so the relation words) stay
      keep(kind, changed);
      continue;
    }
    Object& o = changed.objects[static_cast<size_t>(rng.uniform_int(0, n - 1))];
    std::string& attr = kind == "shape" ? o.shape : kind == "colour" ? o.colour : o.size;
    const auto& choices = kind == "shape" ? opts.shapes : kind == "colour" ? opts.colours : opts.sizes;
    const std::string value = other_value(choices, attr, rng);
    if (value.empty()) continue;
    attr = value;
    keep(kind, changed);
  }
  return out;
}

nlohmann::json to_json(const std::vector<Negative>& negatives) {
  nlohmann::json j = nlohmann::json::array();
  for (const auto& n : negatives) j.push_back({{"kind", n.kind}, {"caption", n.caption}});
  return j;
}

uint64_t negatives_seed(uint64_t seed, const std::string& split, int64_t index) {
  return ::trialign::mix_seed({seed, fnv1a64("negatives"), fnv1a64(split), static_cast<uint64_t>(index)});
}

}  // namespace trialign::shapes
