// Which objects a generated caption names, scored against a shapes-world scene graph.
// A mention is a shape word with the size and colour words directly before it
// ("a large red circle" -> large / red / circle; "a red circle" -> ? / red / circle). A mention
// is correct when some object of the scene has every attribute it states (an object that is not
// there, or a wrong colour or size, is a hallucination); a scene object is recalled when a
// correct mention states all three of its attributes.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace trialign {

struct ObjectMention {
  std::string size, colour, shape;  // "" when not stated
};

// Mentions in reading order. Words are split on anything that is not a letter; plural shapes
// ("circles", "crosses") count as the shape.
std::vector<ObjectMention> parse_object_mentions(const std::string& text);

struct CaptionObjectScore {
  int64_t mentions = 0, correct_mentions = 0;  // precision = correct / mentions
  int64_t objects = 0, recalled = 0;           // recall = recalled / objects
  // Wrong mentions by level: object (no object of that shape in the scene) and attribute (the
  // shape is there, but not with the stated colour / size). object + attribute = mentions - correct.
  int64_t object_errors = 0, attribute_errors = 0;
};

// CHAIR (Rohrbach et al. 2018) over a set of generated captions: CHAIR_i = hallucinated mentions
// / mentions (split by level), CHAIR_s = captions with at least one hallucinated mention /
// captions.
struct ChairCounts {
  int64_t captions = 0, hallucinated_captions = 0;
  CaptionObjectScore total;
  void add(const CaptionObjectScore& s);
  // {"chair_i", "chair_i/object", "chair_i/attribute", "chair_s"}
  nlohmann::json metrics() const;
};

// scene: {"objects": [{"shape", "colour", "size", ...}]} as written by `trialign data shapes`.
CaptionObjectScore score_caption_objects(const std::string& caption, const nlohmann::json& scene);

}  // namespace trialign
