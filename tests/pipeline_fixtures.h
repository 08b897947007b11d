// A pipeline plan without configs on disk, for tests of what is written from its results.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "trainers/pipeline.h"

namespace trialign::test {

// Stages {name, trainer} of pipeline "demo" writing to out_dir.
inline PipelinePlan demo_plan(const std::string& out_dir,
                              const std::vector<std::pair<std::string, std::string>>& stages) {
  PipelinePlan plan;
  plan.pipeline.name = "demo";
  plan.pipeline.out_dir = out_dir;
  for (const auto& [name, trainer] : stages) {
    PipelineStage st;
    st.name = name;
    plan.pipeline.stages.push_back(st);
    RunConfig cfg;
    cfg.trainer = trainer;
    plan.stages.push_back(cfg);
  }
  return plan;
}

}  // namespace trialign::test
