#include "models/projector.h"

#include <cmath>

#include "core/errors.h"

namespace trialign {

ProjectorRegistry& projectors() {
  static ProjectorRegistry registry("projector");
  return registry;
}

int64_t merged_tokens(int64_t patches, int k) {
  const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(patches))));
  if (side * side != patches || side % k != 0)
    throw ConfigError("model.projector.spatial_merge: " + std::to_string(k) + " does not divide the " +
                      std::to_string(side) + " x " + std::to_string(side) + " patch grid (" + std::to_string(patches) +
                      " patches)");
  return (side / k) * (side / k);
}

torch::Tensor merge_patches(const torch::Tensor& f, int k) {
  if (k == 1) return f;
  const int64_t B = f.size(0), P = f.size(1), D = f.size(2);
  merged_tokens(P, k);  // validates
  const int64_t side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(P)))), n = side / k;
  // [B, n, k, n, k, D] (row block, row in block, column block, column in block) -> blocks first.
  return f.reshape({B, n, k, n, k, D}).permute({0, 1, 3, 2, 4, 5}).reshape({B, n * n, k * k * D});
}

torch::Tensor sincos_2d(int64_t side, int64_t dim, const torch::TensorOptions& opts) {
  // MAE-style (He et al. 2022): the first half of the channels code the row, the second half the
  // column; each half is sin / cos pairs at wavelengths 2 pi * 10000^(2i / (dim / 2)).
  const int64_t half = dim / 2, pairs = half / 2;
  auto pos = torch::arange(side, torch::kFloat32);
  auto freq = torch::pow(10000.0, -torch::arange(pairs, torch::kFloat32) / std::max<int64_t>(pairs, 1));
  auto angle = pos.unsqueeze(1) * freq.unsqueeze(0);                   // [side, pairs]
  auto code = torch::cat({angle.sin(), angle.cos()}, 1);               // [side, 2 pairs]
  auto rows = code.unsqueeze(1).expand({side, side, 2 * pairs});       // token (r, c) -> code(r)
  auto cols = code.unsqueeze(0).expand({side, side, 2 * pairs});       // token (r, c) -> code(c)
  auto out = torch::zeros({side, side, dim}, torch::kFloat32);        // odd leftovers stay 0
  out.narrow(2, 0, 2 * pairs).copy_(rows);
  out.narrow(2, half, 2 * pairs).copy_(cols);
  return out.reshape({side * side, dim}).to(opts);
}

namespace {

// [B, N, D] merged tokens of a square grid, plus the grid code when asked. The code is built once
// per grid shape, dtype and device and kept in `cache` (not a buffer: it is derived, so checkpoints
// do not hold it).
torch::Tensor with_positions(const torch::Tensor& tokens, const PerPatchOptions& o, torch::Tensor& cache) {
  if (o.position_encoding == "none") return tokens;
  if (!cache.defined() || cache.size(0) != tokens.size(1) || cache.size(1) != tokens.size(2) ||
      cache.dtype() != tokens.dtype() || cache.device() != tokens.device()) {
    const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(tokens.size(1)))));
    cache = sincos_2d(side, tokens.size(2), tokens.options());
  }
  return tokens + cache.unsqueeze(0);
}

// LLaVA-1: one Linear, Dv -> H per patch.
class LinearProjectorImpl : public ProjectorImpl {
 public:
  LinearProjectorImpl(const ProjectorDims& d, const PerPatchOptions& o) : o_(o), k_(o.spatial_merge) {
    // Registered as this module's own weight/bias so the names are `mm_projector.weight`.
    torch::nn::Linear lin(d.vision_hidden * o.spatial_merge * o.spatial_merge, d.llm_hidden);
    weight = register_parameter("weight", lin->weight.detach().clone());
    bias = register_parameter("bias", lin->bias.detach().clone());
  }
  torch::Tensor forward(const torch::Tensor& f) override {
    return torch::nn::functional::linear(with_positions(merge_patches(f, k_), o_, code_), weight, bias);
  }
  int64_t num_tokens(int64_t patches) const override { return merged_tokens(patches, k_); }
  torch::Tensor weight, bias;

 private:
  PerPatchOptions o_;
  torch::Tensor code_;  // the grid code, built on first use
  int k_;
};

