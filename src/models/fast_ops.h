// Two CPU kernels where LibTorch's composite ops spend the most on the towers' steps in fp32
// (profile in docs/benchmarks.md, "The stage-1 card: less work per step"). Both give LibTorch's
// values to within float rounding and fall back to the composite ops for anything else (bf16
// under autocast, CUDA, a BLAS without cblas_sgemm), so bf16 runs compute exactly as before.
#pragma once
#include <torch/torch.h>

namespace trialign {

// CLIP's quick-GELU, x * sigmoid(1.702 x), as one pass forward and one backward (the composite
// takes three element-wise passes forward and five back over [tokens, intermediate]).
torch::Tensor quick_gelu(const torch::Tensor& x);

// torch::matmul(a, b) for the attention products, a [B, H, M, K] and b [B, H, K, N] -> [B, H, M, N].
// LibTorch 1.13 multiplies fp32 batches one matrix at a time, each a GEMM threaded over its own
// tiny matrix plus several tensor ops of bookkeeping; this runs the B * H GEMMs on the run's
// threads at once, one single-threaded GEMM each, reading strided q/k/v views in place.
torch::Tensor attention_matmul(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace trialign
