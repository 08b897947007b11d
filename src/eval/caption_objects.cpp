#include "eval/caption_objects.h"

#include <algorithm>
#include <cctype>
#include <fstream>

#include "core/errors.h"
#include "data/shapes_world.h"
#include "core/json_text.h"

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

std::vector<std::string> caption_words(const std::string& text) {
  std::vector<std::string> words;
  std::string cur;
  for (char ch : text + " ") {
    if (std::isalnum(static_cast<unsigned char>(ch))) cur += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    else if (!cur.empty()) words.push_back(cur), cur.clear();
  }
  return words;
}

namespace {

std::vector<ObjectMention> mentions_in(const std::vector<std::string>& words) {
  std::vector<ObjectMention> out;
  for (size_t i = 0; i < words.size(); ++i) {
    const std::string shape = shape_of(words[i]);
    if (shape.empty()) continue;
    ObjectMention m;
    m.shape = shape;
    m.begin = i;
    m.end = i + 1;
    // Up to two attribute words directly before the shape, in any order.
    for (size_t back = 1; back <= 2 && back <= i; ++back) {
      const std::string& w = words[i - back];
      if (m.colour.empty() && contains(shapes::all_colours(), w)) m.colour = w;
      else if (m.size.empty() && contains(shapes::all_sizes(), w)) m.size = w;
      else break;
      m.begin = i - back;
    }
    out.push_back(m);
  }
  return out;
}

bool describes(const nlohmann::json& o, const ObjectMention& m) {
  return o.at("shape") == m.shape && (m.colour.empty() || o.at("colour") == m.colour) &&
         (m.size.empty() || o.at("size") == m.size);
}

// The predicate between two mentions: the words between them, articles and "is"/"and" aside,
// must be exactly one of the scene graph's predicates; "" otherwise (a list, not a claim).
std::string predicate_between(const std::vector<std::string>& words, const ObjectMention& a, const ObjectMention& b) {
  static const std::vector<std::string> fillers = {"a", "an", "the", "is", "are", "and", "which", "that"};
  std::string phrase;
  for (size_t i = a.end; i < b.begin; ++i) {
    if (contains(fillers, words[i])) continue;
    phrase += (phrase.empty() ? "" : " ") + words[i];
  }
  for (const char* p : {"left of", "right of", "above", "below"})
    if (phrase == p) return p;
  return "";
}

}  // namespace

std::vector<ObjectMention> parse_object_mentions(const std::string& text) { return mentions_in(caption_words(text)); }

