#include "core/config_reader.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include <spdlog/spdlog.h>

#include "core/errors.h"

namespace trialign {

void ConfigErrors::add(const ConfigNode* where, const std::string& path, const std::string& message) {
  std::string loc = where ? where->where() : std::string("<config>");
  messages_.push_back(loc + ": " + (path.empty() ? "" : path + ": ") + message);
}

void ConfigErrors::throw_if_any(const std::string& context) const {
  if (messages_.empty()) return;
  std::string all = context + ": " + std::to_string(messages_.size()) + " problem" +
                    (messages_.size() == 1 ? "" : "s");
  for (const auto& m : messages_) all += "\n  " + m;
  throw ConfigError(all);
}

namespace {

// A value as an error message shows it: a scalar's text, or what kind of node stands there.
std::string shown(const ConfigNode* n) {
  switch (n->kind) {
    case ConfigNode::Kind::Scalar: return "'" + n->scalar + "'";
    case ConfigNode::Kind::Sequence: return "a list";
    case ConfigNode::Kind::Map: return "a mapping";
    default: return "nothing";
  }
}

std::string fmt_double(double v) {
  // The shortest of 10..17 significant digits that reads back as the same double: short for the
  // values people write (1e-3, 0.1), exact for computed defaults such as ln(1 / 0.07).
  std::string s;
  for (int digits = 10; digits <= 17; ++digits) {
    std::ostringstream os;
    os.precision(digits);
    os << v;
    s = os.str();
    if (std::strtod(s.c_str(), nullptr) == v) break;
  }
  return s;
}


}  // namespace

std::string closest_name(const std::string& given, const std::vector<std::string>& names) {
  // Levenshtein distance; a name within two edits reads as a typo of it.
  auto edit_distance = [](const std::string& a, const std::string& b) {
    std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= b.size(); ++j)
        cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    return prev[b.size()];
  };
  std::string best;
  size_t best_d = 3;
  for (const auto& n : names) {
    const size_t d = edit_distance(given, n);
    if (d < best_d) best_d = d, best = n;
  }
  return best;
}

Check<double> positive() {
  return [](const double& v) { return v > 0 ? "" : "must be > 0, got " + fmt_double(v); };
}
Check<double> non_negative() {
  return [](const double& v) { return v >= 0 ? "" : "must be >= 0, got " + fmt_double(v); };
}
Check<double> in_range(double lo, double hi) {
  return [lo, hi](const double& v) {
    return (v >= lo && v <= hi) ? ""
                                : "must be in [" + fmt_double(lo) + ", " + fmt_double(hi) + "], got " + fmt_double(v);
  };
}
Check<int64_t> at_least(int64_t lo) {
  return [lo](const int64_t& v) {
    return v >= lo ? "" : "must be >= " + std::to_string(lo) + ", got " + std::to_string(v);
  };
}
Check<std::string> one_of(std::vector<std::string> choices) {
  return [choices](const std::string& v) {
    if (std::find(choices.begin(), choices.end(), v) != choices.end()) return std::string();
    std::string list;
    for (const auto& c : choices) list += (list.empty() ? "" : ", ") + c;
    return "unknown value '" + v + "'; choose one of: " + list;
  };
}

ConfigReader::ConfigReader(const ConfigNode* node, std::string path, ConfigErrors& errors)
    : node_(node), path_(std::move(path)), errors_(errors) {}

void ConfigReader::finish(bool typed) {
  if (!node_ || !node_->is_map()) return;
  for (const auto& kv : node_->map) {
    if (std::find(used_.begin(), used_.end(), kv.first) != used_.end()) continue;
    if (typed && !kv.second.written_for_type.empty()) {
      stale_.push_back(kv.first);
      continue;
    }
    unknown_key(kv.first, kv.second);
  }
}

void ConfigReader::unknown_key(const std::string& key, const ConfigNode& node) {
  const std::string best = closest_name(key, used_);
  std::string msg = "unknown key '" + key + "'";
  if (key == "<<") msg += ": YAML merge keys ('<<: *anchor') are not supported; repeat the keys, or share them "
                          "with include: (a file of common keys)";
  else if (!best.empty()) msg += "; did you mean '" + best + "'?";
  else {
    std::string list;
    for (const auto& u : used_) list += (list.empty() ? "" : ", ") + u;
    msg += "; known keys here: " + list;
  }
  errors_.add(&node, path_.empty() ? key : path_ + "." + key, msg);
}

