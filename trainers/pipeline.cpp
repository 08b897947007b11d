#include "trainers/pipeline.h"

#include <spdlog/spdlog.h>

#include <filesystem>
#include <sstream>

#include "core/checkpoint.h"
#include "core/config_tree.h"
#include "core/errors.h"
#include "core/logging.h"
#include "models/vlm.h"
#include "trainers/contrastive.h"
#include "trainers/preference.h"
#include "trainers/preflight.h"
#include "trainers/vlm.h"
#include "core/json_text.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

// {a.b: v} sets a -> b to v, keeping v's file:line for error messages.
// The scalar at run.<key>, "" when there is none.
std::string run_value(const ConfigNode& root, const std::string& key) {
  const ConfigNode* run = root.find("run");
  const ConfigNode* n = run ? run->find(key) : nullptr;
  return n && n->kind == ConfigNode::Kind::Scalar ? n->scalar : std::string();
}

// run.out_dir and run.name are the pipeline's to choose (each stage trains in OUT_DIR/NAME, and
// the next stage's init_from points there). A set that changes either, however it is spelled
// (dotted, nested, a flow map in --set), would be overwritten without a word: refused, naming it.
// `own`: the stage config as read. `where`: the set's source when its value carries no location
// of its own ("--set ..."); "" = the value's file:line.
void refuse_stage_folder_change(const ConfigNode& root, const ConfigNode& own, const std::string& where) {
  for (const std::string key : {"out_dir", "name"}) {
    if (run_value(root, key) == run_value(own, key)) continue;
    const ConfigNode* run = root.find("run");
    const ConfigNode* n = run ? run->find(key) : nullptr;
    throw ConfigError((!where.empty() ? where : n ? n->where() : std::string("set")) + ": set run." + key +
                      ": a pipeline stage trains in the pipeline's out_dir/<stage name>, which later stages and the "
                      "report read; set the pipeline's out_dir (or the stage's name) instead");
  }
}

void apply_sets(ConfigNode& root, const ConfigNode& sets, const std::string& where) {
  if (sets.is_null()) return;
  if (!sets.is_map()) throw ConfigError(where + ": 'set' must map dotted keys to values, e.g. {train.steps: 300}");
  for (const auto& [key, value] : sets.map) {
    ConfigNode* node = &root;
    std::stringstream ks(key);
    std::string part;
    while (std::getline(ks, part, '.')) {
      if (!node->is_map() && !node->is_null())
        throw ConfigError(value.where() + ": set " + key + ": '" + part + "' is inside a value that is not a mapping");
      if (part == "type" && ks.peek() == std::char_traits<char>::eof() && value.kind == ConfigNode::Kind::Scalar)
        mark_retyped(*node, value.scalar);  // {loss.type: dpo}: the stage config's loss options were for its type
      node = &node->child(part);
    }
    if (node->is_map() && value.is_map()) merge_config(*node, value);
    else *node = value;
  }
}

std::string stage_dir(const PipelineConfig& p, const std::string& stage) { return (fs::path(p.out_dir) / stage).string(); }

}  // namespace

TrainResult train_any(const RunConfig& cfg, const TrainOptions& opt) {
  if (cfg.bench.card)
    throw ConfigError(cfg.source + ": bench.card is true: a bench card has no data to train on; run `trialign bench " +
                      cfg.source + "`, or set data.train / data.tokenizer and drop bench.card");
  if (cfg.trainer == "preference") return train_preference(cfg, opt);
  return cfg.is_vlm() ? train_vlm(cfg, opt) : train_contrastive(cfg, opt);
}

