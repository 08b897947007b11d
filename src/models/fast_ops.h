// CPU kernels for element-wise work that LibTorch's composite ops spread over several passes
// (docs/benchmarks.md, "The stage-1 card: less work per step", "The stage-3 and DPO cards: the
// LLM's last layer on the loss rows" and "bf16 with AMX"). Each gives LibTorch's values to
// within float rounding and falls back to the composite ops for anything else (CUDA, double).
// The element-wise ones take fp32 or bf16 tensors (bf16 autocast's matmuls return bf16): bf16 is
// read, computed in fp32 and rounded once to nearest even, where the composite ops round after
// each op. TRIALIGN_FAST_OPS=0 in the environment turns them off, to compare.
#pragma once
#include <torch/torch.h>

namespace trialign {

// CLIP's quick-GELU, x * sigmoid(1.702 x), in one pass forward and one backward, for fp32 or bf16
// CPU tensors (the composite takes three element-wise passes forward and five back over
// [tokens, intermediate]: 2.5x the time of these on the stage-1 card's [4160, 1024]).
torch::Tensor quick_gelu(const torch::Tensor& x);

// LLaMA's SwiGLU gate, silu(gate) * up, in one pass forward and one backward for fp32 or bf16 CPU
// tensors of one shape and dtype (the composite takes two passes forward and four back over [tokens, intermediate],
// and keeps silu(gate) as well for backward).
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

// LLaMA's RMSNorm, x / sqrt(mean(x^2) + eps) * weight over the last dimension, in one pass over x
// forward and one back for fp32 CPU tensors, autocast or not (the composite takes five element-wise passes
// forward and about ten back). x: [..., D], weight: [D]. The weight's gradient is summed over
// fixed blocks of rows in order, so it does not depend on the thread count.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// Attention weights softmax(scores * scale + mask) over the last dimension, computed in fp32 and
// returned in the scores' dtype, in one pass over the scores forward and one back (the composite
// takes a scale, a mask add, two casts and the softmax each way under bf16 autocast). scores:
// [..., Tk] fp32 or bf16; mask: additive (0 / -inf), broadcastable to scores, no gradient, or
// undefined. A row whose keys are all masked is NaN, as with LibTorch's softmax.
torch::Tensor attention_softmax(const torch::Tensor& scores, double scale, const torch::Tensor& mask);

// Rotary position embedding x c + rotate_half(x) s, rotate_half(x) = [-x2, x1] over the halves of
// the head dimension, in one pass each way, computed in fp32 and returned contiguous in x's dtype
// (the composite takes two casts of the tables, a negation, a concatenation, two products and a
// sum, each way). rope_fits says whether the kernel takes these tensors: x [B, H, T, Dh] fp32 or
// bf16 on the CPU with unit stride over Dh (any strides above), cos / sin [B, T, Dh] fp32 without
// gradient; rope throws otherwise (llama's apply_rope then takes the composite ops).
bool rope_fits(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

}  // namespace trialign
