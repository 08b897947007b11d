// Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"):
// a block's forward runs without keeping its intermediate activations; backward runs it again
// with a graph and back-propagates through that. Memory per block drops to its input; compute
// rises by one forward of the block. Enabled per tower by `gradient_checkpointing: true`
// (model.vision, model.text, model.llm).
#pragma once
#include <torch/torch.h>

#include <functional>

namespace trialign {

// fn(x) as if computed normally (same values, same gradients to x and to the parameters fn
// uses, accumulated into their .grad), keeping only x for backward. `module` owns the parameters
// fn uses: when neither x nor any of them requires grad, or grad mode is off, fn just runs.
// fn must be deterministic (no dropout): it is called twice. Autocast state at the forward is
// restored for the recomputation.
torch::Tensor checkpointed(const std::function<torch::Tensor(const torch::Tensor&)>& fn, const torch::Tensor& x,
                           const torch::nn::Module& module);

}  // namespace trialign
