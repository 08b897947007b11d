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

// Throws one ConfigError listing every problem found, one line each naming the dotted key. Only
// the files this trainer reads are checked. Combinations a trainer refuses are checked whatever
// the scope: a pair loss with eval.samples, a cached reference with a sampling loss or with
// random crops, an adapter run whose rules leave the vision tower or the language model
// trainable.
void check_preflight(const RunConfig& cfg, const PreflightScope& scope = {});

// init_from's component check, against an earlier pipeline stage's config and against a
// checkpoint on disk: the components of `wanted` that a model of `trainer` lacks, and the
// components it holds, comma separated.
std::vector<std::string> components_lacking(const std::string& trainer, const std::vector<std::string>& wanted);
std::string components_held(const std::string& trainer);

// What a trainer runs first, before anything is written: files and combinations, and init_from
// when the run starts fresh (`resume` "", or "auto" over a run folder without checkpoints); a
// resumed run does not read init_from again (the preference trainer rebuilds its reference from
// the checkpoints RUN/init_from.json recorded).
void check_before_training(const RunConfig& cfg, const std::string& resume);

// The same for every stage of a pipeline that has not finished (no stage_done.json), files and
// combinations only (init_from names stages that have yet to train): a wrong path in the last
// stage's config would otherwise stop the pipeline only after the stages before it trained.
void check_pipeline_preflight(const PipelinePlan& plan);

}  // namespace trialign
