// Typed, strict reading of a ConfigNode tree into plain config structs.
//
// A config struct lists its fields once, in a `fields` template that both reads and writes:
//
//   struct OptimConfig {
//     double lr = 5e-4;            // peak learning rate, e.g. 5e-4
//     template <class V> void fields(V& v) { v("lr", lr, positive()); }
//   };
//
// ConfigReader walks the tree: wrong types, failed checks and unknown keys (with a "did you
// mean" hint) are collected with their file:line and dotted path, and every problem in the file
// is reported at once by ConfigErrors::throw_if_any. ConfigWriter turns a struct back into a
// tree (the resolved config saved with a run).
#pragma once
#include <climits>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "core/config_tree.h"

namespace trialign {

class ConfigErrors {
 public:
  void add(const ConfigNode* where, const std::string& path, const std::string& message);
  bool empty() const { return messages_.empty(); }
  const std::vector<std::string>& messages() const { return messages_; }
  // Throws ConfigError listing every message (one per line), headed by `context`.
  void throw_if_any(const std::string& context) const;

 private:
  std::vector<std::string> messages_;
};

// A check returns "" when the value is fine, else what is wrong and what to do.
template <class T>
using Check = std::function<std::string(const T&)>;

Check<double> positive();
Check<double> non_negative();
Check<double> in_range(double lo, double hi);
Check<int64_t> at_least(int64_t lo);
Check<std::string> one_of(std::vector<std::string> choices);
// The name of `names` within two edits of `given` (the nearest), or "": for "did you mean".
std::string closest_name(const std::string& given, const std::vector<std::string>& names);

// A component chosen by `type:` whose remaining keys are its own options; read later by the
// component's registry entry (so a plugin's options are validated exactly like built-ins').
struct TypedSpec {
  TypedSpec(std::string t = "", ConfigNode o = {}, std::string p = "")
      : type(std::move(t)), options(std::move(o)), path(std::move(p)) {}
  std::string type;
  ConfigNode options;  // a map without the `type` key
  std::string path;    // dotted path of this section, for error messages
  ConfigNode type_node;  // where `type:` was written (file:line, or the --set that gave it)
};

template <class T, class = void>
struct has_fields : std::false_type {};

// A value as a config node (ConfigWriter::to_node, declared below): the defaults a reader records.
template <class T>
ConfigNode default_node(const T& value);
template <class T>
struct has_fields<T, std::void_t<decltype(std::declval<T&>().template fields<int>(std::declval<int&>()))>>
    : std::true_type {};

class ConfigReader {
 public:
  ConfigReader(const ConfigNode* node, std::string path, ConfigErrors& errors);

  template <class T>
  void operator()(const char* key, T& value, Check<T> check = {}) {
    const ConfigNode* child = node_ ? node_->find(key) : nullptr;
    used_.push_back(key);
    if (!child || child->is_null()) {
      if constexpr (std::is_same_v<T, TypedSpec>) value.path = join(key);
      else if constexpr (!std::is_same_v<T, ConfigNode>)
        if (defaults_) defaults_->child(key) = default_node(value);
      return;  // keep the default
    }
    read_value(child, join(key), value);
    if (check) {
      std::string msg = check(value);
      if (!msg.empty()) errors_.add(child, join(key), msg);
    }
  }
  // Int fields accept the double/int64 checks for convenience.
  void operator()(const char* key, int& value, Check<int64_t> check) {
    int64_t v = value;
    (*this)(key, v, Check<int64_t>([check](const int64_t& x) {
      if (x < INT32_MIN || x > INT32_MAX) return "integer out of range: " + std::to_string(x);
      return check ? check(x) : std::string();
    }));
    if (v >= INT32_MIN && v <= INT32_MAX) value = static_cast<int>(v);
  }
  void operator()(const char* key, float& value, Check<double> check) {
    double v = value;
    (*this)(key, v, std::move(check));
    value = static_cast<float>(v);
  }

