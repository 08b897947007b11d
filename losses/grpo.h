// Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"). For each prompt the
// trainer samples G completions with the KV-cache sampler (sampling() below), scores them with the
// reward functions, and this loss turns rewards into group-normalised advantages
//   A_i = (r_i - mean_group(r)) / (std(r) + 1e-4)      std: of the group (unbiased, default),
//                                                       of the whole step (batch), or none (Dr. GRPO)
// and, per completion token, with rho = exp(p - p_old) and k3 = exp(r - p) - (r - p) - 1:
//   l_t = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta k3
// Log-probs p are taken on logits / temperature, the distribution the completions came from.
// One optimisation step per batch of completions, so p_old is the policy's own detached log-prob
// (rho = 1 in value, its gradient is A grad p). beta 0 drops the reference model entirely.
// Token aggregation (loss_type): grpo = mean over each sequence's tokens, then over sequences;
// bnpo = sum / tokens of the micro-batch; dr_grpo = sum / (sequences x max_new_tokens);
// dapo = sum / completion tokens of the whole step (across accumulation).
// Metrics: reward/mean, reward/std, kl (token mean of k3), clip_ratio, completion_length.
#pragma once
#include "losses/preference.h"

namespace trialign {

struct GrpoOptions {
  double beta = 0.0;
  double epsilon = 0.2;
  double epsilon_high = 0.0;        // 0 = epsilon
  std::string scale_rewards = "group";  // group | batch | none
  std::string loss_type = "grpo";   // grpo | bnpo | dr_grpo | dapo
  CompletionSampling sampling;
  template <class V> void fields(V& v) {
    v("beta", beta, non_negative());
    v("epsilon", epsilon, in_range(0.0, 1.0));
    v("epsilon_high", epsilon_high, non_negative());
    v("scale_rewards", scale_rewards, one_of({"group", "batch", "none"}));
    v("loss_type", loss_type, one_of({"grpo", "bnpo", "dr_grpo", "dapo"}));
    v("group_size", sampling.group_size, at_least(2));
    v("temperature", sampling.temperature, Check<double>([](const double& t) {
        // log-probs are taken on logits / temperature: far below this they overflow float (inf,
        // then NaN ratios). GRPO samples, so there is no greedy 0 either.
        return t >= 1e-6 ? "" : "must be at least 1e-6 (typical: 0.7-1.2): log-probs are taken on logits / temperature, "
                                "and a smaller value overflows them";
      }));
    v("top_k", sampling.top_k, at_least(0));
    v("top_p", sampling.top_p, Check<double>([](const double& p) {
        return p > 0 && p <= 1 ? "" : "must be in (0, 1]: the nucleus must keep at least the most probable token";
      }));
    v("max_new_tokens", sampling.max_new_tokens, at_least(1));
  }
};

// Advantages [S] from rewards [S] in groups of `group_size` (S a multiple of it).
torch::Tensor grpo_advantages(const torch::Tensor& rewards, int64_t group_size, const std::string& scale_rewards);

class GrpoLossImpl : public PreferenceLossImpl {
 public:
  explicit GrpoLossImpl(const GrpoOptions& o) : opt_(o) {}
  std::vector<ResponsePass> passes() const override;
  const CompletionSampling* sampling() const override { return &opt_.sampling; }
  LossOutput forward(const PreferenceInputs& in) override;

 private:
  GrpoOptions opt_;
};

}  // namespace trialign
