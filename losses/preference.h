// The preference-alignment loss API (DPO, mDPO, GRPO and plugins alike).
//
// A loss declares the forward passes it needs (passes()): which model (policy or the frozen
// reference), which response (chosen, rejected, or sampled completions) and whether the image is
// replaced by a corrupted one (corrupt_images(), also the loss's to define). The trainer runs
// exactly those passes and hands the loss the per-token log-probs of every response token:
// the reply and its end-of-sequence token, never the prompt. Sequence log-probs are sums over
// those tokens (Rafailov et al. 2023). Policy passes carry gradients, reference passes do not.
//
// Losses see one micro-batch at a time; `share` (micro-batch samples / step samples) and the
// step-wide counts make micro-batch losses add up to the loss of the whole step, so gradient
// accumulation gives the one-big-batch update (the same contract as TokenLossInputs).
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "core/registry.h"
#include "losses/loss.h"

namespace trialign {

struct ResponsePass {
  std::string model;              // "policy" | "reference"
  std::string response;           // "chosen" | "rejected" | "completion"
  bool corrupted_image = false;   // the sample's images through corrupt_images()
  // "policy/chosen", "reference/chosen/corrupted", ...: the key in PreferenceInputs::logps.
  std::string key() const { return model + "/" + response + (corrupted_image ? "/corrupted" : ""); }
};

// Log-probs of the response tokens of N sequences, left-aligned: token t of sequence i at [i, t].
struct SequenceLogps {
  torch::Tensor token_logps;  // [N, T] fp32, 0 where mask is 0
  torch::Tensor mask;         // [N, T] fp32, 1 for response tokens
  torch::Tensor sum() const { return (token_logps * mask).sum(1); }           // [N]
  torch::Tensor count() const { return mask.sum(1); }                         // [N]
  torch::Tensor mean() const { return sum() / count().clamp_min(1.0); }       // [N]
};

// What a loss samples instead of reading chosen/rejected pairs (GRPO). The data are then prompt
// records with verifiable answers and the trainer scores completions with the reward functions.
struct CompletionSampling {
  int64_t group_size = 4;       // completions per prompt (G)
  double temperature = 1.0;     // > 0; log-probs are taken on logits / temperature as well
  int64_t top_k = 0;
  double top_p = 1.0;
  int64_t max_new_tokens = 16;  // also the "max completion length" of dr_grpo
};

struct PreferenceInputs {
  std::map<std::string, SequenceLogps> logps;  // by ResponsePass::key()
  // Pairs: [B] 1 where the conditional image preference applies, 0 where the chosen reply stays
  // right without the image (PreferenceSample::image_conditional); undefined = 1 everywhere.
  torch::Tensor image_conditional;
  // Samples of this micro-batch / samples of the optimizer step (pairs, or completions).
  double share = 1.0;
  // Response tokens in the whole step: chosen responses (pairs), or completions (GRPO).
  double step_response_tokens = 1.0;
  // GRPO: rewards of every completion of the step [S] (groups of group_size contiguous); this
  // micro-batch holds completions [row_begin, row_begin + N).
  torch::Tensor rewards;
  int64_t group_size = 1;
  int64_t row_begin = 0;

  // The named pass; throws std::invalid_argument naming it when the trainer did not run it.
  const SequenceLogps& at(const std::string& key) const;
};

class PreferenceLossImpl : public torch::nn::Module {
 public:
  virtual std::vector<ResponsePass> passes() const = 0;
  // Non-null: the loss trains on sampled completions (prompt records) with these settings.
  virtual const CompletionSampling* sampling() const { return nullptr; }
  // Corrupted images for passes with corrupted_image (mDPO): pixels [I, 3, S, S] -> same shape.
  // Default: a random resized crop keeping 1%-20% of the area, aspect 3/4-4/3, resized back.
  virtual torch::Tensor corrupt_images(const torch::Tensor& pixels, uint64_t seed) const;
  virtual LossOutput forward(const PreferenceInputs& in) = 0;
  bool needs_reference() const;
};

using PreferenceLossRegistry = Registry<PreferenceLossImpl>;
PreferenceLossRegistry& preference_losses();

// Random resized crop (Szegedy et al. 2015) of each image, area fraction in [min_area,
// max_area], log-uniform aspect ratio in [3/4, 4/3], bilinearly resized back to S x S.
// Reproducible from `seed`.
torch::Tensor random_resized_crop(const torch::Tensor& pixels, double min_area, double max_area, uint64_t seed);

// ---- reward functions (GRPO) ----

struct RewardInput {
  std::string prompt;         // the last user turn, as text
  std::string completion;     // decoded, without the end-of-sequence token
  bool finished = false;      // the completion ended with end-of-sequence (not cut at max_new_tokens)
  std::string answer;         // the record's verifiable answer
  std::string question_type;  // the record's question_type ("" when absent)
};

class RewardFnImpl {
 public:
  virtual ~RewardFnImpl() = default;
  virtual std::vector<double> score(const std::vector<RewardInput>& in) const = 0;
  double weight = 1.0;  // the total reward is the weighted sum over the configured functions
};

using RewardRegistry = Registry<RewardFnImpl>;
RewardRegistry& reward_functions();

}  // namespace trialign