PipelinePlan load_pipeline(const std::string& path, const std::vector<std::string>& overrides) {
  PipelinePlan plan;
  const ConfigNode tree = load_config_file(path);
  ConfigErrors errors;
  read_config(tree, plan.pipeline, errors);
  errors.throw_if_any("invalid pipeline " + path);
  const auto& p = plan.pipeline;
  if (p.stages.empty()) throw ConfigError(path + ": 'stages' is empty; list at least one {name, config}");
  std::vector<std::string> seen;
  for (size_t i = 0; i < p.stages.size(); ++i) {
    const auto& s = p.stages[i];
    const std::string key = path + ": stages[" + std::to_string(i) + "]";
    if (s.name.empty() || s.config.empty()) throw ConfigError(key + ": each stage needs a name and a config");
    // The name is the stage's folder under out_dir: one plain folder name, and not the report's.
    const bool plain = s.name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") ==
                           std::string::npos &&
                       s.name.front() != '.';
    if (!plain || s.name == "report")
      throw ConfigError(key + ".name: '" + s.name + "' is the stage's folder under out_dir, so it must be letters, digits, " +
                        "'_', '-' or '.' (not first), and not 'report' (the report's plots go there); rename the stage");
    if (std::find(seen.begin(), seen.end(), s.name) != seen.end())
      throw ConfigError(key + ": stage name '" + s.name + "' is used twice");
    for (size_t k = 0; k < s.init_from.size(); ++k) {
      const auto& init = s.init_from[k];
      const std::string ik = key + ".init_from[" + std::to_string(k) + "]";
      const auto from = std::find(seen.begin(), seen.end(), init.stage);
      if (from == seen.end()) throw ConfigError(ik + ".stage: '" + init.stage + "' is not an earlier stage");
      if (init.components.empty()) throw ConfigError(ik + ".components: missing, e.g. [vision_model]");
      // A component the earlier stage's model does not have would only fail when this stage
      // starts, after the earlier one has trained: checked here, before any training.
      const RunConfig& upstream = plan.stages[static_cast<size_t>(from - seen.begin())];
      const auto lacking = components_lacking(upstream.trainer, init.components);
      if (!lacking.empty())
        throw ConfigError(ik + ".components: stage '" + init.stage + "' (trainer " + upstream.trainer + ") has no " +
                          lacking.front() + "; its checkpoints hold " + components_held(upstream.trainer));
    }
    seen.push_back(s.name);
    if (!fs::exists(s.config)) throw ConfigError(key + ".config: '" + s.config + "' does not exist");
    ConfigNode run = load_config_file(s.config);
    const ConfigNode own = run;  // its run.out_dir and run.name are replaced below
    apply_sets(run, p.set, path);
    refuse_stage_folder_change(run, own, "");
    apply_sets(run, s.set, path);
    refuse_stage_folder_change(run, own, "");
    for (const auto& o : overrides) {
      apply_override(run, o);
      refuse_stage_folder_change(run, own, "--set " + o);
    }
    run.child("run").child("out_dir") = ConfigNode::make_scalar(stage_dir(p, s.name));
    run.child("run").child("name") = ConfigNode::make_scalar(s.name);
    if (!s.init_from.empty()) {
      // Checkpoints are filled in when the earlier stages have finished.
      ConfigNode list;
      list.kind = ConfigNode::Kind::Sequence;
      for (const auto& init : s.init_from) {
        ConfigNode entry;
        entry.child("checkpoint") = ConfigNode::make_scalar(stage_dir(p, init.stage));
        auto& comps = entry.child("components");
        comps.kind = ConfigNode::Kind::Sequence;
        for (const auto& c : init.components) comps.items.push_back(ConfigNode::make_scalar(c));
        list.items.push_back(entry);
      }
      run.child("init_from") = list;
    }
    plan.stages.push_back(run_config_from_tree(run, s.config + " (stage " + s.name + " of " + path + ")"));
  }
  return plan;
}