CaptionObjectScore score_caption_objects(const std::string& caption, const nlohmann::json& scene) {
  CaptionObjectScore s;
  const auto& objects = scene.at("objects");
  s.objects = static_cast<int64_t>(objects.size());
  std::vector<bool> recalled(objects.size(), false);
  const auto words = caption_words(caption);
  const auto mentions = mentions_in(words);
  std::vector<bool> correct_at(mentions.size(), false);
  for (size_t mi = 0; mi < mentions.size(); ++mi) {
    const auto& m = mentions[mi];
    ++s.mentions;
    bool correct = false;
    for (size_t k = 0; k < objects.size(); ++k) {
      if (!describes(objects[k], m)) continue;
      correct = true;
      if (!m.colour.empty() && !m.size.empty()) recalled[k] = true;
    }
    correct_at[mi] = correct;
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
  // Relation claims between consecutive correct mentions ("a red circle left of a blue square").
  const auto rel = scene.find("relations");
  for (size_t mi = 0; mi + 1 < mentions.size(); ++mi) {
    if (!correct_at[mi] || !correct_at[mi + 1]) continue;
    const std::string predicate = predicate_between(words, mentions[mi], mentions[mi + 1]);
    if (predicate.empty()) continue;
    ++s.relations;
    bool holds = false;
    if (rel != scene.end())
      for (const auto& r : *rel) {
        const auto subject = r.at("subject").get<size_t>(), object = r.at("object").get<size_t>();
        if (subject < objects.size() && object < objects.size() && r.at("predicate") == predicate &&
            describes(objects[subject], mentions[mi]) && describes(objects[object], mentions[mi + 1]))
          holds = true;
      }
    s.relation_errors += !holds;
  }
  return s;
}

void ChairCounts::add(const CaptionObjectScore& s) {
  ++captions;
  hallucinated_captions += s.correct_mentions < s.mentions;
  total.mentions += s.mentions, total.correct_mentions += s.correct_mentions;
  total.objects += s.objects, total.recalled += s.recalled;
  total.object_errors += s.object_errors, total.attribute_errors += s.attribute_errors;
  total.relations += s.relations, total.relation_errors += s.relation_errors;
}

nlohmann::json ChairCounts::metrics() const {
  auto ratio = [](int64_t a, int64_t b) { return b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 0.0; };
  nlohmann::json m = {{"chair_i", ratio(total.mentions - total.correct_mentions, total.mentions)},
          {"chair_i/object", ratio(total.object_errors, total.mentions)},
          {"chair_i/attribute", ratio(total.attribute_errors, total.mentions)},
          {"chair_s", ratio(hallucinated_captions, captions)}};
  if (total.relations > 0) {
    m["chair_r"] = ratio(total.relation_errors, total.relations);
    m["relations"] = total.relations;
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// Reference object lists (a user's own data)
// ---------------------------------------------------------------------------------------------
void ObjectVocabulary::add(const std::string& category, const std::vector<std::string>& phrases) {
  for (const auto& p : phrases) {
    auto words = caption_words(p);
    if (words.empty()) continue;
    // Kept longest first (after the phrases of equal length already there), so "hot dog" is
    // tried before "dog" at the same word.
    const auto at = std::find_if(phrases_.begin(), phrases_.end(),
                                 [&](const auto& e) { return e.first.size() < words.size(); });
    phrases_.emplace(at, std::move(words), category);
  }
}

ObjectVocabulary ObjectVocabulary::from_categories(const std::vector<std::string>& categories) {
  ObjectVocabulary v;
  for (const auto& c : categories) v.add(c, {c});
  return v;
}

ObjectVocabulary ObjectVocabulary::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw DataError(path + ": cannot read the object vocabulary (eval.object_vocabulary)");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const std::exception& e) {
    throw DataError(path + ": the object vocabulary is not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object() || j.empty())
    throw DataError(path + ": the object vocabulary must be a JSON object {\"category\": [\"phrase\", ...], ...}");
  ObjectVocabulary v;
  for (const auto& [category, phrases] : j.items()) {
    if (!phrases.is_array() || phrases.empty())
      throw DataError(path + ": category '" + category + "' must map to a non-empty list of phrases");
    std::vector<std::string> list;
    for (const auto& p : phrases) {
      if (!p.is_string() || caption_words(p.get<std::string>()).empty())
        throw DataError(path + ": category '" + category + "' has a phrase that is not a non-empty string: " + json_text(p));
      list.push_back(p.get<std::string>());
    }
    v.add(category, list);
  }
  return v;
}

std::vector<std::string> ObjectVocabulary::mentions(const std::string& text) const {
  const auto words = caption_words(text);
  std::vector<std::string> out;
  auto plural_of = [](const std::string& w, const std::string& base) {
    if (w == base + "s" || w == base + "es") return true;
    return base.size() > 1 && base.back() == 'y' && w == base.substr(0, base.size() - 1) + "ies";  // puppy -> puppies
  };
  for (size_t i = 0; i < words.size();) {
    size_t taken = 0;
    for (const auto& [phrase, category] : phrases_) {
      if (i + phrase.size() > words.size()) continue;
      bool match = true;
      for (size_t k = 0; k < phrase.size() && match; ++k) {
        const bool last = k + 1 == phrase.size();
        match = words[i + k] == phrase[k] || (last && plural_of(words[i + k], phrase[k]));
      }
      if (match) {
        out.push_back(category);
        taken = phrase.size();
        break;
      }
    }
    i += taken > 0 ? taken : 1;
  }
  return out;
}

CaptionObjectScore score_caption_references(const std::string& caption, const std::vector<std::string>& references,
                                            const ObjectVocabulary& vocabulary) {
  CaptionObjectScore s;
  s.objects = static_cast<int64_t>(references.size());
  std::vector<bool> recalled(references.size(), false);
  for (const auto& category : vocabulary.mentions(caption)) {
    ++s.mentions;
    bool correct = false;
    for (size_t k = 0; k < references.size(); ++k)
      if (references[k] == category) correct = true, recalled[k] = true;
    s.correct_mentions += correct;
    s.object_errors += !correct;
  }
  s.recalled = std::count(recalled.begin(), recalled.end(), true);
  return s;
}

}  // namespace trialign
