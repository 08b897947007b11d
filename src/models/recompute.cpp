#include "models/recompute.h"

#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

namespace trialign {

namespace {

// Autocast caches the bf16 copy of each fp32 weight for the rest of its scope, whether or not grad
// mode is on. The no-grad forward of a checkpointed block would leave graph-less copies there for
// the recompute to reuse, and the weights would get no gradient: both passes run without the cache.
struct NoAutocastCache {
  bool prev = at::autocast::is_autocast_cache_enabled();
  NoAutocastCache() { at::autocast::set_autocast_cache_enabled(false); }
  ~NoAutocastCache() { at::autocast::set_autocast_cache_enabled(prev); }
};

// The backward node of a checkpointed block: recompute with a graph, then back-propagate the
// incoming gradient through it. The inner backward is re-entrant (the engine allows it); it
// accumulates the parameters' gradients directly, and x's gradient is what the node returns.
struct RecomputeBackward : torch::autograd::Node {
  std::function<torch::Tensor(const torch::Tensor&)> fn;
  torch::Tensor input;
  bool input_grad = false, autocast = false;
  at::ScalarType autocast_dtype = at::kBFloat16;

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(input.defined(), "checkpointed block: backward called twice (retain_graph is not supported)");
    if (!grads[0].defined()) return {torch::Tensor()};  // the block's output got no gradient
    const bool prev = at::autocast::is_cpu_enabled();
    const auto prev_dtype = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_cpu_enabled(autocast);
    at::autocast::set_autocast_cpu_dtype(autocast_dtype);
    torch::Tensor x, y;
    {
      torch::AutoGradMode grad_on(true);
      NoAutocastCache no_cache;
      x = input.detach().requires_grad_(input_grad);
      y = fn(x);
    }
    at::autocast::set_cpu_enabled(prev);
    at::autocast::set_autocast_cpu_dtype(prev_dtype);
    torch::autograd::backward({y}, {grads[0]});
    input.reset();
    return {input_grad ? x.grad() : torch::Tensor()};
  }
  void release_variables() override { input.reset(); }
};

}  // namespace

torch::Tensor checkpointed(const std::function<torch::Tensor(const torch::Tensor&)>& fn, const torch::Tensor& x,
                           const torch::nn::Module& module) {
  bool params_grad = false;
  for (const auto& p : module.parameters()) params_grad = params_grad || p.requires_grad();
  if (!torch::GradMode::is_enabled() || (!x.requires_grad() && !params_grad)) return fn(x);
  torch::Tensor y;
  {
    torch::NoGradGuard no_graph;
    NoAutocastCache no_cache;
    y = fn(x);
  }
  auto node = std::shared_ptr<RecomputeBackward>(new RecomputeBackward(), torch::autograd::deleteNode);
  node->fn = fn;
  node->input = x.detach();
  node->input_grad = x.requires_grad();
  node->autocast = at::autocast::is_cpu_enabled();
  node->autocast_dtype = at::autocast::get_autocast_cpu_dtype();
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  torch::autograd::set_history(y, node);
  return y;
}

}  // namespace trialign
