#include "trainers/preflight.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/errors.h"
#include "core/weight_files.h"
#include "losses/preference.h"
#include "models/vlm.h"
#include "trainers/pipeline.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

struct Problems {
  std::vector<std::string> lines;
  bool relative_missing = false;  // a relative path was not found: say where it was looked for

  // want: "file" or "folder".
  void path(const std::string& key, const std::string& p, const char* want, const std::string& hint) {
    if (p.empty()) return;
    std::error_code ec;
    const auto st = fs::status(p, ec);
    if (ec && ec != std::errc::no_such_file_or_directory) {
      lines.push_back(key + ": '" + p + "' cannot be read (" + ec.message() + ")");
    } else if (!fs::exists(st)) {
      lines.push_back(key + ": '" + p + "' does not exist; " + hint);
      relative_missing = relative_missing || fs::path(p).is_relative();
    } else if (std::string(want) == "file" && fs::is_directory(st)) {
      lines.push_back(key + ": '" + p + "' is a folder; " + hint);
    } else if (std::string(want) == "folder" && !fs::is_directory(st)) {
      lines.push_back(key + ": '" + p + "' is not a folder; " + hint);
    }
  }
};

// A checkpoint folder as given, or a run folder's newest checkpoint that has a MANIFEST.json,
// without reading checksums (resolve_checkpoint verifies every file, minutes for a large model;
// loading does that later). "" when there is none.
std::string newest_checkpoint_unverified(const std::string& path) {
  std::error_code ec;
  if (fs::exists(fs::path(path) / "MANIFEST.json", ec)) return path;
  std::vector<std::string> steps;
  for (const auto& e : fs::directory_iterator(fs::path(path) / "checkpoints", ec))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0 &&
        fs::exists(e.path() / "MANIFEST.json", ec))
      steps.push_back(e.path().string());
  return steps.empty() ? "" : *std::max_element(steps.begin(), steps.end());
}

// The trainer a trialign checkpoint was written by, from its MANIFEST.json.
std::string checkpoint_trainer(const std::string& dir) {
  try {
    return nlohmann::json::parse(read_text_file(dir + "/MANIFEST.json")).value("trainer", std::string());
  } catch (const std::exception&) {
    return "";  // loading names the damage
  }
}

void check_init_from(const RunConfig& cfg, Problems& out) {
  for (size_t k = 0; k < cfg.init_from.size(); ++k) {
    const auto& init = cfg.init_from[k];
    const std::string key = "init_from[" + std::to_string(k) + "]";
    if (init.checkpoint.empty()) continue;  // reported when the config was read
    std::error_code ec;
    if (!fs::exists(init.checkpoint, ec)) {
      out.lines.push_back(key + ".checkpoint: '" + init.checkpoint +
                          "' does not exist; run the stage that writes it first, or fix the path");
      out.relative_missing = out.relative_missing || fs::path(init.checkpoint).is_relative();
      continue;
    }
    if (is_hf_weights(init.checkpoint)) continue;  // its names and config.json are matched when the model loads
    const std::string dir = newest_checkpoint_unverified(init.checkpoint);
    if (dir.empty()) {
      out.lines.push_back(key + ".checkpoint: '" + init.checkpoint +
                          "' is neither a checkpoint folder nor a run folder with a checkpoint in it");
      continue;
    }
    const std::string trainer = checkpoint_trainer(dir);
    if (trainer.empty()) continue;
    for (const auto& c : components_lacking(trainer, init.components))
      out.lines.push_back(key + ".components: " + dir + " (trainer " + trainer + ") has no " + c + "; it holds " +
                          components_held(trainer));
  }
}

// Which rule of optim.param_groups decides `component` as a whole, from the rules alone: the
// first that names it, or -1 when none does. -2 when a glob or a rule on single parameters comes
// first: then only the parameter names decide, which the trainer checks when it builds the model.
int deciding_rule(const OptimConfig& optim, const std::string& component) {
  for (size_t i = 0; i < optim.param_groups.size(); ++i) {
    const auto& m = optim.param_groups[i].match;
    if (m == component) return static_cast<int>(i);
    if (m.find_first_of("*?[") != std::string::npos || m.rfind(component + ".", 0) == 0) return -2;
  }
  return -1;
}

