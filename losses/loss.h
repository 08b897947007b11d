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

}  // namespace trialign