PipelineResult run_pipeline(const PipelinePlan& plan, const TrainOptions& opt) {
  const auto& p = plan.pipeline;
  PipelineResult result;
  // Rank 0 holds the pipeline folder from the first stage to pipeline.json (each stage's trainer
  // also locks its own folder, but only while it trains).
  RunFolderLock lock;
  if (rank() == 0) {
    std::error_code ec;
    fs::create_directories(p.out_dir, ec);
    lock = RunFolderLock::acquire(p.out_dir, RunFolderLock::Kind::Pipeline);
  }
  check_pipeline_preflight(plan);
  std::map<std::string, std::string> final_checkpoint;
  for (size_t i = 0; i < p.stages.size(); ++i) {
    const auto& stage = p.stages[i];
    RunConfig cfg = plan.stages[i];
    for (size_t k = 0; k < stage.init_from.size(); ++k)
      cfg.init_from[k].checkpoint = final_checkpoint.at(stage.init_from[k].stage);
    const std::string dir = cfg.run.out_dir;
    const std::string done_file = (fs::path(dir) / "stage_done.json").string();
    // Fingerprints of the checkpoints this stage starts from: a finished stage is only reused
    // if it was trained from the very same upstream weights. `upstream_weights` is each
    // model.safetensors' CRC-32; `upstream` (the whole MANIFEST's, still written for older
    // binaries) also covers the optimizer state, whose optimizer.pt differed between runs that
    // ended with identical weights (LibTorch keys it by tensor address), so a deleted and
    // retrained upstream stage forced every later stage to train again.
    nlohmann::json upstream = nlohmann::json::array(), upstream_weights = nlohmann::json::array();
    for (const auto& init : cfg.init_from) {
      upstream.push_back(crc32_file(init.checkpoint + "/MANIFEST.json"));
      upstream_weights.push_back(model_weights_crc(init.checkpoint));
    }
    nlohmann::json entry;
    if (fs::exists(done_file)) {
      nlohmann::json done;
      try {
        done = nlohmann::json::parse(read_text_file(done_file));
      } catch (const nlohmann::json::exception& e) {
        throw DataError(done_file + ": unreadable (" + e.what() + "); delete it to redo stage " + stage.name);
      }
      // Where the upstream checkpoints lie may differ from when the stage finished (a pipeline
      // folder copied or moved): that they hold the same weights is checked by their CRCs below.
      RunConfig compared = cfg;
      try {
        const RunConfig before =
            run_config_from_tree(parse_config_string(done.value("config", std::string()), done_file), done_file);
        if (before.init_from.size() == compared.init_from.size())
          for (size_t k = 0; k < compared.init_from.size(); ++k)
            compared.init_from[k].checkpoint = before.init_from[k].checkpoint;
      } catch (const std::exception&) {  // not a readable config: compared as text below
      }
      const auto diff = diff_for_resume(done.value("config", std::string()), resolved_yaml(compared));
      const bool steps_changed =
          std::find(diff.safe.begin(), diff.safe.end(), "train.steps") != diff.safe.end();
      if (!diff.unsafe.empty() || !diff.learning_rate.empty() || steps_changed) {
        std::string keys;
        for (const auto& k : diff.unsafe) keys += "\n  " + k;
        for (const auto& k : diff.learning_rate) keys += "\n  " + k;
        if (steps_changed) keys += "\n  train.steps";
        throw ConfigError("pipeline " + p.name + ": stage " + stage.name + " finished with another config; changed:" +
                          keys + "\nrestore them, or remove " + dir + " to train the stage again");
      }
      const bool same_upstream = done.contains("upstream_weights")
                                     ? done["upstream_weights"] == upstream_weights
                                     : done.value("upstream", nlohmann::json::array()) == upstream;  // older stage_done.json
      if (!same_upstream)
        throw ConfigError("pipeline " + p.name + ": stage " + stage.name +
                          " was trained from other checkpoints of its init_from stages than the current ones; remove " +
                          dir + " to train it again from them");
      // The stage's own copy of its final checkpoint first: the recorded path is where the stage
      // was trained, which a copied pipeline folder does not change.
      std::string ck = done.value("checkpoint", std::string());
      const fs::path own = fs::path(dir) / "checkpoints" / fs::path(ck).filename();
      std::error_code ec;
      if (!ck.empty() && fs::exists(own / "MANIFEST.json", ec)) ck = own.string();
      if (fs::exists(ck)) {
        init_logging("", rank());
        spdlog::info("pipeline {}: stage {} ({}/{}) is complete ({}); skipping", p.name, stage.name, i + 1,
                     p.stages.size(), ck);
        // Its recorded results are those of the evaluation settings it ran with. (eval.batch_size
        // changes how records are batched, not what is scored.)
        std::string eval_keys;
        for (const auto& k : diff.safe)
          if ((k.rfind("eval.", 0) == 0 && k != "eval.batch_size") || k == "data.val" || k == "data.val_limit")
            eval_keys += " " + k;
        if (!eval_keys.empty())
          spdlog::warn("pipeline {}: stage {} finished with other evaluation settings ({}); the results below are "
                       "those it recorded then; to score it on other data, run trialign eval {} --data MANIFEST",
                       p.name, stage.name, eval_keys.substr(1), ck);
        final_checkpoint[stage.name] = ck;
        entry = {{"checkpoint", ck}, {"eval", done.value("eval", nlohmann::json())}, {"skipped", true}};
        result.stages[stage.name] = entry;
        continue;
      }
    }
    init_logging("", rank());
    // A stage in progress continues from its own checkpoint, whatever its init_from stages hold
    // now; so it is only continued if they hold what it started from (stage_done.json would
    // otherwise record upstream weights it never saw). A fresh start records them.
    const std::string started_file = (fs::path(dir) / "stage_started.json").string();
    if (has_checkpoints(dir)) {
      nlohmann::json started;
      try {
        if (fs::exists(started_file)) started = nlohmann::json::parse(read_text_file(started_file));
      } catch (const nlohmann::json::exception& e) {
        throw DataError(started_file + ": unreadable (" + e.what() + "); delete " + dir + " to redo stage " + stage.name);
      }
      if (started.contains("upstream_weights") && started["upstream_weights"] != upstream_weights)
        throw ConfigError("pipeline " + p.name + ": stage " + stage.name +
                          " is part-trained from other checkpoints of its init_from stages than the current ones "
                          "(trained again since it started); remove " + dir + " to train it again from them");
    } else {
      // Every rank writes it (the same bytes, each through its own temporary), so a rank that
      // cannot stops here with the reason; before the first stage no process group exists yet
      // to tell the others.
      std::error_code ec;
      fs::create_directories(dir, ec);
      atomic_write_text(started_file, json_text(nlohmann::json{{"upstream_weights", upstream_weights}}, 2) + "\n");
    }
    spdlog::info("pipeline {}: stage {} ({}/{}), trainer {}, config {}", p.name, stage.name, i + 1, p.stages.size(),
                 cfg.trainer, stage.config);
    TrainOptions o = opt;
    o.resume = "auto";  // continue a stage in progress; a fresh one starts from scratch
    TrainResult r = train_any(cfg, o);
    if (r.interrupted) {
      result.interrupted = true;
      return result;
    }
    final_checkpoint[stage.name] = r.checkpoint;
    entry = {{"checkpoint", r.checkpoint}, {"eval", r.final_eval}, {"skipped", false}};
    write_run_text(cfg, "stage_done.json",
                   json_text(nlohmann::json{{"checkpoint", r.checkpoint}, {"step", r.final_step}, {"eval", r.final_eval},
                                            {"config", resolved_yaml(cfg)}, {"upstream", upstream},
                                            {"upstream_weights", upstream_weights}},
                             2) + "\n");
    result.stages[stage.name] = entry;
  }
  nlohmann::json summary = {{"pipeline", p.name}, {"stages", result.stages}};
  if (rank() == 0) atomic_write_text((fs::path(p.out_dir) / "pipeline.json").string(), json_text(summary, 2) + "\n");
  return result;
}

