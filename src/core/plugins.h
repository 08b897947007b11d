// Out-of-tree components as shared libraries named in the config (`plugins: [lib/libmy_loss.so]`).
// A plugin links the installed trialign library, includes the headers of the API it extends
// (losses/preference.h, losses/loss.h, ...) and defines one registration function:
//
//   #include <trialign/core/plugins.h>
//   #include <trialign/losses/preference.h>
//   TRIALIGN_PLUGIN {
//     trialign::preference_losses().add("simpo", "SimPO: length-normalised, reference-free",
//                                       [](trialign::ConfigReader& r) { ... });
//   }
//
// Loading checks the API version the plugin was built against before anything of it runs, then
// calls the registration function; what it registers is used by `type:` name like a built-in,
// with its options validated the same way.
#pragma once
#include <string>
#include <vector>

#include "core/config_reader.h"

// Bumped whenever a header a plugin can include changes in a way that breaks built plugins.
#define TRIALIGN_PLUGIN_API_VERSION 1

#define TRIALIGN_PLUGIN                                                                 \
  extern "C" __attribute__((visibility("default"))) int trialign_plugin_api_version() { \
    return TRIALIGN_PLUGIN_API_VERSION;                                                 \
  }                                                                                     \
  extern "C" __attribute__((visibility("default"))) void trialign_plugin_register()

namespace trialign {

constexpr int kPluginApiVersion = TRIALIGN_PLUGIN_API_VERSION;

// Loads each library (once per process, by canonical path). Problems are ConfigErrors naming the
// config key (`plugins[i]`) and the path: a missing file, a library the loader refuses (its
// dlerror), no TRIALIGN_PLUGIN entry points, another API version (both named), or an exception
// thrown by the registration function.
void load_plugins(const std::vector<std::string>& paths, const ConfigNode* where, ConfigErrors& errors);

// Libraries loaded so far, in order.
std::vector<std::string> loaded_plugins();

}  // namespace trialign
