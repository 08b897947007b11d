// Named component registries: models, losses, datasets, schedulers, later reward functions.
// A config names a component by `type:`; registration is one line next to the component:
//
//   TRIALIGN_REGISTER(LossRegistry, "infonce", "CLIP InfoNCE, learnable temperature", make_infonce);
//
// The factory receives a ConfigReader over the component's own options, so unknown or badly
// typed options get the same file:line error as every other key. Plugins loaded at run time
// register the same way (the framework is a shared library, so there is one registry).
#pragma once
#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/config_reader.h"
#include "core/errors.h"

namespace trialign {

// The plugin whose registration function is running ("" outside one): registries record it as
// the origin of what is registered (core/plugins.h).
const std::string& registering_plugin();

template <class Base, class... Args>
class Registry {
 public:
  using Factory = std::function<std::shared_ptr<Base>(ConfigReader& options, Args... args)>;
  struct Entry {
    std::string help;
    Factory make;
    std::string origin;  // the plugin library that registered it; "" for a built-in
  };

  explicit Registry(std::string kind) : kind_(std::move(kind)) {}

  void add(const std::string& name, std::string help, Factory make) {
    std::lock_guard<std::mutex> lock(mu_);
    if (entries_.count(name))
      throw ConfigError("duplicate " + kind_ + " name '" + name +
                        "': another component (built-in or plugin) already registered it; rename one");
    entries_[name] = Entry{std::move(help), std::move(make), registering_plugin()};
  }

  // The plugin library a name came from, "" for a built-in or an unknown name.
  std::string origin(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(name);
    return it == entries_.end() ? std::string() : it->second.origin;
  }

  bool contains(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mu_);
    return entries_.count(name) > 0;
  }

  std::vector<std::string> names() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (const auto& kv : entries_) out.push_back(kv.first);
    return out;
  }

  std::string help(const std::string& name) const {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(name);
    return it == entries_.end() ? std::string() : it->second.help;
  }

  // Builds the component; problems with the type or its options go to `errors` (nullptr result).
  std::shared_ptr<Base> create(const TypedSpec& spec, ConfigErrors& errors, Args... args) const {
    return create_recording(spec, errors, nullptr, args...);
  }

  // create, and on success the spec's options gain every option the factory asked for with its
  // default value: the resolved config a run saves names each value it ran with, so a later
  // version's other default is seen as a change on resume.
  std::shared_ptr<Base> create_filling(TypedSpec& spec, ConfigErrors& errors, Args... args) const {
    ConfigNode filled = spec.options;
    filled.kind = ConfigNode::Kind::Map;
    auto made = create_recording(spec, errors, &filled, args...);
    if (made) spec.options = std::move(filled);
    return made;
  }

  // Throwing form: every problem at once, as a ConfigError.
  std::shared_ptr<Base> create_or_throw(const TypedSpec& spec, Args... args) const {
    ConfigErrors errors;
    auto made = create(spec, errors, args...);
    errors.throw_if_any("cannot build " + kind_ + " '" + spec.type + "'");
    return made;
  }

  const std::string& kind() const { return kind_; }

 private:
  std::shared_ptr<Base> create_recording(const TypedSpec& spec, ConfigErrors& errors, ConfigNode* defaults,
                                         Args... args) const {
    Factory make;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = entries_.find(spec.type);
      if (it == entries_.end()) {
        std::string list;
        for (const auto& kv : entries_) list += (list.empty() ? "" : ", ") + kv.first;
        const ConfigNode* where = !spec.type_node.file.empty() ? &spec.type_node
                                  : spec.options.file.empty()    ? nullptr
                                                                 : &spec.options;
        errors.add(where, spec.path + ".type", "unknown " + kind_ + " type '" + spec.type + "'; registered: " + list);
        return nullptr;
      }
      make = it->second.make;
    }
    ConfigReader reader(&spec.options, spec.path, errors);
    reader.record_defaults(defaults);
    std::shared_ptr<Base> made;
    try {
      made = make(reader, args...);
    } catch (const std::exception& e) {  // a factory's own validation, or a LibTorch check
      // Its problem spans the section: named by a --set that changed it, if one did (the
      // section's own line would point into a file the user did not edit), else the section.
      const ConfigNode* where = &spec.options;
      if (spec.type_node.file.rfind("--set", 0) == 0) where = &spec.type_node;
      for (const auto& [key, child] : spec.options.map)
        if (child.file.rfind("--set", 0) == 0) where = &child;
      errors.add(where, spec.path, e.what());
      return nullptr;
    }
    reader.finish(/*typed=*/true);
    for (const auto& key : reader.stale())
      reader.settle_stale(key, spec.type, options_of(spec.options.find(key)->written_for_type, args...));
    return errors.empty() ? made : nullptr;
  }

  // The options a type's factory asks for (read with none given), for telling an option a type
  // change left behind from a typo. Empty for an unknown type.
  std::vector<std::string> options_of(const std::string& type, Args... args) const {
    Factory make;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = entries_.find(type);
      if (it == entries_.end()) return {};
      make = it->second.make;
    }
    ConfigNode none;
    none.kind = ConfigNode::Kind::Map;
    ConfigErrors ignored;
    ConfigReader reader(&none, "", ignored);
    try {
      make(reader, args...);
    } catch (const std::exception&) {  // its defaults may not build alone; what it asked is what counts
    }
    return reader.asked();
  }

  std::string kind_;
  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_;
};

// Static registration helper: a namespace-scope object whose constructor registers.
template <class R>
struct Registration {
  Registration(R& registry, const std::string& name, std::string help, typename R::Factory make) {
    registry.add(name, std::move(help), std::move(make));
  }
};

#define TRIALIGN_CONCAT_INNER(a, b) a##b
#define TRIALIGN_CONCAT(a, b) TRIALIGN_CONCAT_INNER(a, b)
#define TRIALIGN_REGISTER(registry_expr, name, help, factory)                              \
  static ::trialign::Registration<std::decay_t<decltype(registry_expr)>> TRIALIGN_CONCAT( \
      trialign_registration_, __LINE__)(registry_expr, name, help, factory)

}  // namespace trialign