  // Reports keys present in the node but never asked for. Call after the last field. `typed`
  // (a registry reading a `type:` component's options): keys a later layer's type change left
  // behind (ConfigNode::written_for_type) are not reported but listed in stale(), for the
  // registry to settle (settle_stale).
  void finish(bool typed = false);
  const std::vector<std::string>& stale() const { return stale_; }
  // A stale key: when `old_type_options` (what the type it was written for takes) has it, it is
  // dropped, logged and left out of the recorded defaults, so the resolved config does not carry
  // it; otherwise it is an unknown key like any other (a typo under the old type).
  void settle_stale(const std::string& key, const std::string& new_type, const std::vector<std::string>& old_type_options);
  // Every key asked for and absent gets its default written into `out` (a map), so that a
  // component's options can be saved complete (Registry::create_filling). Top level only.
  void record_defaults(ConfigNode* out) { defaults_ = out; }
  // The keys asked for so far (known keys; the others in the node are unknown).
  const std::vector<std::string>& asked() const { return used_; }
  ConfigErrors& errors() { return errors_; }
  const std::string& path() const { return path_; }

  void read_value(const ConfigNode* n, const std::string& path, bool& out);
  void read_value(const ConfigNode* n, const std::string& path, int& out);
  void read_value(const ConfigNode* n, const std::string& path, int64_t& out);
  void read_value(const ConfigNode* n, const std::string& path, uint64_t& out);
  void read_value(const ConfigNode* n, const std::string& path, double& out);
  void read_value(const ConfigNode* n, const std::string& path, float& out);
  void read_value(const ConfigNode* n, const std::string& path, std::string& out);
  void read_value(const ConfigNode* n, const std::string& path, TypedSpec& out);
  void read_value(const ConfigNode* n, const std::string& path, ConfigNode& out) { out = *n; }
  template <class T>
  void read_value(const ConfigNode* n, const std::string& path, std::vector<T>& out) {
    if (n->kind != ConfigNode::Kind::Sequence) {
      errors_.add(n, path, "expected a list, e.g. [1, 5, 10]");
      return;
    }
    out.clear();
    for (size_t i = 0; i < n->items.size(); ++i) {
      T v{};
      read_value(&n->items[i], path + "[" + std::to_string(i) + "]", v);
      out.push_back(v);
    }
  }
  template <class T, std::enable_if_t<has_fields<T>::value, int> = 0>
  void read_value(const ConfigNode* n, const std::string& path, T& out) {
    if (!n->is_map()) {
      errors_.add(n, path, "expected a mapping of keys to values");
      return;
    }
    ConfigReader sub(n, path, errors_);
    out.fields(sub);
    sub.finish();
  }

 private:
  std::string join(const char* key) const { return path_.empty() ? key : path_ + "." + key; }
  void unknown_key(const std::string& key, const ConfigNode& node);
  const ConfigNode* node_;
  std::string path_;
  ConfigErrors& errors_;
  std::vector<std::string> used_, stale_;
  ConfigNode* defaults_ = nullptr;
};

// Reads a whole struct from a root node (strict); collects errors.
template <class T>
void read_config(const ConfigNode& root, T& out, ConfigErrors& errors, const std::string& path = "") {
  ConfigReader r(&root, path, errors);
  out.fields(r);
  r.finish();
}

class ConfigWriter {
 public:
  explicit ConfigWriter(ConfigNode& out) : out_(out) { out_.kind = ConfigNode::Kind::Map; }
  template <class T, class C = int>
  void operator()(const char* key, const T& value, const C& = {}) {
    out_.child(key) = to_node(value);
  }

  static ConfigNode to_node(bool v) { return ConfigNode::make_scalar(v ? "true" : "false"); }
  static ConfigNode to_node(const std::string& v) { return ConfigNode::make_scalar(v); }
  static ConfigNode to_node(double v);
  static ConfigNode to_node(float v) { return to_node(static_cast<double>(v)); }
  static ConfigNode to_node(const ConfigNode& v) { return v; }
  static ConfigNode to_node(const TypedSpec& v);
  template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
  static ConfigNode to_node(T v) { return ConfigNode::make_scalar(std::to_string(v)); }
  template <class T>
  static ConfigNode to_node(const std::vector<T>& v) {
    ConfigNode n;
    n.kind = ConfigNode::Kind::Sequence;
    for (const auto& x : v) n.items.push_back(to_node(x));
    return n;
  }
  template <class T, std::enable_if_t<has_fields<T>::value, int> = 0>
  static ConfigNode to_node(const T& v) {
    ConfigNode n;
    ConfigWriter w(n);
    const_cast<T&>(v).fields(w);
    return n;
  }

 private:
  ConfigNode& out_;
};

template <class T>
ConfigNode default_node(const T& value) {
  return ConfigWriter::to_node(value);
}

}  // namespace trialign
