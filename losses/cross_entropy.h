// Token-level cross-entropy for stages 2-3: the mean negative log-likelihood of the target
// tokens (assistant replies and their eos; everything else carries label -100 and never
// reaches the loss), normalised by the target count of the whole optimizer step.
//   loss = -(1 / N_step) * sum_i log softmax(logits_i)[target_i]
// With label_smoothing e the target distribution is (1 - e) one-hot + e / V uniform.
// Metrics (additive over micro-batches): "acc/token", the share of targets that are the argmax.
#pragma once
#include "losses/loss.h"

namespace trialign {

struct CrossEntropyOptions {
  double label_smoothing = 0.0;
  template <class V> void fields(V& v) { v("label_smoothing", label_smoothing, in_range(0.0, 1.0)); }
};

class CrossEntropyLossImpl : public LmLossImpl {
 public:
  explicit CrossEntropyLossImpl(const CrossEntropyOptions& o) : opt_(o) {}
  LossOutput forward(const TokenLossInputs& in) override;

 private:
  CrossEntropyOptions opt_;
};

}  // namespace trialign
