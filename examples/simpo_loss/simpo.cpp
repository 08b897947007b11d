// SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward")
// as a trialign plugin: the implicit reward of a response is its length-normalised log-probability
// under the policy, scaled by beta, and the chosen reward must beat the rejected one by a margin
// gamma:
//   loss = -log sigmoid(beta * logp(y_w) / |y_w| - beta * logp(y_l) / |y_l| - gamma)
// No reference model is needed, so the loss asks the trainer for two passes only.
#include "core/plugins.h"
#include "losses/preference.h"

namespace {

struct SimpoOptions {
  double beta = 2.0;   // reward scale
  double gamma = 0.5;  // target reward margin
  template <class V>
  void fields(V& v) {
    v("beta", beta, trialign::positive());
    v("gamma", gamma);
  }
};

class SimpoLoss : public trialign::PreferenceLossImpl {
 public:
  explicit SimpoLoss(SimpoOptions o) : o_(o) {}

  std::vector<trialign::ResponsePass> passes() const override { return {{"policy", "chosen"}, {"policy", "rejected"}}; }

  trialign::LossOutput forward(const trialign::PreferenceInputs& in) override {
    const auto chosen = in.at("policy/chosen").mean();      // [B] mean log-prob per response token
    const auto rejected = in.at("policy/rejected").mean();  // [B]
    const auto chosen_reward = o_.beta * chosen, rejected_reward = o_.beta * rejected;
    const auto z = chosen_reward - rejected_reward - o_.gamma;
    trialign::LossOutput out;
    // -log sigmoid(z) = softplus(-z); `share` makes micro-batch losses add up to the step's mean.
    out.loss = torch::nn::functional::softplus(-z).mean() * in.share;
    auto metric = [&](const torch::Tensor& t) { return t.detach().to(torch::kFloat32).mean() * in.share; };
    out.metrics["rewards/chosen"] = metric(chosen_reward);
    out.metrics["rewards/rejected"] = metric(rejected_reward);
    out.metrics["rewards/margins"] = metric(chosen_reward - rejected_reward);
    out.metrics["rewards/accuracies"] = metric(chosen_reward.gt(rejected_reward).to(torch::kFloat32));
    out.metrics["logps/chosen_mean"] = metric(chosen);
    out.metrics["logps/rejected_mean"] = metric(rejected);
    return out;
  }

 private:
  SimpoOptions o_;
};

}  // namespace

TRIALIGN_PLUGIN {
  trialign::preference_losses().add(
      "simpo", "SimPO (plugin): length-normalised, reference-free rewards with a target margin gamma",
      [](trialign::ConfigReader& r) -> std::shared_ptr<trialign::PreferenceLossImpl> {
        SimpoOptions o;
        o.fields(r);
        return std::make_shared<SimpoLoss>(o);
      });
}
