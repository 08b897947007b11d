#include "losses/siglip.h"

#include <cmath>

#include "core/errors.h"

namespace trialign {

SiglipLossImpl::SiglipLossImpl(const SiglipOptions& o) {
  logit_scale = register_parameter("logit_scale", torch::tensor(o.init_logit_scale, torch::kFloat32));
  logit_bias = register_parameter("logit_bias", torch::tensor(o.init_logit_bias, torch::kFloat32));
}

LossOutput SiglipLossImpl::forward(const ContrastiveInputs& in) {
  const auto N = in.image_embeds.size(0);
  TORCH_CHECK(in.text_embeds.size(0) == N, "siglip: ", N, " image embeddings but ", in.text_embeds.size(0),
              " text embeddings");
  // This rank's N images against every rank's texts (one process: all = local, offset 0).
  const auto& texts = in.all_texts();
  auto logits = logit_scale.exp() * torch::matmul(in.image_embeds, texts.t()) + logit_bias;  // [N, N_all]
  auto z = -torch::ones_like(logits);                                                         // +1 on the pairs
  z.slice(1, in.row_offset, in.row_offset + N).diagonal().fill_(1);
  LossOutput out;
  out.loss = -torch::log_sigmoid(z * logits).sum() / N;
  if (in.has_negatives()) {  // every (image, hard negative) pair is one more negative pair
    auto neg = logit_scale.exp() * torch::matmul(in.image_embeds, in.all_negatives().t()) + logit_bias;  // [N, M]
    out.loss = out.loss - torch::log_sigmoid(-neg).sum() / N;
  }
  torch::NoGradGuard ng;
  auto labels = torch::arange(in.row_offset, in.row_offset + N,
                              torch::TensorOptions().dtype(torch::kLong).device(logits.device()));
  out.metrics["logit_scale"] = logit_scale.exp().detach();
  out.metrics["logit_bias"] = logit_bias.detach().clone();
  out.metrics["acc/i2t"] = (logits.argmax(1) == labels).to(torch::kFloat32).mean();
  auto t2i = torch::matmul(in.text_embeds, in.all_images().t());  // [N, N_all], row = text
  out.metrics["acc/t2i"] = (t2i.argmax(1) == labels).to(torch::kFloat32).mean();
  return out;
}

TRIALIGN_REGISTER(contrastive_losses(), "siglip", "SigLIP pairwise sigmoid loss (Zhai et al. 2023)",
                  [](ConfigReader& r) -> std::shared_ptr<ContrastiveLossImpl> {
                    SiglipOptions o;
                    o.fields(r);
                    if (std::abs(o.init_logit_scale) > 10 || std::abs(o.init_logit_bias) > 100)
                      throw ConfigError("init_logit_scale must be within [-10, 10] and init_logit_bias within "
                                        "[-100, 100] (the paper uses ln 10 and -10)");
                    return std::make_shared<SiglipLossImpl>(o);
                  });

}  // namespace trialign