void ConfigReader::settle_stale(const std::string& key, const std::string& new_type,
                                const std::vector<std::string>& old_type_options) {
  const ConfigNode* n = node_ ? node_->find(key) : nullptr;
  if (!n) return;
  if (std::find(old_type_options.begin(), old_type_options.end(), key) == old_type_options.end())
    return unknown_key(key, *n);  // no type takes it: a typo, whichever layer retyped the section
  spdlog::info("{}: {} is an option of type '{}', which a later setting changed to '{}' (which has no such option); "
               "left out",
               n->where(), path_.empty() ? key : path_ + "." + key, n->written_for_type, new_type);
  if (defaults_) defaults_->erase(key);
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, bool& out) {
  if (n->kind == ConfigNode::Kind::Scalar) {
    const std::string& s = n->scalar;
    if (s == "true" || s == "True" || s == "yes" || s == "on") return void(out = true);
    if (s == "false" || s == "False" || s == "no" || s == "off") return void(out = false);
  }
  errors_.add(n, path, "expected true or false, got " + shown(n));
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, int64_t& out) {
  if (n->kind == ConfigNode::Kind::Scalar && !n->scalar.empty()) {
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(n->scalar.c_str(), &end, 10);
    if (errno == 0 && end && *end == '\0') return void(out = v);
    // Accept integral floats written as 1e4.
    double d = std::strtod(n->scalar.c_str(), &end);
    if (end && *end == '\0' && std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e18)
      return void(out = static_cast<int64_t>(d));
  }
  errors_.add(n, path, "expected an integer, got " + shown(n));
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, uint64_t& out) {
  int64_t v = 0;
  size_t before = errors_.messages().size();
  read_value(n, path, v);
  if (errors_.messages().size() != before) return;
  if (v < 0) return errors_.add(n, path, "expected a non-negative integer, got " + n->scalar);
  out = static_cast<uint64_t>(v);
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, int& out) {
  int64_t v = out;
  size_t before = errors_.messages().size();
  read_value(n, path, v);
  if (errors_.messages().size() != before) return;
  if (v < INT32_MIN || v > INT32_MAX) return errors_.add(n, path, "integer out of range: " + n->scalar);
  out = static_cast<int>(v);
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, double& out) {
  if (n->kind == ConfigNode::Kind::Scalar && !n->scalar.empty()) {
    char* end = nullptr;
    double v = std::strtod(n->scalar.c_str(), &end);
    if (end && *end == '\0' && std::isfinite(v)) return void(out = v);
  }
  errors_.add(n, path, "expected a finite number, got " + shown(n));
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, float& out) {
  double v = out;
  read_value(n, path, v);
  out = static_cast<float>(v);
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, std::string& out) {
  if (n->kind != ConfigNode::Kind::Scalar) return errors_.add(n, path, "expected a string");
  out = n->scalar;
}

void ConfigReader::read_value(const ConfigNode* n, const std::string& path, TypedSpec& out) {
  out.path = path;
  if (n->kind == ConfigNode::Kind::Scalar) {  // shorthand: `loss: infonce`
    out.type = n->scalar;
    out.type_node = *n;
    out.options = ConfigNode{};
    out.options.kind = ConfigNode::Kind::Map;
    return;
  }
  if (!n->is_map()) return errors_.add(n, path, "expected a mapping with a 'type:' key");
  out.options = *n;
  if (const ConfigNode* t = n->find("type")) {
    if (t->kind != ConfigNode::Kind::Scalar) return errors_.add(t, path + ".type", "expected a name");
    out.type = t->scalar;
    out.type_node = *t;
    out.options.erase("type");
  } else if (out.type.empty()) {
    errors_.add(n, path, "missing 'type:'");
  }
}

ConfigNode ConfigWriter::to_node(double v) { return ConfigNode::make_scalar(fmt_double(v)); }

ConfigNode ConfigWriter::to_node(const TypedSpec& v) {
  ConfigNode n = v.options;
  n.kind = ConfigNode::Kind::Map;
  n.map.insert(n.map.begin(), {"type", ConfigNode::make_scalar(v.type)});
  return n;
}

}  // namespace trialign
