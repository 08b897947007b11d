// Tests for shapes-world instruction / VQA data (data/shapes_questions.h): question values on
// hand-built scenes, an independent answer oracle over sampled scenes, record shapes, and the
// writer (including that its records load through the LLaVA record parser).
#include <algorithm>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "data/conversation.h"
#include "data/manifest.h"
#include "data/shapes_questions.h"
#include "test_helpers.h"

namespace fs = std::filesystem;
using namespace trialign::shapes;
using nlohmann::json;
using trialign::test::TempDir;

namespace {

Object obj(const std::string& shape, const std::string& colour, const std::string& size, float cx,
           float cy) {
  Object o;
  o.shape = shape;
  o.colour = colour;
  o.size = size;
  o.cx = cx;
  o.cy = cy;
  o.radius = size_radius_px(size, 64);
  return o;
}

Scene scene_of(std::vector<Object> objects, const std::string& id = "train-000007") {
  Scene s;
  s.id = id;
  s.objects = std::move(objects);
  s.relations = compute_relations(s.objects);
  return s;
}

// The question of one type, or nullptr when the scene got none.
const QA* find_type(const std::vector<QA>& qs, const std::string& type) {
  for (const QA& q : qs)
    if (q.type == type) return &q;
  return nullptr;
}

std::string singular(const std::string& plural) {
  if (plural.size() > 3 && plural.compare(plural.size() - 3, 3, "ses") == 0)
    return plural.substr(0, plural.size() - 2);
  return plural.substr(0, plural.size() - 1);
}

// Indices of the objects matching the given attributes ("" matches anything).
std::vector<int> matching(const Scene& s, const std::string& colour, const std::string& shape) {
  std::vector<int> out;
  for (size_t i = 0; i < s.objects.size(); ++i)
    if ((colour.empty() || s.objects[i].colour == colour) &&
        (shape.empty() || s.objects[i].shape == shape))
      out.push_back(static_cast<int>(i));
  return out;
}

// An answer oracle written from the templates, independent of the generator: parses the
// question and answers it from the scene graph, failing the test when the question is
// ambiguous (names no object or several) or matches no template.
std::string oracle(const Scene& s, const QA& qa) {
  static const std::regex colour_q("What colour is the (\\w+)\\?");
  static const std::regex shape_q("What shape is the (\\w+) object\\?");
  static const std::regex size_q("What size is the (\\w+) (\\w+)\\?");
  static const std::regex count_all("How many objects are there\\?");
  static const std::regex count_shape("How many (\\w+) are there\\?");
  static const std::regex exists_q("Is there (a|an) (\\w+) (\\w+)\\?");
  static const std::regex exists_shape_q("Is there (a|an) (\\w+)\\?");
  static const std::regex rel_q(
      "Is the (\\w+) (\\w+) (left of|right of|above|below) the (\\w+) (\\w+)\\?");
  static const std::regex where_q("Where is the (\\w+) (\\w+)\\?");
  std::smatch m;
  const std::string& q = qa.question;
  auto one = [&](const std::string& colour, const std::string& shape) {
    const auto idx = matching(s, colour, shape);
    REQUIRE(idx.size() == 1);
    return idx[0];
  };
  if (qa.type == "colour" && std::regex_match(q, m, colour_q))
    return s.objects[static_cast<size_t>(one("", m[1]))].colour;
  if (qa.type == "shape" && std::regex_match(q, m, shape_q))
    return s.objects[static_cast<size_t>(one(m[1], ""))].shape;
  if (qa.type == "size" && std::regex_match(q, m, size_q))
    return s.objects[static_cast<size_t>(one(m[1], m[2]))].size;
  if (qa.type == "count" && std::regex_match(q, m, count_all))
    return std::to_string(s.objects.size());
  if (qa.type == "count" && std::regex_match(q, m, count_shape))
    return std::to_string(matching(s, "", singular(m[1])).size());
  if (qa.type == "existence" && std::regex_match(q, m, exists_q)) {
    const std::string colour = m[2];
    CHECK(m[1].str() == (colour == "orange" ? "an" : "a"));
    return matching(s, colour, m[3]).empty() ? "no" : "yes";
  }
  if (qa.type == "existence" && std::regex_match(q, m, exists_shape_q)) {
    CHECK(m[1].str() == "a");  // no shape name starts with a vowel
    return matching(s, "", m[2]).empty() ? "no" : "yes";
  }
  if (qa.type == "relation" && std::regex_match(q, m, rel_q)) {
    const int a = one(m[1], m[2]), b = one(m[4], m[5]);
    for (const Relation& r : s.relations)
      if (r.subject == a && r.object == b) return r.predicate == m[3] ? "yes" : "no";
    FAIL("no relation " << a << " -> " << b);
    return "";
  }
  if (qa.type == "position" && std::regex_match(q, m, where_q)) {
    // Thirds of the 64 px image: [0, 21.33) top / left, [42.67, 64) bottom / right.
    const Object& o = s.objects[static_cast<size_t>(one(m[1], m[2]))];
    const std::string row = o.cy * 3 < 64 ? "top" : (o.cy * 3 < 128 ? "" : "bottom");
    const std::string col = o.cx * 3 < 64 ? "left" : (o.cx * 3 < 128 ? "" : "right");
    if (row.empty() && col.empty()) return "centre";
    return row + (row.empty() || col.empty() ? "" : " ") + col;
  }
  FAIL("question matches no template: " << qa);
  return "";
}

const std::set<std::string> kPositions = {"top left", "top",    "top right",   "left",        "centre",
                                          "right",    "bottom", "bottom left", "bottom right"};

// The distinct "question answer" lines of one type over seeds 0..199, each one required and
// checked against the oracle.
std::set<std::string> asked(const Scene& s, const std::string& type) {
  const GeneratorOptions opts;
  std::set<std::string> seen;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    const auto qs = make_questions(s, opts, seed);
    const QA* q = find_type(qs, type);
    REQUIRE(q);
    CHECK(oracle(s, *q) == q->answer);
    seen.insert(q->question + " " + q->answer);
  }
  return seen;
}

