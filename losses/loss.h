// The loss API shared by built-in losses and plugins.
//
// A loss returns LossOutput: the scalar to back-propagate plus named, detached metrics
// (e.g. "acc/i2t", "logit_scale") that the trainer logs. Losses may own parameters (InfoNCE's
// learnable temperature); the trainer adds them to the optimizer and saves them with the model.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>

#include "core/registry.h"

namespace trialign {

struct LossOutput {
  torch::Tensor loss;                           // scalar, requires grad
  std::map<std::string, torch::Tensor> metrics; // scalars, detached
};

// Inputs of a contrastive loss. Rows of image_embeds and text_embeds are pairs.
struct ContrastiveInputs {
  torch::Tensor image_embeds;  // [N, E], L2-normalised
  torch::Tensor text_embeds;   // [N, E], L2-normalised
  // Hard-negative captions (data.hard_negatives): extra texts that match no image, L2-normalised
  // [M, E]; undefined or M = 0 when the batch has none. They only ever count as negatives.
  torch::Tensor negative_text_embeds;
  bool has_negatives() const { return negative_text_embeds.defined() && negative_text_embeds.size(0) > 0; }
};

class ContrastiveLossImpl : public torch::nn::Module {
 public:
  virtual LossOutput forward(const ContrastiveInputs& in) = 0;
  // Called after every optimizer step (e.g. to clamp a learnable temperature).
  virtual void post_step() {}
  // Names of this loss's parameters as the Hugging Face CLIPModel calls them (for export).
  virtual std::map<std::string, std::string> hf_names() const { return {}; }
};

using ContrastiveLossRegistry = Registry<ContrastiveLossImpl>;
ContrastiveLossRegistry& contrastive_losses();

// Inputs of a token-level language-model loss (stages 2-3). Only the positions that carry a
// target are passed: logits[i] predicts targets[i].
struct TokenLossInputs {
  torch::Tensor logits;   // [n, V] fp32
  torch::Tensor targets;  // [n] int64
  // Target tokens in the whole optimizer step (all micro-batches together). A loss divides its
  // sum by this, so micro-batch losses add up to the loss of the full batch and accumulation
  // gives the one-big-batch gradient; additive metrics are shares of the step in the same way.
  double normaliser = 1;
};

class LmLossImpl : public torch::nn::Module {
 public:
  virtual LossOutput forward(const TokenLossInputs& in) = 0;
};

using LmLossRegistry = Registry<LmLossImpl>;
LmLossRegistry& lm_losses();

}  // namespace trialign
