#include "losses/mdpo.h"

namespace trialign {

namespace F = torch::nn::functional;

std::vector<ResponsePass> MdpoLossImpl::passes() const {
  return {{"policy", "chosen"},    {"policy", "rejected"},    {"policy", "chosen", true},
          {"reference", "chosen"}, {"reference", "rejected"}, {"reference", "chosen", true}};
}

torch::Tensor MdpoLossImpl::corrupt_images(const torch::Tensor& pixels, uint64_t seed) const {
  return random_resized_crop(pixels, opt_.min_area, opt_.max_area, seed);
}

LossOutput MdpoLossImpl::forward(const PreferenceInputs& in) {
  const auto pc = in.at("policy/chosen").sum(), pr = in.at("policy/rejected").sum();
  const auto pc_bad = in.at("policy/chosen/corrupted").sum();
  const auto rc = in.at("reference/chosen").sum().detach(), rr = in.at("reference/rejected").sum().detach();
  const auto rc_bad = in.at("reference/chosen/corrupted").sum().detach();
  const double b = opt_.beta;
  const auto dpo = -F::logsigmoid(b * ((pc - pr) - (rc - rr)));           // [B]
  auto conditional = -F::logsigmoid(b * ((pc - pc_bad) - (rc - rc_bad)));  // [B]
  if (in.image_conditional.defined())  // 0 for pairs whose chosen reply needs no image
    conditional = conditional * in.image_conditional.to(conditional.dtype());
  const auto anchor = -F::logsigmoid(b * (pc - rc) - opt_.delta);          // [B]
  LossOutput out;
  out.loss = (dpo + conditional + anchor).mean() * in.share;
  const auto chosen_rewards = b * (pc - rc), imageless = b * (pc_bad - rc_bad);
  add_reward_metrics(out, chosen_rewards, b * (pr - rr), pc, pr, in.share);
  torch::NoGradGuard ng;
  out.metrics["rewards/imageless_chosen"] = imageless.detach().mean() * in.share;
  out.metrics["rewards/imageless_margins"] = (chosen_rewards - imageless).detach().mean() * in.share;
  out.metrics["loss/dpo"] = dpo.detach().mean() * in.share;
  out.metrics["loss/conditional"] = conditional.detach().mean() * in.share;
  out.metrics["loss/anchor"] = anchor.detach().mean() * in.share;
  return out;
}

TRIALIGN_REGISTER(preference_losses(), "mdpo",
                  "mDPO: DPO + conditional image preference (corrupted image) + anchored preference",
                  [](ConfigReader& r) -> std::shared_ptr<PreferenceLossImpl> {
                    MdpoOptions o;
                    o.fields(r);
                    if (o.min_area > o.max_area)
                      throw ConfigError("min_area " + std::to_string(o.min_area) + " is above max_area " +
                                        std::to_string(o.max_area));
                    return std::make_shared<MdpoLossImpl>(o);
                  });

}  // namespace trialign