// Red large circle left of a small blue square (same row).
Scene two_objects() {
  return scene_of({obj("circle", "red", "large", 16, 32), obj("square", "blue", "small", 48, 32)});
}

}  // namespace

TEST_CASE("shapes_questions: a one-object scene has exact, forced questions", "[shapes_questions]") {
  const GeneratorOptions opts;
  const Scene s = scene_of({obj("circle", "red", "large", 32, 32)});
  for (uint64_t seed = 0; seed < 20; ++seed) {
    const auto qs = make_questions(s, opts, seed);
    INFO("seed " << seed);
    REQUIRE(find_type(qs, "colour"));
    CHECK(*find_type(qs, "colour") == QA{"colour", "What colour is the circle?", "red"});
    REQUIRE(find_type(qs, "shape"));
    CHECK(*find_type(qs, "shape") == QA{"shape", "What shape is the red object?", "circle"});
    REQUIRE(find_type(qs, "size"));
    CHECK(*find_type(qs, "size") == QA{"size", "What size is the red circle?", "large"});
    REQUIRE(find_type(qs, "count"));
    CHECK(find_type(qs, "existence"));
    CHECK_FALSE(find_type(qs, "relation"));  // nothing to relate to
    // Types come in the documented order, at most one each.
    std::vector<std::string> types;
    for (const QA& q : qs) types.push_back(q.type);
    CHECK(types == std::vector<std::string>{"colour", "shape", "size", "count", "existence", "position"});
    REQUIRE(find_type(qs, "position"));
    CHECK(*find_type(qs, "position") == QA{"position", "Where is the red circle?", "centre"});
  }
}

TEST_CASE("shapes_questions: colour/shape/size answers are the named object's attributes",
          "[shapes_questions]") {
  const GeneratorOptions opts;
  const Scene s = two_objects();
  std::set<std::string> colour_qs, shape_qs, size_qs;
  for (uint64_t seed = 0; seed < 100; ++seed) {
    const auto qs = make_questions(s, opts, seed);
    for (const QA& q : qs) {
      INFO(q);
      CHECK(oracle(s, q) == q.answer);
      if (q.type == "colour") colour_qs.insert(q.question + " " + q.answer);
      if (q.type == "shape") shape_qs.insert(q.question + " " + q.answer);
      if (q.type == "size") size_qs.insert(q.question + " " + q.answer);
    }
  }
  // Both objects get asked about, with exactly these texts.
  CHECK(colour_qs == std::set<std::string>{"What colour is the circle? red",
                                           "What colour is the square? blue"});
  CHECK(shape_qs == std::set<std::string>{"What shape is the red object? circle",
                                          "What shape is the blue object? square"});
  CHECK(size_qs == std::set<std::string>{"What size is the red circle? large",
                                         "What size is the blue square? small"});
}

