// Linear layers called through at::linear rather than torch::nn::Linear's forward.
#pragma once

#include <torch/torch.h>

namespace trialign {

// torch::nn::Linear's forward (LibTorch 1.13) does matmul then `out += bias` for inputs of more
// than two dims. Under CPU bf16 autocast that adds the fp32 bias into the bf16 output through a
// per-element casting loop, about 100x slower than the same add in bf16 (72 vs 0.6 ms for a
// [64, 65, 1024] output on 2 cores: docs/benchmarks.md). at::linear is itself an autocast op: it
// casts the bias with the weight and fuses the add into the GEMM (addmm) for contiguous input.
// x: [..., in] -> [..., out]; fp32 results equal the module's up to summation order.
inline torch::Tensor linear(const torch::nn::LinearImpl& l, const torch::Tensor& x) {
  return torch::linear(x, l.weight, l.bias);
}
inline torch::Tensor linear(const torch::nn::Linear& l, const torch::Tensor& x) { return linear(*l, x); }

}  // namespace trialign
