// Hard-negative captions (data/shapes_negatives.h): one controlled error per kind, checked word
// by word against the true caption on hand-built and sampled scenes; their use in evaluation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "data/shapes_negatives.h"
#include "eval/retrieval.h"

using namespace trialign::shapes;

namespace {

Object obj(const std::string& shape, const std::string& colour, const std::string& size, float cx, float cy) {
  Object o;
  o.shape = shape, o.colour = colour, o.size = size, o.cx = cx, o.cy = cy;
  o.radius = size_radius_px(size, 64);
  return o;
}

Scene scene_of(std::vector<Object> objects) {
  Scene s;
  s.id = "train-000003";
  s.objects = std::move(objects);
  s.relations = compute_relations(s.objects);
  return s;
}

std::vector<std::string> words(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  return out;
}

// Positions where two captions of the same length differ.
std::vector<size_t> differing(const std::string& a, const std::string& b) {
  const auto wa = words(a), wb = words(b);
  REQUIRE(wa.size() == wb.size());
  std::vector<size_t> d;
  for (size_t i = 0; i < wa.size(); ++i)
    if (wa[i] != wb[i]) d.push_back(i);
  return d;
}

const Negative* find_kind(const std::vector<Negative>& ns, const std::string& kind) {
  for (const auto& n : ns)
    if (n.kind == kind) return &n;
  return nullptr;
}

}  // namespace

TEST_CASE("hard negatives: one word changed per attribute kind, relation swaps two descriptions, binding two colours", "[shapes][negatives]") {
  // "a large red star left of a small blue square": words 0-3 describe the star, 4-5 the
  // relation, 6-9 the square.
  const Scene s = scene_of({obj("star", "red", "large", 16, 30), obj("square", "blue", "small", 46, 32)});
  REQUIRE(caption(s) == "a large red star left of a small blue square");
  const GeneratorOptions opts;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    const auto ns = hard_negatives(s, opts, seed);
    REQUIRE(ns.size() == 5);
    for (size_t k = 0; k < ns.size(); ++k) CHECK(ns[k].kind == negative_kinds()[k]);
    const auto shape = differing(caption(s), find_kind(ns, "shape")->caption);
    REQUIRE(shape.size() == 1);
    CHECK((shape[0] == 3 || shape[0] == 9));  // a shape word, nothing else
    const auto colour = differing(caption(s), find_kind(ns, "colour")->caption);
    REQUIRE(colour.size() == 1);
    CHECK((colour[0] == 2 || colour[0] == 8));
    const auto size = differing(caption(s), find_kind(ns, "size")->caption);
    REQUIRE(size.size() == 1);
    CHECK((size[0] == 1 || size[0] == 7));
    // With two objects the only swap is star <-> square; the relation words stay.
    CHECK(find_kind(ns, "relation")->caption == "a small blue square left of a large red star");
    // The only pair swaps colours: the same bag of words, each colour on the other shape.
    CHECK(find_kind(ns, "binding")->caption == "a large blue star left of a small red square");
    CHECK(hard_negatives(s, opts, seed)[0].caption == ns[0].caption);  // same seed, same output
  }
}

TEST_CASE("hard negatives: binding never swaps two objects of the same shape, and picks the others uniformly",
          "[shapes][negatives]") {
  // Two stars and a square: swapping the stars' colours would only move objects (a relation
  // error), so the two eligible pairs are (red star, green square) and (blue star, green square).
  const Scene s = scene_of({obj("star", "red", "small", 10, 32), obj("star", "blue", "small", 30, 32),
                            obj("square", "green", "small", 50, 32)});
  REQUIRE(caption(s) == "a small red star left of a small blue star left of a small green square");
  const std::string first = "a small green star left of a small blue star left of a small red square";
  const std::string second = "a small red star left of a small green star left of a small blue square";
  int n_first = 0, n_second = 0;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    const auto ns = hard_negatives(s, GeneratorOptions{}, seed);
    const Negative* b = find_kind(ns, "binding");
    REQUIRE(b != nullptr);
    INFO(b->caption);
    CHECK((b->caption == first || b->caption == second));
    n_first += b->caption == first;
    n_second += b->caption == second;
  }
  CHECK(n_first > 5);
  CHECK(n_second > 5);
  // Same colour or same shape everywhere: nothing to bind wrongly.
  const Scene same = scene_of({obj("star", "red", "small", 10, 32), obj("star", "blue", "small", 50, 32)});
  const auto none = hard_negatives(same, GeneratorOptions{}, 3);
  CHECK(find_kind(none, "binding") == nullptr);
}

TEST_CASE("hard negatives: a kind the scene or the options cannot support is left out", "[shapes][negatives]") {
  const Scene one = scene_of({obj("circle", "green", "small", 30, 30)});
  GeneratorOptions opts;
  auto ns = hard_negatives(one, opts, 1);
  REQUIRE(ns.size() == 3);  // no relation and no binding with one object
  CHECK(find_kind(ns, "relation") == nullptr);
  CHECK(find_kind(ns, "binding") == nullptr);
  opts.sizes = {"small"};   // no other size to swap in
  opts.colours = {"green", "red"};
  ns = hard_negatives(one, opts, 1);
  CHECK(find_kind(ns, "size") == nullptr);
  REQUIRE(find_kind(ns, "colour") != nullptr);
  CHECK(find_kind(ns, "colour")->caption == "a small red circle");
  CHECK(hard_negatives(scene_of({}), opts, 1).empty());
  CHECK(to_json(ns).dump() ==
        R"([{"caption":")" + ns[0].caption + R"(","kind":"shape"},{"caption":"a small red circle","kind":"colour"}])");
}

TEST_CASE("hard negatives: sampled scenes never give the true caption back", "[shapes][negatives]") {
  GeneratorOptions opts;
  int64_t relation = 0, binding = 0;
  for (int64_t i = 0; i < 300; ++i) {
    const Scene s = sample_scene(opts, "train", i);
    for (const auto& n : hard_negatives(s, opts, negatives_seed(opts.seed, "train", i))) {
      INFO(s << " " << n.kind << ": " << n.caption);
      CHECK(n.caption != caption(s));
      CHECK(words(n.caption).size() == words(caption(s)).size());
      relation += n.kind == "relation";
      if (n.kind == "binding") {  // every word kept, only their pairing changed
        auto a = words(n.caption), b = words(caption(s));
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        CHECK(a == b);
        ++binding;
      }
    }
  }
  CHECK(relation > 100);  // most scenes have two or more objects
  CHECK(binding > 100);
  CHECK(negatives_seed(0, "train", 1) != negatives_seed(0, "val", 1));
}

TEST_CASE("hard-negative accuracy counts negatives ranked below the true caption, per kind", "[eval][negatives]") {
  // Images = texts = identity rows; negatives of image 0: [0.6, 0.8] (below 1: a win) and
  // [1, 0] (equal, not strictly below: a loss); of image 1: [0.6, 0.8] (0.8 < 1: a win).
  auto I = torch::eye(2), T = torch::eye(2);
  auto H = torch::tensor({{0.6f, 0.8f}, {1.f, 0.f}, {0.6f, 0.8f}});
  auto acc = trialign::hard_negative_accuracy(I, T, H, {0, 0, 1}, {"shape", "colour", "shape"});
  CHECK(acc.at("negatives/all") == Approx(2.0 / 3));
  CHECK(acc.at("negatives/shape") == Approx(1.0));
  CHECK(acc.at("negatives/colour") == Approx(0.0));
  CHECK(acc.size() == 3);
}
