// Vision-to-language projectors (stage 2 trains only these, LLaVA's "feature alignment").
// Registered by `type:` in `model.projector`:
//   linear      one Linear, LLaVA-1 (Liu et al. 2023)          names: weight, bias
//               (linear and mlp2x_gelu take `spatial_merge: k`: each k x k block of the patch
//               grid is concatenated into one token of width k^2 * Dv first, "pixel shuffle" as
//               in InternVL (Chen et al. 2024): k^2 times fewer visual tokens, nothing averaged
//               away, so shapes spread over neighbouring patches survive)
//   mlp2x_gelu  Linear, GELU, Linear, LLaVA-1.5                 names: 0.weight, 0.bias, 2.weight, 2.bias
//   resampler   learned queries with cross-attention (Perceiver Resampler, Alayrac et al. 2022;
//               Q-Former-style): a fixed number of visual tokens whatever the patch count.
// Under the VLM they sit at `mm_projector.*`, as in LLaVA checkpoints.
#pragma once
#include <torch/torch.h>

#include "core/registry.h"

namespace trialign {

struct ProjectorDims {
  int vision_hidden = 0;  // width of the vision features, Dv
  int llm_hidden = 0;     // width of the language model, H
};

class ProjectorImpl : public torch::nn::Module {
 public:
  // features: [B, P, Dv] patch features (CLS already dropped) -> [B, N, H] visual tokens.
  virtual torch::Tensor forward(const torch::Tensor& features) = 0;
  // N for P input patches (P for the per-token projectors, fixed for the resampler).
  virtual int64_t num_tokens(int64_t patches) const = 0;
};

struct PerPatchOptions {
  int spatial_merge = 1;  // concatenate k x k neighbouring patches into one token
  // "sincos2d": add a fixed 2-D sine-cosine code of each token's grid (row, column) to its
  // features before projecting, so the language model (rotary positions only, over a raster
  // sequence) can read where a token sits; "none" (LLaVA) relies on the vision tower.
  std::string position_encoding = "none";
  template <class V> void fields(V& v) {
    v("spatial_merge", spatial_merge, at_least(1));
    v("position_encoding", position_encoding, one_of({"none", "sincos2d"}));
  }
};

// [B, P, D] features of a square s x s patch grid (row-major) -> [B, (s/k)^2, k^2 * D]: token
// (r, c) holds patches (k r + i, k c + j), i, j < k, in row-major order, concatenated.
// Throws ConfigError when P is not a square or s is not a multiple of k.
torch::Tensor merge_patches(const torch::Tensor& features, int k);
int64_t merged_tokens(int64_t patches, int k);
// [side * side, dim] fixed 2-D sine-cosine code of a row-major grid (row in the first half of the
// channels, column in the second), float32 then cast to opts.
torch::Tensor sincos_2d(int64_t side, int64_t dim, const torch::TensorOptions& opts);

using ProjectorRegistry = Registry<ProjectorImpl, ProjectorDims>;
ProjectorRegistry& projectors();

struct ResamplerOptions {
  int num_queries = 16;  // visual tokens out
  int hidden_size = 0;   // internal width; 0 = the vision width
  int num_layers = 2;
  int num_heads = 4;
  template <class V> void fields(V& v) {
    v("num_queries", num_queries, at_least(1));
    v("hidden_size", hidden_size, at_least(0));
    v("num_layers", num_layers, at_least(1));
    v("num_heads", num_heads, at_least(1));
  }
};

// One resampler block: queries <- queries + attn(ln_q(queries), ln_kv(features)), then
// queries <- queries + mlp(ln_mlp(queries)).
class ResamplerLayerImpl : public torch::nn::Module {
 public:
  ResamplerLayerImpl(int dim, int heads);
  torch::Tensor forward(const torch::Tensor& queries, const torch::Tensor& features);  // [B,N,D], [B,P,D]
  torch::nn::LayerNorm ln_q{nullptr}, ln_kv{nullptr}, ln_mlp{nullptr};
  torch::nn::MultiheadAttention cross_attn{nullptr};
  torch::nn::Sequential mlp{nullptr};
};
TORCH_MODULE(ResamplerLayer);

class ResamplerImpl : public ProjectorImpl {
 public:
  ResamplerImpl(const ResamplerOptions& o, const ProjectorDims& d);
  torch::Tensor forward(const torch::Tensor& features) override;
  int64_t num_tokens(int64_t) const override { return opt_.num_queries; }
  torch::Tensor query;                  // [N, D] learned queries
  torch::nn::Linear in_proj{nullptr};   // Dv -> D
  torch::nn::ModuleList layers;
  torch::nn::LayerNorm ln_out{nullptr};
  torch::nn::Linear out_proj{nullptr};  // D -> H

 private:
  ResamplerOptions opt_;
};

}  // namespace trialign