TEST_CASE("shapes_questions: types a scene cannot support are skipped", "[shapes_questions]") {
  const GeneratorOptions opts;
  // Every object is a circle: no shape is unique, so no colour question.
  const Scene circles = scene_of({obj("circle", "red", "large", 12, 12),
                                  obj("circle", "blue", "large", 40, 40),
                                  obj("circle", "green", "small", 52, 12)});
  // Every object is red: no shape question. The two red squares differ only in size, so the red
  // star is the only object a question can name by (colour, shape): size and colour questions
  // are about it, and with one identifiable object there is no relation question.
  const Scene reds = scene_of({obj("square", "red", "large", 12, 12),
                               obj("square", "red", "small", 44, 44),
                               obj("star", "red", "small", 52, 12)});
  for (uint64_t seed = 0; seed < 50; ++seed) {
    const auto a = make_questions(circles, opts, seed);
    CHECK_FALSE(find_type(a, "colour"));
    REQUIRE(find_type(a, "shape"));
    CHECK(find_type(a, "shape")->answer == "circle");
    CHECK(find_type(a, "relation"));

    const auto b = make_questions(reds, opts, seed);
    CHECK_FALSE(find_type(b, "shape"));
    REQUIRE(find_type(b, "colour"));
    CHECK(*find_type(b, "colour") == QA{"colour", "What colour is the star?", "red"});
    REQUIRE(find_type(b, "size"));
    CHECK(*find_type(b, "size") == QA{"size", "What size is the red star?", "small"});
    CHECK_FALSE(find_type(b, "relation"));
    for (const QA& q : b) CHECK(oracle(reds, q) == q.answer);
  }
}

TEST_CASE("shapes_questions: existence is balanced, asks a bare shape half the time, and its pair negatives are adversarial",
          "[shapes_questions]") {
  const GeneratorOptions opts;
  const Scene s = scene_of({obj("circle", "red", "large", 14, 20),
                            obj("triangle", "orange", "small", 40, 12),
                            obj("cross", "white", "small", 50, 48)});
  std::set<std::pair<std::string, std::string>> present;
  std::set<std::string> shapes;
  for (const Object& o : s.objects) present.insert({o.colour, o.shape}), shapes.insert(o.shape);
  const std::regex pair_re("Is there (a|an) (\\w+) (\\w+)\\?");
  const std::regex shape_re("Is there a (\\w+)\\?");
  int yes = 0, bare = 0, bare_yes = 0;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    const auto qs = make_questions(s, opts, seed);
    const QA* q = find_type(qs, "existence");
    REQUIRE(q);
    const QA& qa = *q;
    INFO(qa);
    REQUIRE((qa.answer == "yes" || qa.answer == "no"));
    yes += qa.answer == "yes";
    std::smatch m;
    if (std::regex_match(qa.question, m, shape_re)) {
      ++bare;
      bare_yes += qa.answer == "yes";
      // "yes" names a shape of the scene, "no" one of the options that no object has.
      CHECK(shapes.count(m[1].str()) == (qa.answer == "yes" ? 1u : 0u));
      CHECK(std::count(opts.shapes.begin(), opts.shapes.end(), m[1].str()) == 1);
      continue;
    }
    REQUIRE(std::regex_match(qa.question, m, pair_re));
    const std::pair<std::string, std::string> p{m[2].str(), m[3].str()};
    if (qa.answer == "yes") {
      CHECK(present.count(p) == 1);
    } else {
      CHECK(present.count(p) == 0);
      // One attribute away from a present object, both words from the options.
      const bool near = std::any_of(s.objects.begin(), s.objects.end(), [&](const Object& o) {
        return o.colour == p.first || o.shape == p.second;
      });
      CHECK(near);
      CHECK(std::count(opts.colours.begin(), opts.colours.end(), p.first) == 1);
      CHECK(std::count(opts.shapes.begin(), opts.shapes.end(), p.second) == 1);
    }
  }
  CHECK(yes >= 70);   // 35% of 200
  CHECK(yes <= 130);  // 65% of 200
  CHECK(bare >= 70);  // the bare-shape form: 1/2 of 200, within 35-65%
  CHECK(bare <= 130);
  CHECK(bare_yes >= bare / 4);  // both answers occur in the bare form too
  CHECK(bare_yes <= bare * 3 / 4);
}

