#include "data/shapes_questions.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>
#include <utility>

namespace trialign::shapes {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using Pair = std::pair<std::string, std::string>;  // (colour, shape)

const char* const kImageTag = "<image>\n";
const char* const kCaptionPrompt = "Describe the image.";

// An independent stream per purpose: the tag is hashed into the seed, so e.g. a scene that
// cannot have a colour question still gets the same existence question as it would otherwise.
Rng stream(uint64_t seed, const char* tag) { return Rng(splitmix64(seed ^ fnv1a64(tag))); }

bool coin(Rng& rng) { return rng.uniform_int(0, 1) == 1; }

template <class T>
const T& pick(const std::vector<T>& v, Rng& rng) {
  return v[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(v.size()) - 1))];
}

// "cross" -> "crosses", "circle" -> "circles": the sibilant rule covers every shape name.
std::string plural(const std::string& noun) {
  auto ends_with = [&](const char* suffix) {
    const std::string s(suffix);
    return noun.size() >= s.size() && noun.compare(noun.size() - s.size(), s.size(), s) == 0;
  };
  if (ends_with("s") || ends_with("x") || ends_with("z") || ends_with("sh") || ends_with("ch"))
    return noun + "es";
  return noun + "s";
}


template <class Key>
std::map<Key, int> tally(const std::vector<Object>& objects, Key (*key)(const Object&)) {
  std::map<Key, int> n;
  for (const Object& o : objects) ++n[key(o)];
  return n;
}
std::string shape_of(const Object& o) { return o.shape; }
std::string colour_of(const Object& o) { return o.colour; }
Pair pair_of(const Object& o) { return {o.colour, o.shape}; }

// Indices of the objects whose key occurs once in the scene (in object order, so the draw
// below is reproducible).
template <class Key>
std::vector<size_t> unique_by(const std::vector<Object>& objects, Key (*key)(const Object&)) {
  const auto n = tally(objects, key);
  std::vector<size_t> out;
  for (size_t i = 0; i < objects.size(); ++i)
    if (n.at(key(objects[i])) == 1) out.push_back(i);
  return out;
}

bool make_colour(const Scene& s, Rng rng, QA& qa) {
  const auto cands = unique_by(s.objects, shape_of);
  if (cands.empty()) return false;
  const Object& o = s.objects[pick(cands, rng)];
  qa = {"colour", "What colour is the " + o.shape + "?", o.colour};
  return true;
}

bool make_shape(const Scene& s, Rng rng, QA& qa) {
  const auto cands = unique_by(s.objects, colour_of);
  if (cands.empty()) return false;
  const Object& o = s.objects[pick(cands, rng)];
  qa = {"shape", "What shape is the " + o.colour + " object?", o.shape};
  return true;
}

bool make_size(const Scene& s, Rng rng, QA& qa) {
  const auto cands = unique_by(s.objects, pair_of);
  if (cands.empty()) return false;
  const Object& o = s.objects[pick(cands, rng)];
  qa = {"size", "What size is the " + o.colour + " " + o.shape + "?", o.size};
  return true;
}

bool make_count(const Scene& s, const GeneratorOptions& opts, Rng rng, QA& qa) {
  if (coin(rng)) {
    // Half the per-shape questions name a shape in the scene: drawing only from opts.shapes
    // would make "0" the majority answer with a handful of objects.
    std::vector<std::string> in_scene;
    for (const Object& o : s.objects)
      if (std::find(in_scene.begin(), in_scene.end(), o.shape) == in_scene.end())
        in_scene.push_back(o.shape);
    const bool from_scene = coin(rng);
    const std::vector<std::string>& pool = from_scene || opts.shapes.empty() ? in_scene : opts.shapes;
    if (!pool.empty()) {
      const std::string& shape = pick(pool, rng);
      int n = 0;
      for (const Object& o : s.objects) n += o.shape == shape;
      qa = {"count", "How many " + plural(shape) + " are there?", std::to_string(n)};
      return true;
    }
  }
  qa = {"count", "How many objects are there?", std::to_string(s.objects.size())};
  return true;
}

