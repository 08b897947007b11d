#include "eval/caption_objects.h"

#include <algorithm>
#include <cctype>

#include "data/shapes_world.h"

namespace trialign {

namespace {

bool contains(const std::vector<std::string>& v, const std::string& w) { return std::find(v.begin(), v.end(), w) != v.end(); }

// "circles" -> "circle", "crosses" -> "cross"; "" when the word is no shape.
std::string shape_of(const std::string& w) {
  const auto& shapes = shapes::all_shapes();
  if (contains(shapes, w)) return w;
  if (w.size() > 2 && w.compare(w.size() - 2, 2, "es") == 0 && contains(shapes, w.substr(0, w.size() - 2)))
    return w.substr(0, w.size() - 2);
  if (w.size() > 1 && w.back() == 's' && contains(shapes, w.substr(0, w.size() - 1))) return w.substr(0, w.size() - 1);
  return "";
}

}  // namespace

std::vector<ObjectMention> parse_object_mentions(const std::string& text) {
  std::vector<std::string> words;
  std::string cur;
  for (char ch : text + " ") {
    if (std::isalpha(static_cast<unsigned char>(ch))) cur += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    else if (!cur.empty()) words.push_back(cur), cur.clear();
  }
  std::vector<ObjectMention> out;
  for (size_t i = 0; i < words.size(); ++i) {
    const std::string shape = shape_of(words[i]);
    if (shape.empty()) continue;
    ObjectMention m;
    m.shape = shape;
    // Up to two attribute words directly before the shape, in any order.
    for (size_t back = 1; back <= 2 && back <= i; ++back) {
      const std::string& w = words[i - back];
      if (m.colour.empty() && contains(shapes::all_colours(), w)) m.colour = w;
      else if (m.size.empty() && contains(shapes::all_sizes(), w)) m.size = w;
      else break;
    }
    out.push_back(m);
  }
  return out;
}

CaptionObjectScore score_caption_objects(const std::string& caption, const nlohmann::json& scene) {
  CaptionObjectScore s;
  const auto& objects = scene.at("objects");
  s.objects = static_cast<int64_t>(objects.size());
  std::vector<bool> recalled(objects.size(), false);
  for (const auto& m : parse_object_mentions(caption)) {
    ++s.mentions;
    bool correct = false;
    for (size_t k = 0; k < objects.size(); ++k) {
      const auto& o = objects[k];
      const bool match = o.at("shape") == m.shape && (m.colour.empty() || o.at("colour") == m.colour) &&
                         (m.size.empty() || o.at("size") == m.size);
      if (!match) continue;
      correct = true;
      if (!m.colour.empty() && !m.size.empty()) recalled[k] = true;
    }
    s.correct_mentions += correct;
    if (!correct) {
      // Which level the error is at: no object of that shape at all, or the shape with a wrong
      // colour or size.
      bool shape_there = false;
      for (const auto& o : objects) shape_there = shape_there || o.at("shape") == m.shape;
      ++(shape_there ? s.attribute_errors : s.object_errors);
    }
  }
  s.recalled = std::count(recalled.begin(), recalled.end(), true);
  return s;
}

void ChairCounts::add(const CaptionObjectScore& s) {
  ++captions;
  hallucinated_captions += s.correct_mentions < s.mentions;
  total.mentions += s.mentions, total.correct_mentions += s.correct_mentions;
  total.objects += s.objects, total.recalled += s.recalled;
  total.object_errors += s.object_errors, total.attribute_errors += s.attribute_errors;
}

nlohmann::json ChairCounts::metrics() const {
  auto ratio = [](int64_t a, int64_t b) { return b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 0.0; };
  return {{"chair_i", ratio(total.mentions - total.correct_mentions, total.mentions)},
          {"chair_i/object", ratio(total.object_errors, total.mentions)},
          {"chair_i/attribute", ratio(total.attribute_errors, total.mentions)},
          {"chair_s", ratio(hallucinated_captions, captions)}};
}

}  // namespace trialign
