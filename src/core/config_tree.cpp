#include "core/config_tree.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "core/errors.h"

namespace fs = std::filesystem;

namespace trialign {

const ConfigNode* ConfigNode::find(const std::string& key) const {
  for (const auto& kv : map)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

ConfigNode* ConfigNode::find(const std::string& key) {
  for (auto& kv : map)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

ConfigNode& ConfigNode::child(const std::string& key) {
  if (kind == Kind::Null) kind = Kind::Map;
  if (auto* n = find(key)) return *n;
  map.emplace_back(key, ConfigNode{});
  return map.back().second;
}

void ConfigNode::erase(const std::string& key) {
  for (auto it = map.begin(); it != map.end(); ++it)
    if (it->first == key) {
      map.erase(it);
      return;
    }
}

std::string ConfigNode::where() const {
  if (file.empty()) return "<default>";
  if (line <= 0) return file;
  return file + ":" + std::to_string(line) + ":" + std::to_string(column);
}

ConfigNode ConfigNode::make_scalar(std::string text, std::string file, int line) {
  ConfigNode n;
  n.kind = Kind::Scalar;
  n.scalar = std::move(text);
  n.file = std::move(file);
  n.line = line;
  return n;
}

namespace {

ConfigNode convert(const YAML::Node& y, const std::string& file) {
  ConfigNode n;
  n.file = file;
  n.line = y.Mark().line + 1;
  n.column = y.Mark().column + 1;
  switch (y.Type()) {
    case YAML::NodeType::Undefined:
    case YAML::NodeType::Null:
      n.kind = ConfigNode::Kind::Null;
      break;
    case YAML::NodeType::Scalar:
      n.kind = ConfigNode::Kind::Scalar;
      n.scalar = y.Scalar();
      break;
    case YAML::NodeType::Sequence:
      n.kind = ConfigNode::Kind::Sequence;
      for (const auto& item : y) n.items.push_back(convert(item, file));
      break;
    case YAML::NodeType::Map:
      n.kind = ConfigNode::Kind::Map;
      for (const auto& kv : y) {
        const std::string key = kv.first.as<std::string>();
        if (n.find(key))
          throw ConfigError(file + ":" + std::to_string(kv.first.Mark().line + 1) +
                            ": duplicate key '" + key + "'; keep one of them");
        n.map.emplace_back(key, convert(kv.second, file));
      }
      break;
  }
  return n;
}

ConfigNode parse_yaml(const std::string& text, const std::string& file) {
  try {
    return convert(YAML::Load(text), file);
  } catch (const YAML::Exception& e) {
    // yaml-cpp reports a tab in the indentation by what it then fails to parse ("illegal map
    // value", "end of map not found"): say what is wrong on the line it names, or the one before.
    std::string hint;
    std::istringstream lines(text);
    std::string line;
    for (int k = 0; std::getline(lines, line) && k <= e.mark.line; ++k) {
      const size_t indent_end = line.find_first_not_of(" \t");
      if (indent_end == std::string::npos) continue;  // a blank line's whitespace indents nothing
      if (k + 1 >= e.mark.line && line.substr(0, indent_end).find('\t') != std::string::npos)
        hint = "; line " + std::to_string(k + 1) + " is indented with a tab, and YAML indents with spaces only";
    }
    throw ConfigError(file + ":" + std::to_string(e.mark.line + 1) + ":" +
                      std::to_string(e.mark.column + 1) + ": YAML syntax error: " + e.msg + hint);
  }
}

ConfigNode load_with_includes(const fs::path& path, std::vector<std::string>& stack,
                              const std::string& included_from) {
  const std::string key = fs::weakly_canonical(path).string();
  for (const auto& s : stack)
    if (s == key) throw ConfigError(included_from + ": include cycle through " + path.string());
  std::ifstream in(path);
  const bool folder = fs::is_directory(path);  // an ifstream opens a folder and reads nothing from it
  if (!in || folder) {
    const std::string prefix = included_from.empty() ? "" : included_from + ": ";
    throw ConfigError(prefix + "cannot read config file '" + path.string() + "'" + (folder ? " (it is a folder)" : "") +
                      ": check the path (relative includes resolve against the including file)");
  }
  std::stringstream ss;
  ss << in.rdbuf();
  ConfigNode doc = parse_yaml(ss.str(), path.string());
  if (doc.is_null()) doc.kind = ConfigNode::Kind::Map;
  if (!doc.is_map())
    throw ConfigError(path.string() + ":1: a config file must be a mapping of keys to values");

  const ConfigNode* inc = doc.find("include");
  if (!inc) return doc;
  std::vector<const ConfigNode*> incs;
  if (inc->kind == ConfigNode::Kind::Scalar) incs.push_back(inc);
  else if (inc->kind == ConfigNode::Kind::Sequence)
    for (const auto& i : inc->items) incs.push_back(&i);
  for (const auto* i : incs)
    if (i->kind != ConfigNode::Kind::Scalar)
      throw ConfigError(i->where() + ": include: expects a file path or a list of file paths");
  if (incs.empty() && inc->kind != ConfigNode::Kind::Sequence)
    throw ConfigError(inc->where() + ": include: expects a file path or a list of file paths");

  stack.push_back(key);
  ConfigNode merged;
  merged.kind = ConfigNode::Kind::Map;
  merged.file = path.string();
  for (const auto* i : incs)
    merge_config(merged, load_with_includes(path.parent_path() / i->scalar, stack, i->where()));
  stack.pop_back();
  doc.erase("include");
  merge_config(merged, doc);
  return merged;
}

void emit(YAML::Emitter& out, const ConfigNode& n) {
  switch (n.kind) {
    case ConfigNode::Kind::Null: out << YAML::Null; break;
    case ConfigNode::Kind::Scalar: out << n.scalar; break;
    case ConfigNode::Kind::Sequence:
      out << YAML::Flow << YAML::BeginSeq;
      for (const auto& i : n.items) emit(out, i);
      out << YAML::EndSeq;
      break;
    case ConfigNode::Kind::Map:
      out << YAML::Block << YAML::BeginMap;
      for (const auto& kv : n.map) {
        out << YAML::Key << kv.first << YAML::Value;
        emit(out, kv.second);
      }
      out << YAML::EndMap;
      break;
  }
}

}  // namespace

ConfigNode load_config_file(const std::string& path) {
  std::vector<std::string> stack;
  return load_with_includes(path, stack, "");
}

ConfigNode parse_config_string(const std::string& text, const std::string& file_label) {
  return parse_yaml(text, file_label);
}

void mark_retyped(ConfigNode& section, const std::string& new_type) {
  const ConfigNode* old = section.is_map() ? section.find("type") : nullptr;
  if (!old || old->kind != ConfigNode::Kind::Scalar || old->scalar == new_type) return;
  const std::string old_type = old->scalar;
  for (auto& [key, child] : section.map)
    if (key != "type" && child.written_for_type.empty()) child.written_for_type = old_type;
}

void merge_config(ConfigNode& base, const ConfigNode& overlay) {
  if (base.is_map() && overlay.is_map()) {
    if (const ConfigNode* t = overlay.find("type"); t && t->kind == ConfigNode::Kind::Scalar) mark_retyped(base, t->scalar);
    for (const auto& kv : overlay.map) {
      ConfigNode* existing = base.find(kv.first);
      if (existing) {
        existing->written_for_type.clear();  // the overlay wrote into it: meant for the type it leaves
        merge_config(*existing, kv.second);
      } else {
        base.map.push_back(kv);
      }
    }
    return;
  }
  base = overlay;
}

void apply_override(ConfigNode& root, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError("--set '" + assignment + "': expected KEY=VALUE, e.g. --set optim.lr=2e-4");
  const std::string key = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  ConfigNode parsed;
  try {
    parsed = convert(YAML::Load(value), "--set " + key);
  } catch (const YAML::Exception& e) {
    throw ConfigError("--set " + key + ": cannot parse value '" + value + "': " + e.msg);
  }
  // A null would read as "not set" and the key fall back to its built-in default without a word.
  if (parsed.is_null())
    throw ConfigError("--set " + key + ": the value is empty (or null); give one (e.g. --set " + key +
                      "=VALUE), or drop the --set to keep the config's value");
  parsed.line = 0;
  ConfigNode* node = &root;
  std::stringstream ks(key);
  std::string part, walked;
  while (std::getline(ks, part, '.')) {
    if (part.empty()) throw ConfigError("--set '" + assignment + "': empty key segment");
    if (!node->is_map() && !node->is_null())
      throw ConfigError("--set " + key + ": '" + walked + "' is not a mapping, cannot set a key inside it");
    // `--set SECTION.type=other`: the section's options were written for its old type.
    if (part == "type" && ks.peek() == std::char_traits<char>::eof() && parsed.kind == ConfigNode::Kind::Scalar)
      mark_retyped(*node, parsed.scalar);
    const bool created = node->find(part) == nullptr;
    node = &node->child(part);
    if (created) node->file = "--set " + key;  // a key the --set made: errors about it name the --set
    walked += (walked.empty() ? "" : ".") + part;
  }
  // A mapping merges into the section it names, except one that changes the section's `type:`:
  // the old type's options would be unknown keys of the new one, and could not be removed.
  const ConfigNode* old_type = node->is_map() ? node->find("type") : nullptr;
  const ConfigNode* new_type = parsed.is_map() ? parsed.find("type") : nullptr;
  const bool retyped = old_type && new_type && old_type->scalar != new_type->scalar;
  if (node->is_map() && parsed.is_map() && !retyped) merge_config(*node, parsed);
  else *node = parsed;
}

std::string to_yaml(const ConfigNode& node) {
  YAML::Emitter out;
  emit(out, node);
  return std::string(out.c_str()) + "\n";
}

}  // namespace trialign
