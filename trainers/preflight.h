// Checks a run config against the files and checkpoints it names and against the choices its
// trainer will refuse, before anything is trained or written: `trialign config check`, every
// trainer's first step, and a pipeline for each of its stages before the first one starts.
// Reads no record and builds no model, so it is cheap on any config; `trialign data check`
// reads every record.
#pragma once
#include <string>
#include <vector>

#include "core/run_config.h"

namespace trialign {

struct PipelinePlan;

struct PreflightScope {
  bool files = true;      // data.train, data.val, eval.sets[].data, data.tokenizer, data.image_root, ...
  bool init_from = true;  // init_from[].checkpoint resolves and holds the components asked for
};

// Every problem found, one line each, naming the dotted key (empty when there are none).
// Combinations a trainer refuses (a pair loss with eval.samples, a cached reference with a
// sampling loss, an adapter run whose language model would train) are checked whatever the scope.
std::vector<std::string> preflight_problems(const RunConfig& cfg, const PreflightScope& scope = {});

// Throws one ConfigError listing them all.
void check_preflight(const RunConfig& cfg, const PreflightScope& scope = {});

// The same for every stage of a pipeline that has not finished (no stage_done.json), files and
// combinations only (init_from names stages that have yet to train): a wrong path in the last
// stage's config would otherwise stop the pipeline only after the stages before it trained.
void check_pipeline_preflight(const PipelinePlan& plan);

}  // namespace trialign
