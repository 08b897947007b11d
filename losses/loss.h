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
  // Data parallel (core/distributed.h): every rank's rows, gathered with gradients flowing back
  // to their owner, and where this rank's rows start in them. A loss scores its own rows against
  // all of them ("local loss": labels are row_offset + arange(N)), so the ranks' mean losses
  // average to the one-process loss of the global batch. Undefined in one process: use the
  // accessors, which fall back to the local tensors.
  torch::Tensor all_image_embeds, all_text_embeds, all_negative_text_embeds;
  int64_t row_offset = 0;
  bool has_negatives() const { return all_negatives().defined() && all_negatives().size(0) > 0; }
  const torch::Tensor& all_images() const { return all_image_embeds.defined() ? all_image_embeds : image_embeds; }
  const torch::Tensor& all_texts() const { return all_text_embeds.defined() ? all_text_embeds : text_embeds; }
  const torch::Tensor& all_negatives() const {
    return all_negative_text_embeds.defined() ? all_negative_text_embeds : negative_text_embeds;
  }
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
