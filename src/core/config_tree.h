// A YAML document as a tree whose every node remembers where it came from (file:line:col), so
// that errors found long after parsing still point at the line the user has to fix. Produced
// from files (with `include:` composition) and `--set a.b=value` overrides; consumed by
// ConfigReader (config_reader.h), which turns it into typed structs.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace trialign {

struct ConfigNode {
  enum class Kind { Null, Scalar, Sequence, Map };
  Kind kind = Kind::Null;
  std::string scalar;                                  // Scalar: the text as written
  std::vector<ConfigNode> items;                       // Sequence
  std::vector<std::pair<std::string, ConfigNode>> map; // Map, in file order
  std::string file;                                    // source: path, or "--set"
  int line = 0, column = 0;                            // 1-based; 0 when unknown
  // Set on an option of a typed section (a map with `type:`) when a later layer (an including
  // file, --set, a pipeline stage's set:) changed the section's type: the type the option was
  // written for. The reader drops such an option when the new type does not declare it, and
  // reads it when it does (dpo and mdpo share `beta`). "" for everything else.
  std::string written_for_type;

  bool is_map() const { return kind == Kind::Map; }
  bool is_null() const { return kind == Kind::Null; }
  const ConfigNode* find(const std::string& key) const;
  ConfigNode* find(const std::string& key);
  // Inserts (or returns) a child of a map node; turns a Null node into a map.
  ConfigNode& child(const std::string& key);
  void erase(const std::string& key);
  // "configs/a.yaml:12:3", or "--set" for overrides.
  std::string where() const;

  static ConfigNode make_scalar(std::string text, std::string file = "", int line = 0);
};

// Parses a YAML file. `include: path` or `include: [a.yaml, b.yaml]` at the top level is merged
// first (paths relative to the including file), then the file's own keys on top. Throws
// ConfigError naming the file and line for YAML syntax errors, missing files and include cycles.
ConfigNode load_config_file(const std::string& path);
ConfigNode parse_config_string(const std::string& text, const std::string& file_label);

// Recursive merge: maps merge key by key, anything else in `overlay` replaces `base`. An overlay
// map whose `type:` differs from base's marks base's other keys with the old type
// (written_for_type) before merging; keys the overlay writes are its own again.
void merge_config(ConfigNode& base, const ConfigNode& overlay);

// `section`'s type becomes `new_type`: when it was another type, its options are marked as
// written for the old one (see written_for_type). Call before setting the new `type:`.
void mark_retyped(ConfigNode& section, const std::string& new_type);

// Applies "a.b.c=value" (value parsed as YAML, so lists and numbers work). Throws ConfigError
// for a malformed assignment.
void apply_override(ConfigNode& root, const std::string& assignment);

// Serialises back to YAML (used for the resolved config saved with every run and checkpoint).
std::string to_yaml(const ConfigNode& node);

}  // namespace trialign
