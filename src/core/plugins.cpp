#include "core/plugins.h"

#include <dlfcn.h>

#include <algorithm>
#include <filesystem>
#include <mutex>

#include "core/registry.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

std::mutex& plugins_mutex() {
  static std::mutex m;
  return m;
}
std::vector<std::string>& loaded() {
  static std::vector<std::string> v;
  return v;
}
std::string& current() {
  static std::string c;
  return c;
}

}  // namespace

const std::string& registering_plugin() { return current(); }

std::vector<std::string> loaded_plugins() {
  std::lock_guard<std::mutex> lock(plugins_mutex());
  return loaded();
}

void load_plugins(const std::vector<std::string>& paths, const ConfigNode* where, ConfigErrors& errors) {
  std::lock_guard<std::mutex> lock(plugins_mutex());
  for (size_t i = 0; i < paths.size(); ++i) {
    const std::string key = "plugins[" + std::to_string(i) + "]";
    std::error_code ec;
    if (!fs::is_regular_file(paths[i], ec)) {
      errors.add(where, key, "plugin '" + paths[i] + "' does not exist (paths are relative to the current directory)");
      continue;
    }
    const std::string path = fs::canonical(paths[i], ec).string();
    if (std::find(loaded().begin(), loaded().end(), path) != loaded().end()) continue;
    // RTLD_LOCAL: plugins do not see each other's symbols; they share the framework library.
    void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      const char* e = ::dlerror();
      errors.add(where, key, "cannot load plugin '" + path + "': " + (e ? e : "unknown error"));
      continue;
    }
    using VersionFn = int (*)();
    using RegisterFn = void (*)();
    auto version = reinterpret_cast<VersionFn>(::dlsym(handle, "trialign_plugin_api_version"));
    auto reg = reinterpret_cast<RegisterFn>(::dlsym(handle, "trialign_plugin_register"));
    if (!version || !reg) {
      errors.add(where, key, "'" + path + "' is not a trialign plugin: it defines no TRIALIGN_PLUGIN block");
      ::dlclose(handle);
      continue;
    }
    const int v = version();
    if (v != kPluginApiVersion) {
      errors.add(where, key,
                 "plugin '" + path + "' was built against plugin API version " + std::to_string(v) +
                     ", this trialign has version " + std::to_string(kPluginApiVersion) +
                     "; rebuild the plugin against this trialign's installed package");
      ::dlclose(handle);
      continue;
    }
    current() = path;
    try {
      reg();
    } catch (const std::exception& e) {
      errors.add(where, key, "plugin '" + path + "' failed to register: " + e.what());
    }
    current().clear();
    loaded().push_back(path);  // kept loaded: what it registered points into it
  }
}

}  // namespace trialign
