// SigLIP pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").
//
//   logits_ij = exp(t) * x_i . y_j + b           x, y: [N, E] unit-norm embeddings
//   loss      = -(1/N) sum_ij log sigmoid(z_ij logits_ij),  z_ij = +1 if i == j else -1
//
// Hard-negative captions H [M, E] add the N*M pairs (x_i, h_m), all with z = -1, to the sum.
// t starts at ln 10 and b at -10 (the paper's values, which offset the N^2 - N negatives).
// Metrics: logit_scale (= exp t), logit_bias, acc/i2t, acc/t2i.
#pragma once
#include "losses/loss.h"

namespace trialign {

struct SiglipOptions {
  double init_logit_scale = 2.302585092994046;  // ln 10
  double init_logit_bias = -10.0;
  template <class V> void fields(V& v) {
    v("init_logit_scale", init_logit_scale);
    v("init_logit_bias", init_logit_bias);
  }
};

class SiglipLossImpl : public ContrastiveLossImpl {
 public:
  explicit SiglipLossImpl(const SiglipOptions& o);
  LossOutput forward(const ContrastiveInputs& in) override;
  std::map<std::string, std::string> hf_names() const override {
    return {{"logit_scale", "logit_scale"}, {"logit_bias", "logit_bias"}};
  }
  torch::Tensor logit_scale, logit_bias;  // scalars
};

}  // namespace trialign
