#include "losses/infonce.h"

#include "core/errors.h"

namespace trialign {

InfoNceLossImpl::InfoNceLossImpl(const InfoNceOptions& o) : opt_(o) {
  logit_scale = register_parameter("logit_scale", torch::tensor(o.init_logit_scale, torch::kFloat32),
                                   /*requires_grad=*/o.learnable);
}

LossOutput InfoNceLossImpl::forward(const ContrastiveInputs& in) {
  const auto N = in.image_embeds.size(0);
  TORCH_CHECK(in.text_embeds.size(0) == N, "infonce: ", N, " image embeddings but ", in.text_embeds.size(0),
              " text embeddings");
  auto scale = logit_scale.exp();
  // This rank's N rows against every rank's columns (one process: all = local, offset 0).
  const auto texts = in.has_negatives() ? torch::cat({in.all_texts(), in.all_negatives()}) : in.all_texts();
  auto logits_i2t = scale * torch::matmul(in.image_embeds, texts.t());           // [N, N_all + M], row = image
  auto logits_t2i = scale * torch::matmul(in.text_embeds, in.all_images().t());  // [N, N_all], row = text
  auto labels = torch::arange(in.row_offset, in.row_offset + N,
                              torch::TensorOptions().dtype(torch::kLong).device(logits_i2t.device()));
  auto loss_i2t = torch::nn::functional::cross_entropy(logits_i2t, labels);
  auto loss_t2i = torch::nn::functional::cross_entropy(logits_t2i, labels);
  LossOutput out;
  out.loss = (loss_i2t + loss_t2i) / 2;
  torch::NoGradGuard ng;
  out.metrics["logit_scale"] = scale.detach();
  out.metrics["acc/i2t"] = (logits_i2t.argmax(1) == labels).to(torch::kFloat32).mean();
  out.metrics["acc/t2i"] = (logits_t2i.argmax(1) == labels).to(torch::kFloat32).mean();
  return out;
}

void InfoNceLossImpl::post_step() {
  torch::NoGradGuard ng;
  logit_scale.clamp_(0.0, opt_.max_logit_scale);
}

TRIALIGN_REGISTER(contrastive_losses(), "infonce",
                  "CLIP InfoNCE with a learnable temperature (Radford et al. 2021)",
                  [](ConfigReader& r) -> std::shared_ptr<ContrastiveLossImpl> {
                    InfoNceOptions o;
                    o.fields(r);
                    if (o.init_logit_scale > o.max_logit_scale || o.init_logit_scale < 0)
                      throw ConfigError("init_logit_scale " + std::to_string(o.init_logit_scale) +
                                        " must lie in [0, max_logit_scale = " + std::to_string(o.max_logit_scale) + "]");
                    if (o.max_logit_scale > 10)
                      throw ConfigError("max_logit_scale " + std::to_string(o.max_logit_scale) +
                                        " would allow exp(s) > 22000 and overflow the logits; CLIP uses ln 100 = 4.6052");
                    return std::make_shared<InfoNceLossImpl>(o);
                  });

}  // namespace trialign
