#include "data/shapes_pope.h"

#include <algorithm>
#include <filesystem>
#include <set>

#include "core/rng.h"
#include "data/shapes_questions.h"

namespace trialign::shapes {

namespace {

std::string object_name(const Object& o) { return o.colour + " " + o.shape; }

// The most frequent candidate by `count` (ties: the first in `candidates` order), "" if none.
template <class F>
std::string most_frequent(const std::vector<std::string>& candidates, F count) {
  std::string best;
  int64_t best_n = -1;
  for (const auto& c : candidates)
    if (count(c) > best_n) best = c, best_n = count(c);
  return best;
}

nlohmann::json probe(const Scene& scene, const std::string& image, const std::string& level,
                     const std::string& sampling, const std::string& question, bool yes) {
  const std::string answer = yes ? "yes" : "no";
  return {{"id", scene.id + "-pope-" + level + "-" + sampling + "-" + answer},
          {"image", image},
          {"question_type", "pope/" + level + "/" + sampling},
          {"answer", answer},
          {"conversations",
           {{{"from", "human"}, {"value", "<image>\n" + question}}, {{"from", "gpt"}, {"value", answer}}}}};
}

}  // namespace

void SplitStats::add(const Scene& scene) {
  std::set<std::string> shapes;
  for (const auto& o : scene.objects) {
    shapes.insert(o.shape);
    ++colour_count[o.colour];
  }
  for (const auto& s : shapes) ++shape_count[s];
  for (const auto& a : shapes)
    for (const auto& b : shapes)
      if (a < b) ++cooccur[{a, b}];
}

std::vector<nlohmann::json> pope_records(const Scene& scene, const std::string& image, const SplitStats& stats,
                                         const GeneratorOptions& opts, uint64_t seed) {
  std::vector<nlohmann::json> out;
  if (scene.objects.empty()) return out;
  Rng rng(seed);
  auto pick = [&](const std::vector<std::string>& v) { return v[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(v.size()) - 1))]; };
  std::set<std::string> present;
  for (const auto& o : scene.objects) present.insert(o.shape);
  std::vector<std::string> present_v(present.begin(), present.end()), absent;
  for (const auto& s : opts.shapes)
    if (!present.count(s)) absent.push_back(s);
  auto count_of = [](const auto& m, const auto& k) -> int64_t {
    auto it = m.find(k);
    return it == m.end() ? 0 : it->second;
  };

  // Object level.
  if (!absent.empty()) {
    const std::string yes_shape = pick(present_v);
    const std::string yes_q = "Is there " + indefinite_article(yes_shape) + " " + yes_shape + "?";
    auto no_q = [](const std::string& s) { return "Is there " + indefinite_article(s) + " " + s + "?"; };
    const std::string random = pick(absent);
    const std::string popular = most_frequent(absent, [&](const std::string& s) { return count_of(stats.shape_count, s); });
    const std::string adversarial = most_frequent(absent, [&](const std::string& s) {
      int64_t n = 0;
      for (const auto& p : present) n += count_of(stats.cooccur, std::make_pair(std::min(p, s), std::max(p, s)));
      return n;
    });
    for (const auto& [sampling, shape] : std::vector<std::pair<std::string, std::string>>{
             {"random", random}, {"popular", popular}, {"adversarial", adversarial}}) {
      out.push_back(probe(scene, image, "object", sampling, yes_q, true));
      out.push_back(probe(scene, image, "object", sampling, no_q(shape), false));
    }
  }

  // Attribute level: a shape that is there, in a colour no object of that shape has.
  {
    const Object& target = scene.objects[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(scene.objects.size()) - 1))];
    std::set<std::string> has;
    for (const auto& o : scene.objects)
      if (o.shape == target.shape) has.insert(o.colour);
    std::vector<std::string> lacking, scene_colours;
    for (const auto& c : opts.colours)
      if (!has.count(c)) lacking.push_back(c);
    for (const auto& o : scene.objects)
      if (!has.count(o.colour) && std::find(scene_colours.begin(), scene_colours.end(), o.colour) == scene_colours.end())
        scene_colours.push_back(o.colour);
    auto q = [&](const std::string& colour) {
      return "Is there " + indefinite_article(colour) + " " + colour + " " + target.shape + "?";
    };
    if (!lacking.empty()) {
      const std::string yes_q = q(target.colour);
      std::vector<std::pair<std::string, std::string>> nos = {
          {"random", pick(lacking)},
          {"popular", most_frequent(lacking, [&](const std::string& c) { return count_of(stats.colour_count, c); })}};
      if (!scene_colours.empty()) nos.emplace_back("adversarial", pick(scene_colours));
      for (const auto& [sampling, colour] : nos) {
        out.push_back(probe(scene, image, "attribute", sampling, yes_q, true));
        out.push_back(probe(scene, image, "attribute", sampling, q(colour), false));
      }
    }
  }

  // Relation level: objects identifiable by colour and shape.
  std::vector<const Relation*> usable;
  for (const auto& r : scene.relations) {
    int same_s = 0, same_o = 0;
    for (const auto& o : scene.objects) {
      same_s += object_name(o) == object_name(scene.objects[static_cast<size_t>(r.subject)]);
      same_o += object_name(o) == object_name(scene.objects[static_cast<size_t>(r.object)]);
    }
    if (same_s == 1 && same_o == 1) usable.push_back(&r);
  }
  if (!usable.empty()) {
    const Relation& r = *usable[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(usable.size()) - 1))];
    const std::string a = object_name(scene.objects[static_cast<size_t>(r.subject)]);
    const std::string b = object_name(scene.objects[static_cast<size_t>(r.object)]);
    auto q = [](const std::string& x, const std::string& pred, const std::string& y) {
      return "Is the " + x + " " + pred + " the " + y + "?";
    };
    const std::string yes_q = q(a, r.predicate, b);
    out.push_back(probe(scene, image, "relation", "random", yes_q, true));
    out.push_back(probe(scene, image, "relation", "random", q(a, opposite_predicate(r.predicate), b), false));
    out.push_back(probe(scene, image, "relation", "adversarial", yes_q, true));
    out.push_back(probe(scene, image, "relation", "adversarial", q(b, r.predicate, a), false));
  }
  return out;
}

uint64_t pope_seed(uint64_t seed, const std::string& split, int64_t index) {
  return ::trialign::mix_seed({seed, fnv1a64("pope"), fnv1a64(split), static_cast<uint64_t>(index)});
}

int64_t write_pope_data(const std::string& out_dir, int64_t n_val, const GeneratorOptions& opts) {
  validate(opts);
  if (n_val < 0) throw std::invalid_argument("write_pope_data: scene count must be >= 0");
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  SplitStats stats;
  for (int64_t i = 0; i < n_val; ++i) stats.add(sample_scene(opts, "val", i));
  return write_jsonl_records((std::filesystem::path(out_dir) / "val_pope.jsonl").string(), n_val, "write_pope_data",
                             [&](int64_t i) {
                               return pope_records(sample_scene(opts, "val", i), scene_image_path("val", i), stats, opts,
                                                   pope_seed(opts.seed, "val", i));
                             });
}

}  // namespace trialign::shapes
