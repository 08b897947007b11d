#include "losses/grpo.h"

namespace trialign {

torch::Tensor grpo_advantages(const torch::Tensor& rewards, int64_t group_size, const std::string& scale_rewards) {
  TORCH_CHECK(rewards.dim() == 1 && group_size > 0 && rewards.size(0) % group_size == 0,
              "grpo: rewards [S] with S a multiple of group_size ", group_size, " expected, got ", rewards.sizes());
  const auto r = rewards.to(torch::kFloat32).view({-1, group_size});  // [P, G]
  auto a = r - r.mean(1, true);
  if (scale_rewards == "group") a = a / (r.std(1, /*unbiased=*/true, true) + 1e-4);
  else if (scale_rewards == "batch") a = a / (rewards.to(torch::kFloat32).std(/*unbiased=*/true) + 1e-4);
  return a.reshape({-1});
}

std::vector<ResponsePass> GrpoLossImpl::passes() const {
  if (opt_.beta > 0) return {{"policy", "completion"}, {"reference", "completion"}};
  return {{"policy", "completion"}};
}

LossOutput GrpoLossImpl::forward(const PreferenceInputs& in) {
  const auto& pol = in.at("policy/completion");
  const int64_t N = pol.token_logps.size(0);
  TORCH_CHECK(in.rewards.defined() && in.row_begin + N <= in.rewards.size(0),
              "grpo: the step's rewards must cover this micro-batch's completions");
  const auto adv = grpo_advantages(in.rewards, in.group_size, opt_.scale_rewards).slice(0, in.row_begin, in.row_begin + N);
  const auto& mask = pol.mask;                                 // [N, T]
  const auto logp = pol.token_logps;                           // [N, T]
  const auto ratio = torch::exp(logp - logp.detach());         // 1 in value
  const double hi = opt_.epsilon_high > 0 ? opt_.epsilon_high : opt_.epsilon;
  const auto a = adv.unsqueeze(1);                             // [N, 1]
  const auto unclipped = ratio * a, clipped = torch::clamp(ratio, 1 - opt_.epsilon, 1 + hi) * a;
  auto per_token = -torch::min(unclipped, clipped);            // [N, T]
  torch::Tensor k3;
  if (opt_.beta > 0) {
    const auto diff = in.at("reference/completion").token_logps.detach() - logp;
    k3 = torch::exp(diff) - diff - 1;
    per_token = per_token + opt_.beta * k3;
  }
  const auto masked = per_token * mask;
  const auto lengths = mask.sum(1);                            // [N]
  LossOutput out;
  if (opt_.loss_type == "grpo") out.loss = (masked.sum(1) / lengths.clamp_min(1)).mean() * in.share;
  else if (opt_.loss_type == "bnpo") out.loss = masked.sum() / mask.sum().clamp_min(1) * in.share;
  else if (opt_.loss_type == "dr_grpo")
    out.loss = masked.sum() * in.share / static_cast<double>(N * opt_.sampling.max_new_tokens);
  else out.loss = masked.sum() / in.step_response_tokens;      // dapo

  torch::NoGradGuard ng;
  const auto tokens = mask.sum().clamp_min(1);
  const auto rows = in.rewards.slice(0, in.row_begin, in.row_begin + N).to(torch::kFloat32);
  out.metrics["reward/mean"] = rows.mean() * in.share;
  out.metrics["reward/std"] = in.rewards.to(torch::kFloat32).view({-1, in.group_size}).std(1, true).mean() * in.share;
  out.metrics["completion_length"] = lengths.mean() * in.share;
  const auto is_clipped = ((ratio < 1 - opt_.epsilon) & (a < 0)) | ((ratio > 1 + hi) & (a > 0));
  out.metrics["clip_ratio"] = (is_clipped.to(torch::kFloat32) * mask).sum() / tokens * in.share;
  if (k3.defined()) out.metrics["kl"] = (k3 * mask).sum() / tokens * in.share;
  return out;
}

TRIALIGN_REGISTER(preference_losses(), "grpo",
                  "GRPO on sampled completions scored by reward functions; clipped ratio, k3 KL, four token "
                  "aggregations",
                  [](ConfigReader& r) -> std::shared_ptr<PreferenceLossImpl> {
                    GrpoOptions o;
                    o.fields(r);
                    return std::make_shared<GrpoLossImpl>(o);
                  });

}  // namespace trialign