bool make_existence(const Scene& s, const GeneratorOptions& opts, Rng rng, QA& qa) {
  std::set<Pair> present;
  std::vector<Pair> present_list;  // object order, for a reproducible draw
  for (const Object& o : s.objects)
    if (present.insert(pair_of(o)).second) present_list.push_back(pair_of(o));

  auto ask = [&](const Pair& p, const char* answer) {
    qa = {"existence", "Is there " + indefinite_article(p.first) + " " + p.first + " " + p.second + "?", answer};
    return true;
  };
  const bool want_yes = coin(rng);
  // Half the questions name the shape alone ("Is there a star?"), the object-level form of the
  // POPE probes: a model only ever asked about (colour, shape) pairs learns to check the colour
  // and answers a bare shape at chance. Its "no" is a shape no object has.
  if (coin(rng)) {
    std::vector<std::string> shapes, absent;
    for (const Pair& p : present_list)
      if (std::find(shapes.begin(), shapes.end(), p.second) == shapes.end()) shapes.push_back(p.second);
    for (const auto& sh : opts.shapes)
      if (std::find(shapes.begin(), shapes.end(), sh) == shapes.end()) absent.push_back(sh);
    const auto& from = want_yes ? shapes : absent;
    if (!from.empty()) {
      const std::string& sh = pick(from, rng);
      qa = {"existence", "Is there " + indefinite_article(sh) + " " + sh + "?", want_yes ? "yes" : "no"};
      return true;
    }
  }
  if (want_yes && !present_list.empty()) return ask(pick(present_list, rng), "yes");

  // Adversarial negatives: absent pairs one attribute away from a present object, so the answer
  // cannot come from recognising the shape or the colour alone.
  std::set<Pair> seen;
  std::vector<Pair> negatives;
  auto add = [&](const Pair& p) {
    if (!present.count(p) && seen.insert(p).second) negatives.push_back(p);
  };
  for (const Object& o : s.objects) {
    for (const auto& c : opts.colours) add({c, o.shape});
    for (const auto& sh : opts.shapes) add({o.colour, sh});
  }
  if (negatives.empty())  // every neighbour is present (tiny vocabularies): any absent pair
    for (const auto& c : opts.colours)
      for (const auto& sh : opts.shapes) add({c, sh});
  if (!negatives.empty()) return ask(pick(negatives, rng), "no");
  // Nothing is absent: only a "yes" can be asked (unbalanced, but still correct).
  if (!present_list.empty()) return ask(pick(present_list, rng), "yes");
  return false;
}

bool make_relation(const Scene& s, Rng rng, QA& qa) {
  const int n = static_cast<int>(s.objects.size());
  for (const Relation& r : s.relations) {
    if (r.subject < 0 || r.subject >= n || r.object < 0 || r.object >= n || r.subject == r.object)
      throw std::invalid_argument("make_questions: relation '" + std::to_string(r.subject) + " " +
                                  r.predicate + " " + std::to_string(r.object) + "' of scene '" +
                                  s.id + "' does not name two objects of its " +
                                  std::to_string(n));
    opposite_predicate(r.predicate);  // validates the predicate
  }
  // Only objects a question can name without ambiguity: a unique (colour, shape).
  const auto ident = unique_by(s.objects, pair_of);
  std::vector<bool> ok(s.objects.size(), false);
  for (size_t i : ident) ok[i] = true;
  std::vector<size_t> cands;
  for (size_t k = 0; k < s.relations.size(); ++k)
    if (ok[static_cast<size_t>(s.relations[k].subject)] &&
        ok[static_cast<size_t>(s.relations[k].object)])
      cands.push_back(k);
  if (cands.empty()) return false;
  const Relation& r = s.relations[pick(cands, rng)];
  const bool yes = coin(rng);
  const Object& a = s.objects[static_cast<size_t>(r.subject)];
  const Object& b = s.objects[static_cast<size_t>(r.object)];
  const std::string predicate = yes ? r.predicate : opposite_predicate(r.predicate);
  qa = {"relation",
        "Is the " + a.colour + " " + a.shape + " " + predicate + " the " + b.colour + " " +
            b.shape + "?",
        yes ? "yes" : "no"};
  return true;
}

