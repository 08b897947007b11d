#include "losses/cross_entropy.h"

namespace trialign {

LossOutput CrossEntropyLossImpl::forward(const TokenLossInputs& in) {
  TORCH_CHECK(in.logits.dim() == 2 && in.targets.dim() == 1 && in.logits.size(0) == in.targets.size(0),
              "cross_entropy: logits [n, V] and targets [n] expected, got ", in.logits.sizes(), " and ",
              in.targets.sizes());
  namespace F = torch::nn::functional;
  auto logits = in.logits.to(torch::kFloat32);
  LossOutput out;
  out.loss = F::cross_entropy(logits, in.targets,
                              F::CrossEntropyFuncOptions().reduction(torch::kSum).label_smoothing(opt_.label_smoothing)) /
             in.normaliser;
  torch::NoGradGuard ng;
  out.metrics["acc/token"] = (logits.argmax(1) == in.targets).sum().to(torch::kFloat32) / in.normaliser;
  return out;
}

TRIALIGN_REGISTER(lm_losses(), "cross_entropy", "token-level cross-entropy over the reply tokens of the step",
                  [](ConfigReader& r) -> std::shared_ptr<LmLossImpl> {
                    CrossEntropyOptions o;
                    o.fields(r);
                    return std::make_shared<CrossEntropyLossImpl>(o);
                  });

}  // namespace trialign