void check_combinations(const RunConfig& cfg, Problems& out) {
  if (cfg.trainer == "adapter")
    for (const std::string c : {"vision_model", "language_model"}) {
      const int rule = deciding_rule(cfg.optim, c);
      if (rule == -1)
        out.lines.push_back("optim.param_groups: trainer adapter trains the projector alone, but no rule freezes " + c +
                            "; add {match: " + c + ", freeze: true}, or use trainer: finetune");
      else if (rule >= 0 && !cfg.optim.param_groups[static_cast<size_t>(rule)].freeze)
        out.lines.push_back("optim.param_groups[" + std::to_string(rule) +
                            "]: trainer adapter trains the projector alone, but this rule names " + c +
                            " without freezing it; set freeze: true there, or use trainer: finetune");
    }
  if (cfg.trainer != "preference") {
    // Keys only the preference trainer reads: elsewhere they would be taken and ignored. Checked
    // here, before a run, not when a config loads, so checkpoints whose configs carry them can
    // still be evaluated and exported.
    const std::string only = ": read by the preference trainer only (trainer: preference); this config runs the " +
                             cfg.trainer + " trainer, so remove it";
    if (!cfg.rewards.empty()) out.lines.push_back("rewards" + only);
    if (cfg.preference.cache_reference) out.lines.push_back("preference.cache_reference" + only);
    if (cfg.eval.samples > 0) out.lines.push_back("eval.samples" + only);
    return;
  }
  const auto loss = preference_losses().create_or_throw(cfg.loss);
  const CompletionSampling* sampling = loss->sampling();
  if (cfg.eval.samples > 0 && !sampling)
    out.lines.push_back("eval.samples: loss '" + cfg.loss.type +
                        "' scores given pairs and draws no completions; only a sampling loss (grpo) uses it, so "
                        "remove the key");
  // Without a reference model there is nothing to cache, which the trainer only logs.
  const bool cache = cfg.preference.cache_reference && loss->needs_reference();
  if (cache && sampling)
    out.lines.push_back("preference.cache_reference: loss '" + cfg.loss.type +
                        "' samples new completions every step; there is nothing fixed to cache");
  if (cache && cfg.data.augment.random_resized_crop)
    out.lines.push_back("preference.cache_reference: data.augment.random_resized_crop changes the images every "
                        "epoch, so cached reference log-probs would not match them; turn one of them off");
}

Problems find_problems(const RunConfig& cfg, const PreflightScope& scope) {
  Problems out;
  if (scope.files && !cfg.bench.card) {
    // Only what this trainer reads: stage 1 evaluates data.val; stages 2-3 evaluate eval.sets,
    // or data.val without them; the preference trainer both (pairs or prompts, and conversations).
    const std::string manifest = "point it at a JSON or JSONL manifest";
    out.path("data.train", cfg.data.train, "file", manifest);
    const bool reads_sets = cfg.is_vlm(), reads_val = !cfg.is_vlm() || cfg.trainer == "preference" || cfg.eval.sets.empty();
    if (reads_val) out.path("data.val", cfg.data.val, "file", manifest);
    if (reads_sets) {
      for (size_t i = 0; i < cfg.eval.sets.size(); ++i)
        out.path("eval.sets[" + std::to_string(i) + "].data", cfg.eval.sets[i].data, "file", manifest);
      out.path("eval.object_vocabulary", cfg.eval.object_vocabulary, "file",
               "point it at a JSON object vocabulary (docs/user-guide.md)");
    }
    out.path("data.tokenizer", cfg.data.tokenizer, "file",
             "point it at a sentencepiece .model file (`trialign tokenizer train` makes one)");
    out.path("data.image_root", cfg.data.image_root, "folder",
             "the folder the records' image paths are relative to (empty = each manifest's own folder)");
  }
  if (scope.init_from) check_init_from(cfg, out);
  check_combinations(cfg, out);
  return out;
}

std::string relative_note(bool relative_missing) {
  return relative_missing ? " (relative paths are read from the working directory " + fs::current_path().string() + ")"
                          : "";
}

}  // namespace

std::vector<std::string> components_lacking(const std::string& trainer, const std::vector<std::string>& wanted) {
  const auto has = model_components(trainer != "contrastive");
  std::vector<std::string> lacking;
  for (const auto& c : wanted)
    if (std::find(has.begin(), has.end(), c) == has.end()) lacking.push_back(c);
  return lacking;
}

std::string components_held(const std::string& trainer) {
  std::string list;
  for (const auto& h : model_components(trainer != "contrastive")) list += (list.empty() ? "" : ", ") + h;
  return list;
}

void check_preflight(const RunConfig& cfg, const PreflightScope& scope) {
  const Problems found = find_problems(cfg, scope);
  if (found.lines.empty()) return;
  std::string msg = cfg.source + ": " + std::to_string(found.lines.size()) + " problem(s) before training" +
                    relative_note(found.relative_missing) + ":";
  for (const auto& p : found.lines) msg += "\n  " + p;
  throw ConfigError(msg);
}

void check_before_training(const RunConfig& cfg, const std::string& resume) {
  const bool fresh = resume.empty() || (resume == "auto" && !has_checkpoints(cfg.run.out_dir));
  check_preflight(cfg, {/*files=*/true, /*init_from=*/fresh});
}

void check_pipeline_preflight(const PipelinePlan& plan) {
  const auto& p = plan.pipeline;
  std::string problems;
  bool relative_missing = false;
  for (size_t i = 0; i < p.stages.size(); ++i) {
    if (fs::exists(fs::path(plan.stages[i].run.out_dir) / "stage_done.json")) continue;  // finished stages only skip
    const Problems found = find_problems(plan.stages[i], {/*files=*/true, /*init_from=*/false});
    for (const auto& q : found.lines) problems += "\n  stage " + p.stages[i].name + " (" + p.stages[i].config + "): " + q;
    relative_missing = relative_missing || found.relative_missing;
  }
  if (!problems.empty())
    throw ConfigError("pipeline " + p.name + ": problems before training" + relative_note(relative_missing) + ":" +
                      problems);
}

}  // namespace trialign
