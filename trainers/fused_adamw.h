// AdamW with the update of each parameter done in one pass over memory.
//
// LibTorch's AdamW::step runs nine element-wise ops per parameter (decay, two moment updates
// with two ops each, sqrt, divide, add eps, addcdiv) and allocates two parameter-sized
// temporaries, so it streams each fp32 parameter through memory about 22 times: 84-88 ms a step
// for the 21.8 M weights of the stage-3 bench card on 2 cores (docs/benchmarks.md). This
// class computes the same per-element formula in one pass (read p, g, m, v; write p, m, v),
// rounding each operation as LibTorch's kernels do, so the weights it produces are the ones
// LibTorch's AdamW produces: bit for bit on an x86 CPU with AVX2+FMA (tests/test_fused_adamw.cpp
// compares them; docs/benchmarks.md has the end-to-end check). On other architectures the plain
// copy may differ from LibTorch's vector kernels in the last bit.
//
// It is a torch::optim::AdamW: options, param groups and AdamWParamState are LibTorch's, so
// checkpoints, set_lr and the optimizer-state files work unchanged.
//
// release_grads() drops the gradients instead of zeroing them (backward then stores the first
// gradient instead of adding it to zeros: one memset and one add pass less per parameter). A
// parameter that had a gradient before and gets none this step is updated as if its gradient
// were zero, which is what zero_grad() followed by step() does.
// Such a parameter adds nothing to the gradient-norm sum instead of a 0, which can change
// that sum's last bit (summation order), so only runs where every step reaches every trained
// parameter (all the shipped configs) are bit-identical to zero_grad() ones.
#pragma once
#include <torch/torch.h>

#include <unordered_set>

namespace trialign {

class FusedAdamW : public torch::optim::AdamW {
 public:
  explicit FusedAdamW(std::vector<torch::optim::OptimizerParamGroup> groups)
      : torch::optim::AdamW(std::move(groups)) {}

  torch::Tensor step(LossClosure closure = nullptr) override;

  // Sets every parameter's gradient to undefined (see above); call where zero_grad() was.
  void release_grads();

  // How many parameters the last step() updated in one pass (the others took LibTorch's ops).
  int64_t one_pass_updates() const { return one_pass_updates_; }

 private:
  int64_t one_pass_updates_ = 0;
  std::unordered_set<const c10::TensorImpl*> had_grad_;  // parameters whose gradient was released
};

}  // namespace trialign
