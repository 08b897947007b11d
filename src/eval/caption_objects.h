// Which objects a generated caption names, scored against a shapes-world scene graph or, for a
// user's own data, against a reference object list.
// Shapes world: a mention is a shape word with the size and colour words directly before it
// ("a large red circle" -> large / red / circle; "a red circle" -> ? / red / circle). A mention
// is correct when some object of the scene has every attribute it states (an object that is not
// there, or a wrong colour or size, is a hallucination); a scene object is recalled when a
// correct mention states all three of its attributes. Two consecutive mentions joined by a
// predicate ("... circle left of a ... square"; left of / right of / above / below) are a relation
// claim, scored when both mentions are correct: it holds when some pair of objects they describe
// has that relation in the scene graph.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace trialign {

struct ObjectMention {
  std::string size, colour, shape;  // "" when not stated
  size_t begin = 0, end = 0;        // word span [begin, end): attributes then the shape word
};

// Mentions in reading order. Words are split on anything but letters and digits; plural shapes
// ("circles", "crosses") count as the shape.
std::vector<ObjectMention> parse_object_mentions(const std::string& text);

struct CaptionObjectScore {
  int64_t mentions = 0, correct_mentions = 0;  // precision = correct / mentions
  int64_t objects = 0, recalled = 0;           // recall = recalled / objects
  // Wrong mentions by level: object (no object of that shape in the scene) and attribute (the
  // shape is there, but not with the stated colour / size). object + attribute = mentions - correct.
  int64_t object_errors = 0, attribute_errors = 0;
  // Relation claims between two correct mentions, and those the scene graph contradicts.
  int64_t relations = 0, relation_errors = 0;
};

// CHAIR (Rohrbach et al. 2018) over a set of generated captions: CHAIR_i = hallucinated mentions
// / mentions (split by level), CHAIR_s = captions with at least one hallucinated mention /
// captions. The relation level has its own denominator: chair_r = contradicted relation claims /
// relation claims (between correctly named objects, so it does not count an error twice).
struct ChairCounts {
  int64_t captions = 0, hallucinated_captions = 0;
  CaptionObjectScore total;
  void add(const CaptionObjectScore& s);
  // {"chair_i", "chair_i/object", "chair_i/attribute", "chair_s"} and, when any caption stated a
  // relation, "chair_r" and "relations".
  nlohmann::json metrics() const;
};

// Lower-case words of a text: letters and digits, anything else splits.
std::vector<std::string> caption_words(const std::string& text);

// scene: {"objects": [{"shape", "colour", "size", ...}], "relations": [{"subject", "object",
// "predicate"}]} as written by `trialign data shapes` ("relations" may be absent: no relation
// claim then counts as wrong).
CaptionObjectScore score_caption_objects(const std::string& caption, const nlohmann::json& scene);

// Object vocabulary for a user's own data: categories, each with the words or phrases that name
// it ("dog": ["dog", "puppy"]). A phrase also matches with a plural "s", "es" or "y" -> "ies" on its
// last word;
// at each word the longest phrase wins ("hot dog" before "dog").
class ObjectVocabulary {
 public:
  ObjectVocabulary() = default;
  // A JSON object {"category": ["phrase", ...], ...}; errors name the file and the category.
  static ObjectVocabulary load(const std::string& path);
  // Every category named by itself only (the default when no vocabulary file is given).
  static ObjectVocabulary from_categories(const std::vector<std::string>& categories);
  void add(const std::string& category, const std::vector<std::string>& phrases);
  // Categories mentioned in the text, in reading order (repeats kept).
  std::vector<std::string> mentions(const std::string& text) const;
  bool empty() const { return phrases_.empty(); }

 private:
  std::vector<std::pair<std::vector<std::string>, std::string>> phrases_;  // words -> category, longest first
};

// A caption against a reference object list (the record's "objects"): every vocabulary mention
// is correct when its category is in the list, else an object-level hallucination; each listed
// object named at least once is recalled. References outside the vocabulary still count towards
// recall's denominator.
CaptionObjectScore score_caption_references(const std::string& caption, const std::vector<std::string>& references,
                                            const ObjectVocabulary& vocabulary);

}  // namespace trialign
