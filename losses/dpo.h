// Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
// Language Model is Secretly a Reward Model") and its common variants, on chosen / rejected
// pairs. With sequence log-probs p(y) (sums over response tokens) of the policy and r(y) of the
// frozen reference,  D = (p(y+) - p(y-)) - (r(y+) - r(y-)):
//   sigmoid  -(1-e) log sig(beta D) - e log sig(-beta D)    e = label_smoothing (cDPO)
//   ipo      (D_mean - 1 / (2 beta))^2, D_mean from per-token MEAN log-probs (Azar et al. 2023)
//   hinge    relu(1 - beta D)                               (SLiC, Zhao et al. 2023)
//   robust   (-(1-e) log sig(beta D) + e log sig(-beta D)) / (1 - 2e)  (Chowdhury et al. 2024)
// reference_free: r = 0 and no reference model is built. sft_weight a > 0 adds a * NLL of the
// chosen response, averaged over the chosen tokens of the step (RPO, Pang et al. 2024).
// Chosen and rejected go through the model in one concatenated forward (the trainer's job).
// Metrics: rewards/chosen = beta (p(y+) - r(y+)), rewards/rejected, rewards/accuracies (share of
// pairs with chosen > rejected), rewards/margins, logps/chosen, logps/rejected (step means).
#pragma once
#include "losses/preference.h"

namespace trialign {

struct DpoOptions {
  double beta = 0.1;
  std::string loss_type = "sigmoid";
  double label_smoothing = 0.0;
  bool reference_free = false;
  double sft_weight = 0.0;
  template <class V> void fields(V& v) {
    v("beta", beta, positive());
    v("loss_type", loss_type, one_of({"sigmoid", "ipo", "hinge", "robust"}));
    v("label_smoothing", label_smoothing, in_range(0.0, 0.499));
    v("reference_free", reference_free);
    v("sft_weight", sft_weight, non_negative());
  }
};

// Per-pair DPO loss [B] from the log-ratio difference `d` (sums) and `d_mean` (per-token means,
// used by ipo only).
torch::Tensor dpo_pair_loss(const DpoOptions& o, const torch::Tensor& d, const torch::Tensor& d_mean);

class DpoLossImpl : public PreferenceLossImpl {
 public:
  explicit DpoLossImpl(const DpoOptions& o) : opt_(o) {}
  std::vector<ResponsePass> passes() const override;
  LossOutput forward(const PreferenceInputs& in) override;

 private:
  DpoOptions opt_;
};

// Adds the reward metrics shared by DPO and mDPO (share-weighted means, additive over micro-batches).
void add_reward_metrics(LossOutput& out, const torch::Tensor& chosen_rewards, const torch::Tensor& rejected_rewards,
                        const torch::Tensor& chosen_logps, const torch::Tensor& rejected_logps, double share);

}  // namespace trialign