// LLaVA-1.5: Linear(Dv, H), GELU, Linear(H, H); children "0" and "2" as in nn.Sequential.
class Mlp2xGeluImpl : public ProjectorImpl {
 public:
  Mlp2xGeluImpl(const ProjectorDims& d, const PerPatchOptions& o) : o_(o), k_(o.spatial_merge) {
    fc0 = register_module("0", torch::nn::Linear(d.vision_hidden * o.spatial_merge * o.spatial_merge, d.llm_hidden));
    fc2 = register_module("2", torch::nn::Linear(d.llm_hidden, d.llm_hidden));
  }
  torch::Tensor forward(const torch::Tensor& f) override {
    return fc2(torch::gelu(fc0(with_positions(merge_patches(f, k_), o_, code_))));
  }
  int64_t num_tokens(int64_t patches) const override { return merged_tokens(patches, k_); }
  torch::nn::Linear fc0{nullptr}, fc2{nullptr};

 private:
  PerPatchOptions o_;
  torch::Tensor code_;  // the grid code, built on first use
  int k_;
};

TRIALIGN_REGISTER(projectors(), "linear", "one Linear per patch (LLaVA-1)",
                  [](ConfigReader& r, ProjectorDims d) -> std::shared_ptr<ProjectorImpl> {
                    PerPatchOptions o;
                    o.fields(r);
                    return std::make_shared<LinearProjectorImpl>(d, o);
                  });
TRIALIGN_REGISTER(projectors(), "mlp2x_gelu", "Linear, GELU, Linear per patch (LLaVA-1.5)",
                  [](ConfigReader& r, ProjectorDims d) -> std::shared_ptr<ProjectorImpl> {
                    PerPatchOptions o;
                    o.fields(r);
                    return std::make_shared<Mlp2xGeluImpl>(d, o);
                  });
TRIALIGN_REGISTER(projectors(), "resampler", "learned queries + cross-attention, a fixed number of tokens",
                  [](ConfigReader& r, ProjectorDims d) -> std::shared_ptr<ProjectorImpl> {
                    ResamplerOptions o;
                    o.fields(r);
                    const int dim = o.hidden_size > 0 ? o.hidden_size : d.vision_hidden;
                    if (dim % o.num_heads != 0)
                      throw ConfigError("resampler width " + std::to_string(dim) + " is not divisible by num_heads " +
                                        std::to_string(o.num_heads));
                    return std::make_shared<ResamplerImpl>(o, d);
                  });

}  // namespace

ResamplerLayerImpl::ResamplerLayerImpl(int dim, int heads) {
  auto ln = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})); };
  ln_q = register_module("ln_q", ln());
  ln_kv = register_module("ln_kv", ln());
  cross_attn = register_module("cross_attn", torch::nn::MultiheadAttention(torch::nn::MultiheadAttentionOptions(dim, heads)));
  ln_mlp = register_module("ln_mlp", ln());
  mlp = register_module("mlp", torch::nn::Sequential(torch::nn::Linear(dim, 4 * dim), torch::nn::GELU(),
                                                      torch::nn::Linear(4 * dim, dim)));
}

torch::Tensor ResamplerLayerImpl::forward(const torch::Tensor& queries, const torch::Tensor& features) {
  // MultiheadAttention takes [L, B, D].
  auto q = ln_q(queries).transpose(0, 1), kv = ln_kv(features).transpose(0, 1);
  auto attended = std::get<0>(cross_attn(q, kv, kv)).transpose(0, 1);  // [B, N, D]
  auto h = queries + attended;
  return h + mlp->forward(ln_mlp(h));
}

ResamplerImpl::ResamplerImpl(const ResamplerOptions& o, const ProjectorDims& d) : opt_(o) {
  const int dim = o.hidden_size > 0 ? o.hidden_size : d.vision_hidden;
  query = register_parameter("query", torch::randn({o.num_queries, dim}) * 0.02);
  in_proj = register_module("in_proj", torch::nn::Linear(d.vision_hidden, dim));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int i = 0; i < o.num_layers; ++i) layers->push_back(ResamplerLayer(dim, o.num_heads));
  ln_out = register_module("ln_out", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim})));
  out_proj = register_module("out_proj", torch::nn::Linear(dim, d.llm_hidden));
}

torch::Tensor ResamplerImpl::forward(const torch::Tensor& features) {
  const auto B = features.size(0);
  auto kv = in_proj(features);                                  // [B, P, D]
  auto q = query.unsqueeze(0).expand({B, query.size(0), query.size(1)});  // [B, N, D]
  for (const auto& layer : *layers) q = layer->as<ResamplerLayer>()->forward(q, kv);
  return out_proj(ln_out(q));                                    // [B, N, H]
}

}  // namespace trialign