TEST_CASE("shapes_questions: relations agree with scene.relations, and yes and no both occur",
          "[shapes_questions]") {
  const GeneratorOptions opts;
  const Scene s = two_objects();
  REQUIRE(s.relations.size() == 2);
  REQUIRE(s.relations[0].predicate == "left of");  // circle left of square
  const std::set<std::string> expected = {
      "Is the red circle left of the blue square? yes", "Is the red circle right of the blue square? no",
      "Is the blue square right of the red circle? yes", "Is the blue square left of the red circle? no"};
  std::set<std::string> seen;
  int yes = 0;
  for (uint64_t seed = 0; seed < 200; ++seed) {
    const auto qs = make_questions(s, opts, seed);
    const QA* q = find_type(qs, "relation");
    REQUIRE(q);
    CHECK(oracle(s, *q) == q->answer);
    seen.insert(q->question + " " + q->answer);
    yes += q->answer == "yes";
  }
  CHECK(seen == expected);
  CHECK(yes >= 70);
  CHECK(yes <= 130);

  // The answer follows scene.relations, not a recomputation from the geometry.
  Scene flipped = s;
  for (Relation& r : flipped.relations)
    r.predicate = r.predicate == "left of" ? "above" : "below";
  for (uint64_t seed = 0; seed < 50; ++seed) {
    const auto qs = make_questions(flipped, opts, seed);
    const QA* q = find_type(qs, "relation");
    REQUIRE(q);
    CHECK(oracle(flipped, *q) == q->answer);
    CHECK(q->question.find("left of") == std::string::npos);
    CHECK(q->question.find("right of") == std::string::npos);
  }
  // A bad relation is an error, not a silently wrong answer.
  Scene bad = s;
  bad.relations[0].predicate = "near";
  CHECK_THROWS_AS(make_questions(bad, opts, 1), std::invalid_argument);
  bad = s;
  bad.relations[1].object = 5;
  CHECK_THROWS_AS(make_questions(bad, opts, 1), std::invalid_argument);
}

TEST_CASE("shapes_questions: position names the 3 x 3 cell of the object's centre", "[shapes_questions]") {
  const GeneratorOptions opts;  // 64 px: thirds at 21.33 and 42.67
  const Scene s = scene_of({obj("circle", "red", "small", 10, 10), obj("square", "blue", "small", 32, 12),
                            obj("star", "green", "small", 54, 56), obj("cross", "white", "small", 21, 32),
                            obj("diamond", "cyan", "small", 43, 30)});
  const std::set<std::string> seen = asked(s, "position");
  // The boundaries: the white cross (x 21 < 64 / 3) sits just inside the left third, the cyan
  // diamond (x 43 >= 2 * 64 / 3) just inside the right one.
  CHECK(seen == std::set<std::string>{"Where is the red circle? top left", "Where is the blue square? top",
                                      "Where is the green star? bottom right", "Where is the white cross? left",
                                      "Where is the cyan diamond? right"});
  // Only an object a question can name without ambiguity: two red circles, no position question.
  const Scene twins = scene_of({obj("circle", "red", "small", 10, 10), obj("circle", "red", "large", 40, 40)});
  for (uint64_t seed = 0; seed < 20; ++seed) CHECK_FALSE(find_type(make_questions(twins, opts, seed), "position"));
}

TEST_CASE("shapes_questions: count answers equal the object or shape count", "[shapes_questions]") {
  const Scene s = scene_of({obj("cross", "red", "large", 12, 12), obj("cross", "blue", "small", 40, 44),
                            obj("star", "green", "small", 52, 12)});
  const std::set<std::string> seen = asked(s, "count");
  CHECK(seen.count("How many objects are there? 3") == 1);
  CHECK(seen.count("How many crosses are there? 2") == 1);
  CHECK(seen.count("How many stars are there? 1") == 1);
  CHECK(seen.count("How many circles are there? 0") == 1);  // a shape from opts, absent
  for (const auto& line : seen) CHECK(line.find("crosss") == std::string::npos);
}

