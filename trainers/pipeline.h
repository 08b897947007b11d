// `trialign run PIPELINE.yaml`: stages run in order, each in OUT/<stage name>, each fresh stage
// taking components from the previous one's final checkpoint.
//
//   name: quickstart
//   out_dir: runs/quickstart
//   set: {data.tokenizer: data/shapes/tokenizer.model}   # overrides for every stage
//   stages:
//     - {name: stage1, config: configs/stage1_contrastive.yaml}
//     - name: stage2
//       config: configs/stage2_adapter.yaml
//       set: {train.steps: 300}                          # this stage's own overrides
//       init_from: [{stage: stage1, components: [vision_model]}, {stage: lm, components: [language_model]}]
//
// Every stage config is loaded and validated before the first stage starts. A stage that
// finished (OUT/<stage>/stage_done.json) is skipped when its config differs at most in keys that
// do not change what is computed (threads, logging) and it was trained from the same upstream
// checkpoints; a finished stage whose config or upstream changed is refused with the reason
// (remove its folder to train it again). An unfinished stage resumes from its newest checkpoint.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/config_tree.h"
#include "core/run_config.h"
#include "trainers/common.h"

namespace trialign {

struct StageInit {
  std::string stage;                    // an earlier stage's name
  std::vector<std::string> components;  // vision_model | mm_projector | language_model
  template <class V> void fields(V& v) {
    v("stage", stage);
    v("components", components);
  }
};

struct PipelineStage {
  std::string name;
  std::string config;  // run config path
  ConfigNode set;      // {dotted.key: value} overrides
  std::vector<StageInit> init_from;
  template <class V> void fields(V& v) {
    v("name", name);
    v("config", config);
    v("set", set);
    v("init_from", init_from);
  }
};

struct PipelineConfig {
  std::string name = "pipeline";
  std::string out_dir = "runs/pipeline";
  ConfigNode set;  // overrides applied to every stage before its own
  std::vector<PipelineStage> stages;
  template <class V> void fields(V& v) {
    v("name", name);
    v("out_dir", out_dir);
    v("set", set);
    v("stages", stages);
  }
};

// The pipeline file and every stage's run config, validated (ConfigError lists all problems).
struct PipelinePlan {
  PipelineConfig pipeline;
  std::vector<RunConfig> stages;  // run.out_dir = OUT/<name>, run.name = <name>
};
PipelinePlan load_pipeline(const std::string& path, const std::vector<std::string>& overrides = {});

struct PipelineResult {
  bool interrupted = false;
  nlohmann::json stages;  // name -> {checkpoint, eval, skipped}
};
// Runs (or skips / resumes) every stage; writes OUT/pipeline.json with each stage's final
// checkpoint and evaluation.
PipelineResult run_pipeline(const PipelinePlan& plan, const TrainOptions& opt);

// One line per stage with its held-out results (retrieval and hard-negative accuracy for
// stage 1, exact match per question type, caption object precision / recall and the token
// loss with and without the right images for stages 2-3), for people to read.
std::string pipeline_summary(const PipelinePlan& plan, const PipelineResult& result);

// Dispatches a run config to its trainer.
TrainResult train_any(const RunConfig& cfg, const TrainOptions& opt);

}  // namespace trialign
