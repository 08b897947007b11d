#include "trainers/preflight.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/errors.h"
#include "core/logging.h"
#include "core/weight_files.h"
#include "losses/preference.h"
#include "models/vlm.h"
#include "trainers/pipeline.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

std::string join_names(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Relative paths are read against the working directory, which is what a user moving between
// folders gets wrong; the message says which one it was.
std::string relative_note(const std::string& path) {
  return fs::path(path).is_relative() ? " (read relative to the working directory " + fs::current_path().string() + ")"
                                      : "";
}

// want: "file" or "folder".
void check_path(std::vector<std::string>& out, const std::string& key, const std::string& path, const char* want,
                const std::string& hint) {
  if (path.empty()) return;
  std::error_code ec;
  const bool folder = fs::is_directory(path, ec);
  if (!fs::exists(path, ec)) {
    out.push_back(key + ": '" + path + "' does not exist" + relative_note(path) + "; " + hint);
  } else if (std::string(want) == "file" && folder) {
    out.push_back(key + ": '" + path + "' is a folder; " + hint);
  } else if (std::string(want) == "folder" && !folder) {
    out.push_back(key + ": '" + path + "' is not a folder; " + hint);
  }
}

// The trainer a trialign checkpoint was written by, from its MANIFEST.json (no checksums read).
std::string checkpoint_trainer(const std::string& dir) {
  try {
    return nlohmann::json::parse(read_text_file(dir + "/MANIFEST.json")).value("trainer", std::string());
  } catch (const std::exception&) {
    return "";  // resolve_checkpoint accepted it; the full check at load time names the damage
  }
}

void check_init_from(const RunConfig& cfg, std::vector<std::string>& out) {
  for (size_t k = 0; k < cfg.init_from.size(); ++k) {
    const auto& init = cfg.init_from[k];
    const std::string key = "init_from[" + std::to_string(k) + "].checkpoint";
    if (init.checkpoint.empty()) continue;  // reported when the config was read
    std::error_code ec;
    if (is_hf_weights(init.checkpoint)) {
      if (!fs::exists(init.checkpoint, ec))
        out.push_back(key + ": '" + init.checkpoint + "' does not exist" + relative_note(init.checkpoint));
      continue;  // names and config.json are compared with the model when it loads
    }
    std::string dir;
    try {
      dir = resolve_checkpoint(init.checkpoint);
    } catch (const DataError& e) {
      out.push_back(key + ": " + e.what() + relative_note(init.checkpoint) +
                    "; run the stage that writes it first, or fix the path");
      continue;
    }
    const std::string trainer = checkpoint_trainer(dir);
    if (trainer.empty()) continue;
    const auto has = model_components(trainer != "contrastive");
    for (const auto& c : init.components)
      if (std::find(has.begin(), has.end(), c) == has.end())
        out.push_back("init_from[" + std::to_string(k) + "].components: " + dir + " (trainer " + trainer + ") has no " +
                      c + "; it holds " + join_names(has));
  }
}

// Whether optim.param_groups leaves every parameter of `component` trainable, decided from the
// rules alone: true only when no rule can touch the component except one naming it whole
// without freezing it. Globs and rules on single parameters leave it to the check at train
// start, which sees the parameter names.
bool surely_trainable(const OptimConfig& optim, const std::string& component) {
  for (const auto& r : optim.param_groups) {
    if (r.match == component) return !r.freeze;
    const bool glob = r.match.find_first_of("*?[") != std::string::npos;
    if (glob || r.match.rfind(component + ".", 0) == 0) return false;
  }
  return true;
}

void check_combinations(const RunConfig& cfg, std::vector<std::string>& out) {
  if (cfg.trainer == "adapter")
    for (const std::string c : {"vision_model", "language_model"})
      if (surely_trainable(cfg.optim, c))
        out.push_back("optim.param_groups: trainer adapter trains the projector alone, but nothing freezes " + c +
                      "; add {match: " + c + ", freeze: true}, or use trainer: finetune");
  if (cfg.trainer != "preference") return;
  const auto loss = preference_losses().create_or_throw(cfg.loss);
  const CompletionSampling* sampling = loss->sampling();
  if (cfg.eval.samples > 0 && !sampling)
    out.push_back("eval.samples: loss '" + cfg.loss.type +
                  "' scores given pairs and draws no completions; only a sampling loss (grpo) uses it, so remove the key");
  // Without a reference model there is nothing to cache, which the trainer only logs.
  const bool cache = cfg.preference.cache_reference && loss->needs_reference();
  if (cache && sampling)
    out.push_back("preference.cache_reference: loss '" + cfg.loss.type +
                  "' samples new completions every step; there is nothing fixed to cache");
  if (cache && cfg.data.augment.random_resized_crop)
    out.push_back("preference.cache_reference: data.augment.random_resized_crop changes the images every epoch, so "
                  "cached reference log-probs would not match them; turn one of them off");
}

}  // namespace

std::vector<std::string> preflight_problems(const RunConfig& cfg, const PreflightScope& scope) {
  std::vector<std::string> out;
  if (scope.files && !cfg.bench.card) {
    const std::string manifest = "point it at a JSON or JSONL manifest (`trialign data shapes` writes the demo's)";
    check_path(out, "data.train", cfg.data.train, "file", manifest);
    check_path(out, "data.val", cfg.data.val, "file", manifest);
    for (size_t i = 0; i < cfg.eval.sets.size(); ++i)
      check_path(out, "eval.sets[" + std::to_string(i) + "].data", cfg.eval.sets[i].data, "file", manifest);
    check_path(out, "data.tokenizer", cfg.data.tokenizer, "file",
               "point it at a sentencepiece .model file (`trialign tokenizer train` makes one)");
    check_path(out, "data.image_root", cfg.data.image_root, "folder",
               "the folder the records' image paths are relative to (empty = each manifest's own folder)");
    check_path(out, "eval.object_vocabulary", cfg.eval.object_vocabulary, "file",
               "a JSON object vocabulary for CHAIR (docs/user-guide.md)");
  }
  if (scope.init_from) check_init_from(cfg, out);
  check_combinations(cfg, out);
  return out;
}

void check_preflight(const RunConfig& cfg, const PreflightScope& scope) {
  const auto problems = preflight_problems(cfg, scope);
  if (problems.empty()) return;
  std::string msg = cfg.source + ": " + std::to_string(problems.size()) + " problem(s) before training:";
  for (const auto& p : problems) msg += "\n  " + p;
  throw ConfigError(msg);
}

void check_pipeline_preflight(const PipelinePlan& plan) {
  const auto& p = plan.pipeline;
  std::string problems;
  for (size_t i = 0; i < p.stages.size(); ++i)
    if (!fs::exists(fs::path(plan.stages[i].run.out_dir) / "stage_done.json"))  // finished stages only skip
      for (const auto& q : preflight_problems(plan.stages[i], {/*files=*/true, /*init_from=*/false}))
        problems += "\n  stage " + p.stages[i].name + " (" + p.stages[i].config + "): " + q;
  if (!problems.empty()) throw ConfigError("pipeline " + p.name + ": problems before training:" + problems);
}

}  // namespace trialign