TEST_CASE("shapes_questions: every question on sampled scenes matches the oracle",
          "[shapes_questions]") {
  GeneratorOptions opts;
  opts.max_objects = 5;
  opts.seed = 3;
  std::map<std::string, int> per_type;
  for (int64_t i = 0; i < 300; ++i) {
    const Scene s = sample_scene(opts, "train", i);
    const auto qs = make_questions(s, opts, question_seed(opts.seed, "train", i));
    INFO(s);
    for (const QA& q : qs) {
      INFO(q);
      CHECK(oracle(s, q) == q.answer);
      CHECK(q.question.back() == '?');
      if (q.type == "position")  // the one type whose answer may be two words (a corner)
        CHECK(kPositions.count(q.answer) == 1);
      else
        CHECK(q.answer.find(' ') == std::string::npos);
      CHECK_FALSE(q.answer.empty());
      for (char c : q.answer) CHECK(!(c >= 'A' && c <= 'Z'));
      ++per_type[q.type];
    }
    CHECK(static_cast<bool>(find_type(qs, "relation")) ==
          (std::count_if(s.objects.begin(), s.objects.end(),
                         [&](const Object& o) { return matching(s, o.colour, o.shape).size() == 1; }) >= 2));
  }
  for (const auto& t : question_types()) CHECK(per_type[t] > 0);
}

TEST_CASE("shapes_questions: same seed, same output, and records have the documented fields",
          "[shapes_questions]") {
  const GeneratorOptions opts;
  const Scene s = scene_of({obj("circle", "red", "large", 16, 20), obj("square", "blue", "small", 48, 30),
                            obj("star", "orange", "small", 30, 52)});
  const std::string image = "images/train/000007.png";
  CHECK(make_questions(s, opts, 42) == make_questions(s, opts, 42));
  CHECK(instruction_record(s, image, opts, 42) == instruction_record(s, image, opts, 42));
  CHECK(vqa_records(s, image, opts, 42) == vqa_records(s, image, opts, 42));
  // Different seeds give different data somewhere.
  bool differs = false;
  for (uint64_t seed = 1; seed < 20 && !differs; ++seed)
    differs = instruction_record(s, image, opts, seed) != instruction_record(s, image, opts, 0);
  CHECK(differs);

  for (uint64_t seed = 0; seed < 30; ++seed) {
    const auto qs = make_questions(s, opts, seed);
    const json r = instruction_record(s, image, opts, seed);
    CHECK(r.at("id") == "train-000007");
    CHECK(r.at("image") == image);
    const json& conv = r.at("conversations");
    const json& types = r.at("question_types");
    REQUIRE(conv.size() == 2 * (qs.size() + 1));
    REQUIRE(types.size() == qs.size() + 1);
    std::string all_text;
    std::multiset<std::string> got, want;
    for (size_t i = 0; i < conv.size(); i += 2) {
      CHECK(conv[i].at("from") == "human");
      CHECK(conv[i + 1].at("from") == "gpt");
      std::string question = conv[i].at("value");
      all_text += question + conv[i + 1].at("value").get<std::string>();
      if (i == 0) {
        REQUIRE(question.rfind("<image>\n", 0) == 0);
        question = question.substr(8);
      }
      got.insert(types[i / 2].get<std::string>() + "|" + question + "|" +
                 conv[i + 1].at("value").get<std::string>());
    }
    for (const QA& q : qs) want.insert(q.type + "|" + q.question + "|" + q.answer);
    want.insert("caption|Describe the image.|" + caption(s));
    CHECK(got == want);  // the same turns, in some order
    size_t tags = 0;
    for (size_t p = all_text.find("<image>"); p != std::string::npos; p = all_text.find("<image>", p + 1))
      ++tags;
    CHECK(tags == 1);

    const auto vqa = vqa_records(s, image, opts, seed);
    REQUIRE(vqa.size() == qs.size());
    for (size_t k = 0; k < vqa.size(); ++k) {
      CHECK(vqa[k].at("id") == "train-000007-" + qs[k].type);
      CHECK(vqa[k].at("image") == image);
      CHECK(vqa[k].at("question_type") == qs[k].type);
      const json& turns = vqa[k].at("conversations");
      REQUIRE(turns.size() == 2);
      CHECK(turns[0].at("from") == "human");
      CHECK(turns[0].at("value") == "<image>\n" + qs[k].question);
      CHECK(turns[1].at("from") == "gpt");
      CHECK(turns[1].at("value") == qs[k].answer);
      CHECK(turns[0].size() == 2);
      CHECK(vqa[k].size() == 4);
    }
  }
  // The caption turn appears at different positions over seeds.
  std::set<size_t> caption_at;
  for (uint64_t seed = 0; seed < 60; ++seed) {
    const json types = instruction_record(s, image, opts, seed).at("question_types");
    for (size_t k = 0; k < types.size(); ++k)
      if (types[k] == "caption") caption_at.insert(k);
  }
  CHECK(caption_at.size() >= 3);
}