// Where an object's centre lies on a 3 x 3 grid over the image: "top left", "top", ..., "centre",
// ..., "bottom right". A relation question needs two such look-ups and a comparison; asking for
// the look-up alone gives the language model one of these per scene to learn it from, where the
// relation questions alone were memorised per image (docs/benchmarks.md).
std::string grid_position(const Object& o, int image_size) {
  const float third = static_cast<float>(image_size) / 3.0f;
  auto band = [&](float v) { return v < third ? 0 : (v < 2.0f * third ? 1 : 2); };
  static const char* const rows[] = {"top", "", "bottom"};
  static const char* const cols[] = {"left", "", "right"};
  const std::string r = rows[band(o.cy)], c = cols[band(o.cx)];
  if (r.empty() && c.empty()) return "centre";
  if (r.empty() || c.empty()) return r + c;
  return r + " " + c;
}

bool make_position(const Scene& s, const GeneratorOptions& opts, Rng rng, QA& qa) {
  const auto cands = unique_by(s.objects, pair_of);
  if (cands.empty()) return false;
  const Object& o = s.objects[pick(cands, rng)];
  qa = {"position", "Where is the " + o.colour + " " + o.shape + "?", grid_position(o, opts.image_size)};
  return true;
}

json turn(const char* from, const std::string& value) {
  json t = json::object();
  t["from"] = from;
  t["value"] = value;
  return t;
}

}  // namespace

// "an orange ...", "a red ...": colour words decide the article.
std::string indefinite_article(const std::string& word) {
  return !word.empty() && std::string("aeiou").find(word[0]) != std::string::npos ? "an" : "a";
}

std::string opposite_predicate(const std::string& predicate) {
  if (predicate == "left of") return "right of";
  if (predicate == "right of") return "left of";
  if (predicate == "above") return "below";
  if (predicate == "below") return "above";
  throw std::invalid_argument("make_questions: unknown relation predicate '" + predicate +
                              "'; known predicates are: left of, right of, above, below");
}

bool operator==(const QA& a, const QA& b) {
  return a.type == b.type && a.question == b.question && a.answer == b.answer;
}
bool operator!=(const QA& a, const QA& b) { return !(a == b); }
std::ostream& operator<<(std::ostream& os, const QA& qa) {
  return os << "[" << qa.type << "] " << qa.question << " -> " << qa.answer;
}

const std::vector<std::string>& question_types() {
  static const std::vector<std::string> v = {"colour", "shape",     "size",
                                             "count",  "existence", "relation",
                                             "position"};
  return v;
}

std::vector<QA> make_questions(const Scene& scene, const GeneratorOptions& opts, uint64_t seed) {
  std::vector<QA> out;
  QA qa;
  if (make_colour(scene, stream(seed, "colour"), qa)) out.push_back(qa);
  if (make_shape(scene, stream(seed, "shape"), qa)) out.push_back(qa);
  if (make_size(scene, stream(seed, "size"), qa)) out.push_back(qa);
  if (make_count(scene, opts, stream(seed, "count"), qa)) out.push_back(qa);
  if (make_existence(scene, opts, stream(seed, "existence"), qa)) out.push_back(qa);
  if (make_relation(scene, stream(seed, "relation"), qa)) out.push_back(qa);
  if (make_position(scene, opts, stream(seed, "position"), qa)) out.push_back(qa);
  return out;
}

json instruction_record(const Scene& scene, const std::string& image,
                        const GeneratorOptions& opts, uint64_t seed) {
  std::vector<QA> turns = make_questions(scene, opts, seed);
  Rng rng = stream(seed, "instruction");
  // Fisher-Yates with the project's portable RNG (std::shuffle's output is implementation-defined).
  for (size_t i = turns.size(); i > 1; --i)
    std::swap(turns[i - 1], turns[static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(i) - 1))]);
  const std::string cap = caption(scene);
  if (!cap.empty()) {
    const auto at = rng.uniform_int(0, static_cast<int64_t>(turns.size()));
    turns.insert(turns.begin() + at, QA{"caption", kCaptionPrompt, cap});
  }

  json conversations = json::array();
  json types = json::array();
  for (size_t i = 0; i < turns.size(); ++i) {
    conversations.push_back(turn("human", (i == 0 ? kImageTag : "") + turns[i].question));
    conversations.push_back(turn("gpt", turns[i].answer));
    types.push_back(turns[i].type);
  }
  json record = json::object();
  record["id"] = scene.id;
  record["image"] = image;
  record["question_types"] = std::move(types);
  record["conversations"] = std::move(conversations);
  return record;
}

