// Yes/no hallucination probes: the scoring against hand-worked counts, and the shapes-world probe
// generator against the scene graphs it describes.
#include <catch2/catch.hpp>

#include <regex>

#include "data/shapes_pope.h"
#include "data/shapes_world.h"
#include "eval/pope.h"

using namespace trialign;
using namespace trialign::shapes;

TEST_CASE("yes/no scoring: accuracy, precision, recall, F1, yes ratio and hallucination rate by hand", "[pope][eval]") {
  YesNoCounts c;
  c.add("Yes.", "yes");           // tp
  c.add("no", "yes");             // fn
  c.add("yes", "no");             // fp
  c.add("Yes, there is", "no");   // fp
  c.add("No", "no");              // tn
  c.add("maybe", "yes");          // unparsed (a yes probe missed)
  CHECK(c.tp == 1);
  CHECK(c.fn == 1);
  CHECK(c.fp == 2);
  CHECK(c.tn == 1);
  CHECK(c.unparsed == 1);
  const auto m = c.metrics();
  CHECK(m["accuracy"].get<double>() == Approx(2.0 / 6));
  CHECK(m["precision"].get<double>() == Approx(1.0 / 3));     // 1 right of 3 "yes"
  CHECK(m["recall"].get<double>() == Approx(1.0 / 3));        // 1 of 3 yes probes
  CHECK(m["f1"].get<double>() == Approx(1.0 / 3));
  CHECK(m["yes_ratio"].get<double>() == Approx(0.5));         // 3 of 6 replies
  CHECK(m["hallucination_rate"].get<double>() == Approx(2.0 / 3));  // 2 of 3 no probes
  CHECK(m["unparsed"].get<double>() == Approx(1.0 / 6));
  CHECK(m["probes"] == 6);
  CHECK(yes_no_of(" YES ") == "yes");
  CHECK(yes_no_of("nope") == "");
  // Per reply, as `eval --predictions` writes it: the hallucination flags are the fp count.
  CHECK(yes_no_prediction("Yes, there is", "no") == nlohmann::json({{"said", "yes"}, {"hallucination", true}}));
  CHECK(yes_no_prediction("Yes.", "yes") == nlohmann::json({{"said", "yes"}, {"hallucination", false}}));
  CHECK(yes_no_prediction("No", "no") == nlohmann::json({{"said", "no"}, {"hallucination", false}}));
  CHECK(yes_no_prediction("maybe", "no") == nlohmann::json({{"said", ""}, {"hallucination", false}}));
  YesNoCounts d;
  d.add("no", "no");
  d.merge(c);
  CHECK(d.metrics()["hallucination_rate"].get<double>() == Approx(2.0 / 4));
}

namespace {

bool has_object(const Scene& s, const std::string& colour, const std::string& shape) {
  for (const auto& o : s.objects)
    if (o.shape == shape && (colour.empty() || o.colour == colour)) return true;
  return false;
}

}  // namespace

TEST_CASE("shapes-world probes: every yes is true and every no false in the scene graph, balanced per split",
          "[pope][shapes]") {
  GeneratorOptions opts;
  opts.seed = 11;
  opts.max_objects = 4;
  SplitStats stats;
  std::vector<Scene> scenes;
  for (int64_t i = 0; i < 60; ++i) scenes.push_back(sample_scene(opts, "val", i));
  for (const auto& s : scenes) stats.add(s);
  const std::regex object_q("Is there an? (\\w+)\\?");
  const std::regex attribute_q("Is there an? (\\w+) (\\w+)\\?");
  const std::regex relation_q("Is the (\\w+) (\\w+) (left of|right of|above|below) the (\\w+) (\\w+)\\?");
  std::map<std::string, std::pair<int, int>> balance;  // question_type -> (yes, no)
  int checked = 0;
  for (size_t i = 0; i < scenes.size(); ++i) {
    const auto& s = scenes[i];
    const auto records = pope_records(s, "img.png", stats, opts, pope_seed(opts.seed, "val", static_cast<int64_t>(i)));
    CHECK(records == pope_records(s, "img.png", stats, opts, pope_seed(opts.seed, "val", static_cast<int64_t>(i))));
    for (const auto& r : records) {
      const std::string type = r["question_type"], answer = r["answer"];
      const std::string q = r["conversations"][0]["value"].get<std::string>().substr(8);  // after "<image>\n"
      INFO(s.id << " " << type << " " << q << " -> " << answer);
      CHECK(r["conversations"][1]["value"] == answer);
      (answer == "yes" ? balance[type].first : balance[type].second) += 1;
      std::smatch m;
      if (type.rfind("pope/object/", 0) == 0) {
        REQUIRE(std::regex_match(q, m, object_q));
        CHECK(has_object(s, "", m[1]) == (answer == "yes"));
        if (type == "pope/object/popular" && answer == "no") {  // the most frequent absent shape
          for (const auto& shape : opts.shapes)
            if (!has_object(s, "", shape)) CHECK(stats.shape_count[shape] <= stats.shape_count[m[1]]);
        }
      } else if (type.rfind("pope/attribute/", 0) == 0) {
        REQUIRE(std::regex_match(q, m, attribute_q));
        CHECK(has_object(s, m[1], m[2]) == (answer == "yes"));
        CHECK(has_object(s, "", m[2]));  // the shape is there: an attribute error, not an object one
        if (type == "pope/attribute/adversarial" && answer == "no") {
          bool colour_in_scene = false;
          for (const auto& o : s.objects) colour_in_scene = colour_in_scene || o.colour == m[1];
          CHECK(colour_in_scene);
        }
      } else {
        REQUIRE(std::regex_match(q, m, relation_q));
        bool found = false, holds = false;
        for (const auto& rel : s.relations) {
          const auto& a = s.objects[static_cast<size_t>(rel.subject)];
          const auto& b = s.objects[static_cast<size_t>(rel.object)];
          if (a.colour == m[1] && a.shape == m[2] && b.colour == m[4] && b.shape == m[5]) {
            found = true;
            holds = rel.predicate == m[3];
          }
        }
        CHECK(found);
        CHECK(holds == (answer == "yes"));
      }
      ++checked;
    }
  }
  CHECK(checked > 500);
  for (const auto& [type, yn] : balance) {
    INFO(type);
    CHECK(yn.first == yn.second);
  }
  CHECK(balance.count("pope/relation/adversarial"));
  CHECK_FALSE(balance.count("pope/relation/popular"));
}