TEST_CASE("shapes_questions: question seeds differ from scene seeds and between scenes",
          "[shapes_questions]") {
  CHECK(question_seed(0, "train", 0) != scene_seed(0, "train", 0));
  CHECK(question_seed(0, "train", 0) != question_seed(0, "val", 0));
  CHECK(question_seed(0, "train", 0) != question_seed(0, "train", 1));
  CHECK(question_seed(0, "train", 0) != question_seed(1, "train", 0));
  CHECK(question_seed(5, "val", 3) == question_seed(5, "val", 3));
  CHECK(scene_image_path("train", 12) == "images/train/000012.png");
  CHECK(scene_image_path("val", 0) == "images/val/000000.png");
}

TEST_CASE("shapes_questions: write_instruction_data writes both manifests", "[shapes_questions]") {
  TempDir dir("shapes_questions");
  GeneratorOptions opts;
  opts.seed = 11;
  const InstructionSummary sum = write_instruction_data(dir.path.string(), 5, 3, opts);
  const fs::path train = dir.path / "train_instruct.jsonl", val = dir.path / "val_vqa.jsonl";
  CHECK(sum.train_manifest == train.string());
  CHECK(sum.val_manifest == val.string());
  REQUIRE(fs::exists(train));
  REQUIRE(fs::exists(val));
  CHECK_FALSE(fs::exists(dir.path / "train_instruct.jsonl.tmp"));
  CHECK_FALSE(fs::exists(dir.path / "val_vqa.jsonl.tmp"));

  auto lines_of = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::vector<std::string> out;
    for (std::string line; std::getline(in, line);) out.push_back(line);
    return out;
  };
  const auto tl = lines_of(train);
  REQUIRE(tl.size() == 5);
  CHECK(sum.train_records == 5);
  for (size_t i = 0; i < tl.size(); ++i) {
    const json r = json::parse(tl[i]);
    CHECK(r.at("id") == "train-00000" + std::to_string(i));
    CHECK(r.at("image") == "images/train/00000" + std::to_string(i) + ".png");
    const auto idx = static_cast<int64_t>(i);
    CHECK(r == instruction_record(sample_scene(opts, "train", idx), scene_image_path("train", idx),
                                  opts, question_seed(opts.seed, "train", idx)));
    CHECK(tl[i] == r.dump());  // compact, sorted keys
  }

  const auto vl = lines_of(val);
  size_t expected = 0;
  std::vector<json> want;
  for (int64_t i = 0; i < 3; ++i) {
    const auto recs = vqa_records(sample_scene(opts, "val", i), scene_image_path("val", i), opts,
                                  question_seed(opts.seed, "val", i));
    want.insert(want.end(), recs.begin(), recs.end());
    expected += recs.size();
  }
  REQUIRE(vl.size() == expected);
  CHECK(sum.val_records == static_cast<int64_t>(expected));
  for (size_t k = 0; k < vl.size(); ++k) {
    const json r = json::parse(vl[k]);
    CHECK(r == want[k]);
    CHECK(r.at("id").get<std::string>().rfind("val-00000", 0) == 0);
  }

  // Both manifests load through the project's LLaVA record parser: one image, one <image>.
  for (const fs::path& p : {train, val})
    for (const auto& rec : trialign::read_manifest(p.string())) {
      const trialign::Conversation c = trialign::parse_llava_record(rec);
      CHECK(c.images.size() == 1);
      CHECK(c.turns.front().role == "user");
    }

  // Same call, same bytes (the rename overwrites).
  const auto before = lines_of(train);
  write_instruction_data(dir.path.string(), 5, 3, opts);
  CHECK(lines_of(train) == before);

  // Errors name the path.
  const fs::path blocker = dir.path / "not_a_dir";
  std::ofstream(blocker) << "x";
  const std::string msg = trialign::test::message_of<std::runtime_error>(
      [&] { write_instruction_data(blocker.string(), 1, 1, opts); });
  CHECK(msg.find("not_a_dir") != std::string::npos);
  CHECK_THROWS_AS(write_instruction_data(dir.path.string(), -1, 0, opts), std::invalid_argument);
}
