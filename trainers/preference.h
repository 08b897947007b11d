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
#include "data/preference_dataset.h"
#include "losses/preference.h"
#include "losses/rewards.h"
#include "models/vlm.h"
#include "trainers/common.h"

namespace trialign {

// Log-probs of the labelled tokens (labels != -100 after the one-token shift) of each sequence
// under `model`, on logits / temperature. Gradients flow when grad mode is on.
SequenceLogps response_logps(VlmModel& model, const std::vector<std::vector<int64_t>>& ids,
                             const std::vector<std::vector<int64_t>>& labels, const torch::Tensor& pixels,
                             int64_t image_id, bool bf16, double temperature = 1.0);

// Rows [from, to) of a SequenceLogps.
SequenceLogps slice_rows(const SequenceLogps& s, int64_t from, int64_t to);
// The same rows with T cut to their longest response, so every pass of one response has the same
// width whichever forward (or the reference cache) it came from: per-token losses can combine them.
SequenceLogps trim_columns(const SequenceLogps& s);

// Sampled completions of a micro-batch or step: sequences (prompt + completion, labels on the
// completion), the pixels repeated per completion, and their rewards.
struct CompletionBatch {
  std::vector<std::vector<int64_t>> ids, labels;
  torch::Tensor pixels;          // images of every completion's prompt, completion order
  std::vector<int64_t> images_per_sequence;
  torch::Tensor rewards;         // [S] fp32
  std::vector<std::string> texts;
  std::map<std::string, double> reward_means;  // per reward function
};

// Reference log-probs of every pair of a dataset for the loss's clean-image reference passes,
// computed once (preference.cache_reference): pass key -> dataset index -> token log-probs.
struct ReferenceCache {
  std::map<std::string, std::vector<std::vector<float>>> logps;
  bool covers(const ResponsePass& p) const { return logps.count(p.key()) > 0; }
  // The cached rows of `indices`, left-aligned like response_logps.
  SequenceLogps rows(const std::string& key, const std::vector<int64_t>& indices) const;
};
ReferenceCache build_reference_cache(PreferenceLossImpl& loss, VlmModel& reference, const PreferenceDataset& data,
                                     int batch, int64_t image_id, bool bf16);

// The passes a loss asked for over pairs [chosen; rejected] of `batch`, one forward per model.
// `corrupt_seed` seeds the loss's image corruption (shared by the policy and reference passes).
// Reference passes found in `cache` are read from it instead of run.
PreferenceInputs pair_passes(PreferenceLossImpl& loss, VlmModel& policy, VlmModel* reference,
                             const PreferenceDataset& data, const PreferenceBatch& batch, int64_t image_id, bool bf16,
                             uint64_t corrupt_seed, const ReferenceCache* cache = nullptr);

TrainResult train_preference(const RunConfig& cfg, const TrainOptions& opt);

}  // namespace trialign
