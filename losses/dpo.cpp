#include "losses/dpo.h"

namespace trialign {

namespace F = torch::nn::functional;

torch::Tensor dpo_pair_loss(const DpoOptions& o, const torch::Tensor& d, const torch::Tensor& d_mean) {
  const double e = o.label_smoothing;
  if (o.loss_type == "sigmoid") return -(1 - e) * F::logsigmoid(o.beta * d) - e * F::logsigmoid(-o.beta * d);
  if (o.loss_type == "ipo") return (d_mean - 1.0 / (2.0 * o.beta)).pow(2);
  if (o.loss_type == "hinge") return torch::relu(1.0 - o.beta * d);
  if (o.loss_type == "robust") return (-(1 - e) * F::logsigmoid(o.beta * d) + e * F::logsigmoid(-o.beta * d)) / (1 - 2 * e);
  throw std::invalid_argument("dpo: unknown loss_type '" + o.loss_type + "'");
}

void add_reward_metrics(LossOutput& out, const torch::Tensor& chosen_rewards, const torch::Tensor& rejected_rewards,
                        const torch::Tensor& chosen_logps, const torch::Tensor& rejected_logps, double share) {
  torch::NoGradGuard ng;
  auto m = [&](const torch::Tensor& t) { return t.detach().to(torch::kFloat32).mean() * share; };
  out.metrics["rewards/chosen"] = m(chosen_rewards);
  out.metrics["rewards/rejected"] = m(rejected_rewards);
  out.metrics["rewards/accuracies"] = m(chosen_rewards.gt(rejected_rewards).to(torch::kFloat32));
  out.metrics["rewards/margins"] = m(chosen_rewards - rejected_rewards);
  out.metrics["logps/chosen"] = m(chosen_logps);
  out.metrics["logps/rejected"] = m(rejected_logps);
}

std::vector<ResponsePass> DpoLossImpl::passes() const {
  std::vector<ResponsePass> p = {{"policy", "chosen"}, {"policy", "rejected"}};
  if (!opt_.reference_free) p.insert(p.end(), {{"reference", "chosen"}, {"reference", "rejected"}});
  return p;
}

LossOutput DpoLossImpl::forward(const PreferenceInputs& in) {
  const auto& pc = in.at("policy/chosen");
  const auto& pr = in.at("policy/rejected");
  torch::Tensor rc = torch::zeros_like(pc.sum()), rr = rc, rc_mean = rc, rr_mean = rc;
  if (!opt_.reference_free) {
    const auto& c = in.at("reference/chosen");
    const auto& r = in.at("reference/rejected");
    rc = c.sum().detach(), rr = r.sum().detach(), rc_mean = c.mean().detach(), rr_mean = r.mean().detach();
  }
  const auto d = (pc.sum() - pr.sum()) - (rc - rr);                     // [B]
  const auto d_mean = (pc.mean() - pr.mean()) - (rc_mean - rr_mean);    // [B]
  LossOutput out;
  out.loss = dpo_pair_loss(opt_, d, d_mean).mean() * in.share;
  if (opt_.sft_weight > 0) {
    const auto nll = -pc.sum().sum() / in.step_response_tokens;  // token mean over the step's chosen tokens
    out.loss = out.loss + opt_.sft_weight * nll;
    out.metrics["sft_nll"] = nll.detach();
  }
  add_reward_metrics(out, opt_.beta * (pc.sum() - rc), opt_.beta * (pr.sum() - rr), pc.sum(), pr.sum(), in.share);
  return out;
}

TRIALIGN_REGISTER(preference_losses(), "dpo",
                  "DPO on chosen/rejected pairs: sigmoid (+label smoothing), ipo, hinge, robust; reference-free; "
                  "optional SFT term",
                  [](ConfigReader& r) -> std::shared_ptr<PreferenceLossImpl> {
                    DpoOptions o;
                    o.fields(r);
                    return std::make_shared<DpoLossImpl>(o);
                  });

}  // namespace trialign