namespace {

std::string fmt3(const nlohmann::json& v) { return v.is_number() ? fmt::format("{:.3f}", v.get<double>()) : "-"; }

// "exact match 0.912 (colour 0.95, shape 0.90, ...)" and the rest of one VLM eval set.
std::string vlm_set_line(const nlohmann::json& e) {
  std::string line;
  if (e.contains("likelihood_accuracy")) {  // preference pairs
    auto levels = [&](const std::string& key) {
      std::string out;
      for (const char* level : {"object", "attribute", "relation"})
        if (e.contains(key + "/" + level)) out += (out.empty() ? "" : ", ") + std::string(level) + " " + fmt3(e[key + "/" + level]);
      return out.empty() ? out : " (" + out + ")";
    };
    line += "true caption likelier than its hallucinated twin " + fmt3(e["likelihood_accuracy"]) +
            levels("likelihood_accuracy") + "; implicit reward prefers it " + fmt3(e["preference_accuracy"]);
    return line;
  }
  if (e.contains("pope/accuracy")) {  // yes/no hallucination probes (eval/pope.h)
    std::string levels;
    for (const char* level : {"object", "attribute", "relation"}) {
      const std::string k = std::string("pope/") + level + "/hallucination_rate";
      if (e.contains(k)) levels += (levels.empty() ? "" : ", ") + std::string(level) + " " + fmt3(e[k]);
    }
    return "yes/no accuracy " + fmt3(e["pope/accuracy"]) + ", says yes to what is not there " +
           fmt3(e["pope/hallucination_rate"]) + (levels.empty() ? "" : " (" + levels + ")") + ", yes ratio " +
           fmt3(e["pope/yes_ratio"]);
  }
  if (e.contains("exact_match")) {
    line += "exact match " + fmt3(e["exact_match"]);
    std::string types;
    for (const auto& [k, v] : e.items())
      if (k.rfind("exact_match/", 0) == 0) types += (types.empty() ? "" : ", ") + k.substr(12) + " " + fmt3(v);
    if (!types.empty()) line += " (" + types + ")";
  }
  if (e.contains("caption/object_precision"))
    line += "; caption objects: precision " + fmt3(e["caption/object_precision"]) + ", recall " +
            fmt3(e["caption/object_recall"]);
  if (e.contains("loss"))
    line += "; token loss " + fmt3(e["loss"]) +
            (e.contains("loss_shuffled_images") ? " (" + fmt3(e["loss_shuffled_images"]) + " with other images)" : "");
  return line;
}

}  // namespace

