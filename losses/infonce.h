// InfoNCE / CLIP contrastive loss (Radford et al. 2021, "Learning Transferable Visual Models From
// Natural Language Supervision").
//
//   logits = exp(s) * I T^T                      I, T: [N, E] unit-norm embeddings, s learnable
//   loss   = ( CE(logits, arange N) + CE(logits^T, arange N) ) / 2
//
// With hard negatives H [M, E] (NegCLIP, Yuksekgonul et al. 2023) the image->text term ranks
// each image's caption among all N captions and the M negatives, CE(exp(s) I [T; H]^T, arange N);
// the text->image term is unchanged (a negative caption has no image of its own).
//
// s starts at ln(1/0.07) = 2.6593 and is clamped to [0, ln 100] after every optimizer step
// (post_step), as in the paper. Metrics: logit_scale (= exp s), acc/i2t, acc/t2i.
#pragma once
#include "losses/loss.h"

namespace trialign {

struct InfoNceOptions {
  double init_logit_scale = 2.659260036932778;  // ln(1 / 0.07)
  double max_logit_scale = 4.605170185988092;   // ln(100)
  bool learnable = true;
  template <class V> void fields(V& v) {
    v("init_logit_scale", init_logit_scale);
    v("max_logit_scale", max_logit_scale, positive());
    v("learnable", learnable);
  }
};

class InfoNceLossImpl : public ContrastiveLossImpl {
 public:
  explicit InfoNceLossImpl(const InfoNceOptions& o);
  LossOutput forward(const ContrastiveInputs& in) override;
  void post_step() override;
  std::map<std::string, std::string> hf_names() const override { return {{"logit_scale", "logit_scale"}}; }
  torch::Tensor logit_scale;  // scalar, log of the inverse temperature

 private:
  InfoNceOptions opt_;
};

}  // namespace trialign
