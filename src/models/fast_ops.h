// CPU kernels for element-wise work that LibTorch's composite ops spread over several passes
// (docs/benchmarks.md, "The stage-1 card: less work per step" and "The stage-3 and DPO cards: the
// LLM's last layer on the loss rows"). Each gives LibTorch's values to
// within float rounding and falls back to the composite ops for anything else (bf16 under
// autocast, CUDA), so bf16 runs compute exactly as before. TRIALIGN_FAST_OPS=0 in the
// environment turns them off, to compare.
#pragma once
#include <torch/torch.h>

namespace trialign {

// CLIP's quick-GELU, x * sigmoid(1.702 x), in one pass forward and one backward, for fp32 CPU
// tensors (the composite takes three element-wise passes forward and five back over
// [tokens, intermediate]: 2.5x the time of these on the stage-1 card's [4160, 1024]).
torch::Tensor quick_gelu(const torch::Tensor& x);

// LLaMA's SwiGLU gate, silu(gate) * up, in one pass forward and one backward for fp32 CPU tensors
// of one shape (the composite takes two passes forward and four back over [tokens, intermediate],
// and keeps silu(gate) as well for backward).
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

// LLaMA's RMSNorm, x / sqrt(mean(x^2) + eps) * weight over the last dimension, in one pass over x
// forward and one back for fp32 CPU tensors (the composite takes five element-wise passes
// forward and about ten back). x: [..., D], weight: [D]. The weight's gradient is summed over
// fixed blocks of rows in order, so it does not depend on the thread count.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

}  // namespace trialign
