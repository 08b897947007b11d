// The forward passes of the preference trainer: response log-probs of a batch under a model,
// the passes a loss declares over chosen/rejected pairs or sampled completions (one concatenated
// forward per model), the reference log-prob cache, and GRPO's completion sampling.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "data/preference_dataset.h"
#include "data/tokenizer.h"
#include "losses/preference.h"
#include "losses/rewards.h"
#include "models/vlm.h"

namespace trialign {

// The reference model of a preference loss: a separate copy of `policy`'s current weights (built
// from `mc`), frozen and in eval mode, so policy updates never reach it.
VlmModel frozen_copy(VlmModel& policy, const ModelConfig& mc);

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
// Log-probs of the reference passes the loss asks for with clean images, over every pair of
// `data` but the `left_out` ones (their images do not decode; training never draws them). A stop
// signal ends it early with rows missing: the caller then stops the run
// (stop_before_training_if_requested) before any step reads them.
ReferenceCache build_reference_cache(PreferenceLossImpl& loss, VlmModel& reference, const PreferenceDataset& data,
                                     int batch, int64_t image_id, bool bf16, const std::vector<int64_t>& left_out = {});

// The passes a loss asked for over pairs [chosen; rejected] of `batch`, one forward per model.
// `corrupt_seed` seeds the loss's image corruption (shared by the policy and reference passes).
// Reference passes found in `cache` are read from it instead of run.
PreferenceInputs pair_passes(PreferenceLossImpl& loss, VlmModel& policy, VlmModel* reference,
                             const PreferenceDataset& data, const PreferenceBatch& batch, int64_t image_id, bool bf16,
                             uint64_t corrupt_seed, const ReferenceCache* cache = nullptr);

// The completions of prompts `batch` (G = sampling.group_size per prompt, contiguous), sampled
// with the KV cache from the policy in eval mode (seeded: the same seed, the same completions)
// and scored by the reward functions.
CompletionBatch sample_completions(VlmModel& policy, const Tokenizer& tok, const PreferenceDataset& data,
                                   const PreferenceBatch& batch, const CompletionSampling& sampling,
                                   const std::vector<std::pair<std::string, std::shared_ptr<RewardFnImpl>>>& rewards,
                                   uint64_t seed, bool bf16);

// The passes a loss asked for over completions [from, to) of `c` (log-probs on logits / the
// sampling temperature).
PreferenceInputs completion_passes(PreferenceLossImpl& loss, VlmModel& policy, VlmModel* reference,
                                   const CompletionBatch& c, int64_t from, int64_t to, int64_t image_id, bool bf16);

}  // namespace trialign