std::vector<json> vqa_records(const Scene& scene, const std::string& image,
                              const GeneratorOptions& opts, uint64_t seed) {
  std::vector<json> out;
  for (const QA& qa : make_questions(scene, opts, seed)) {
    json record = json::object();
    record["id"] = scene.id + "-" + qa.type;
    record["image"] = image;
    record["question_type"] = qa.type;
    record["conversations"] =
        json::array({turn("human", kImageTag + qa.question), turn("gpt", qa.answer)});
    out.push_back(std::move(record));
  }
  return out;
}

uint64_t question_seed(uint64_t seed, const std::string& split, int64_t index) {
  // mix_seed starts from its own constant and hashes the tag in, so this is a different chain
  // from scene_seed's (no dataset seed turns one into the other).
  return ::trialign::mix_seed(
      {seed, fnv1a64("questions"), fnv1a64(split), static_cast<uint64_t>(index)});
}

std::string scene_image_path(const std::string& split, int64_t index) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%06lld", static_cast<long long>(index));
  return "images/" + split + "/" + buf + ".png";
}

int64_t write_jsonl_records(const std::string& path, int64_t count, const std::string& who,
                            const std::function<std::vector<json>(int64_t)>& records) {
  const std::string tmp = path + ".tmp";
  auto fail = [&](const std::string& p, const std::string& why) {
    std::error_code ec;
    fs::remove(tmp, ec);  // leave no half-written file behind
    throw std::runtime_error(who + ": cannot write '" + p + "'" + (why.empty() ? "" : ": " + why));
  };
  int64_t lines = 0;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(tmp, "cannot open");
    for (int64_t i = 0; i < count; ++i) {
      for (const json& r : records(i)) {
        out << r.dump() << '\n';
        ++lines;
      }
      if (!out) fail(tmp, "");
    }
    out.close();
    if (!out) fail(tmp, "");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) fail(path, ec.message());
  return lines;
}

InstructionSummary write_instruction_data(const std::string& out_dir, int64_t n_train,
                                          int64_t n_val, const GeneratorOptions& opts) {
  validate(opts);
  if (n_train < 0 || n_val < 0)
    throw std::invalid_argument("write_instruction_data: scene counts must be >= 0 (got train=" +
                                std::to_string(n_train) + ", val=" + std::to_string(n_val) + ")");
  const fs::path root(out_dir);
  {
    std::error_code ec;
    fs::create_directories(root, ec);
    if (ec || !fs::is_directory(root))
      throw std::runtime_error("write_instruction_data: cannot create directory '" +
                               root.string() + "': " + (ec ? ec.message() : "not a directory"));
  }

  auto write_split = [&](const std::string& split, int64_t count, const std::string& name, bool instruct,
                         std::string& manifest) {
    manifest = (root / name).string();
    return write_jsonl_records(manifest, count, "write_instruction_data", [&](int64_t i) {
      const Scene scene = sample_scene(opts, split, i);
      const std::string image = scene_image_path(split, i);
      const uint64_t qseed = question_seed(opts.seed, split, i);
      if (instruct) return std::vector<json>{instruction_record(scene, image, opts, qseed)};
      return vqa_records(scene, image, opts, qseed);
    });
  };

  InstructionSummary s;
  s.train_records = write_split("train", n_train, "train_instruct.jsonl", true, s.train_manifest);
  s.val_records = write_split("val", n_val, "val_vqa.jsonl", false, s.val_manifest);
  return s;
}

}  // namespace trialign::shapes
