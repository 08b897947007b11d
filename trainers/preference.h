// Preference alignment (trainer: preference): DPO, mDPO, GRPO and plugin losses on one step loop.
//
// The loss (losses/preference.h) decides what runs: its passes() name the forward passes
// (policy / reference x chosen / rejected / completion x clean / corrupted image) and sampling()
// whether the data are chosen/rejected pairs or prompts whose completions are sampled and scored
// by the reward functions. The trainer builds the policy from init_from (usually stage 3), and a
// separate frozen copy of the same initial weights as the reference when a pass needs one.
// All passes of one model over a micro-batch go through one concatenated forward (chosen and
// rejected together, as DPO implementations do).
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/run_config.h"
#include "trainers/common.h"
#include "trainers/preference_passes.h"

namespace trialign {

TrainResult train_preference(const RunConfig& cfg, const TrainOptions& opt);

}  // namespace trialign