std::string pipeline_summary(const PipelinePlan& plan, const PipelineResult& result) {
  std::string out = "pipeline " + plan.pipeline.name + " (" + (fs::path(plan.pipeline.out_dir) / "pipeline.json").string() +
                    "), held-out results:\n";
  for (size_t i = 0; i < plan.stages.size(); ++i) {
    const auto& name = plan.pipeline.stages[i].name;
    const auto& cfg = plan.stages[i];
    const nlohmann::json e = result.stages.contains(name) ? result.stages[name].value("eval", nlohmann::json())
                                                           : nlohmann::json();
    std::string head = fmt::format("  {:<8} {:<12} ", name, cfg.trainer);
    if (!result.stages.contains(name)) {
      out += head + "not run\n";
    } else if (e.is_null() || e.empty()) {
      out += head + "no held-out set configured\n";
    } else if (e.contains("i2t/R@1")) {
      std::string line = "retrieval i2t R@1 " + fmt3(e["i2t/R@1"]) + " R@5 " + fmt3(e.value("i2t/R@5", nlohmann::json())) +
                         ", t2i R@1 " + fmt3(e["t2i/R@1"]) + " R@5 " + fmt3(e.value("t2i/R@5", nlohmann::json()));
      std::string negs;
      for (const auto& [k, v] : e.items())
        if (k.rfind("negatives/", 0) == 0 && k != "negatives/all") negs += (negs.empty() ? "" : ", ") + k.substr(10) + " " + fmt3(v);
      if (!negs.empty()) line += "; true caption above a hard negative: " + negs;
      if (e.contains("alignment/mutual_knn@10"))
        line += "; mutual kNN@10 " + fmt3(e["alignment/mutual_knn@10"]) + ", CKA " + fmt3(e.value("alignment/cka", nlohmann::json()));
      out += head + line + "\n";
    } else {
      bool first = true;
      for (const auto& [set, v] : e.items()) {
        out += (first ? head : std::string(head.size(), ' ')) + set + ": " + vlm_set_line(v) + "\n";
        first = false;
      }
    }
  }
  return out;
}

}  // namespace trialign

