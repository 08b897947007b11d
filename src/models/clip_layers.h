// Transformer blocks in the CLIP layout shared by the vision and text encoders. Parameter names
// follow Hugging Face's CLIPEncoderLayer: self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1/fc2,
// layer_norm2, so `encoder.layers.3.mlp.fc1.weight` means the same thing here and there.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/run_config.h"

namespace trialign {

// hidden_act: "quick_gelu" is CLIP's x * sigmoid(1.702 x), "gelu" the exact one.
using ClipBlockConfig = TowerDims;

torch::Tensor apply_activation(const std::string& name, const torch::Tensor& x);

class ClipAttentionImpl : public torch::nn::Module {
 public:
  explicit ClipAttentionImpl(const ClipBlockConfig& c);
  // x: [B, T, D]; mask: additive [T, T] or [B, 1, T, T] (0 keep, -inf drop), or undefined.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {});

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};

 private:
  int heads_, head_dim_;
};
TORCH_MODULE(ClipAttention);

class ClipMlpImpl : public torch::nn::Module {
 public:
  explicit ClipMlpImpl(const ClipBlockConfig& c);
  torch::Tensor forward(const torch::Tensor& x);  // [B, T, D] -> [B, T, D]
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};

 private:
  std::string act_;
};
TORCH_MODULE(ClipMlp);

// Pre-LN residual block: x + attn(ln1(x)), then + mlp(ln2(x)).
class ClipEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit ClipEncoderLayerImpl(const ClipBlockConfig& c);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {});
  ClipAttention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  ClipMlp mlp{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

// `encoder.layers.{i}`. Returns the output of the last layer, and optionally every layer's
// output (hidden_states[0] = input embeddings, as Hugging Face counts them) for feature taps.
class ClipEncoderImpl : public torch::nn::Module {
 public:
  ClipEncoderImpl(const ClipBlockConfig& c, int num_layers);
  // num_layers >= 0: only the first num_layers layers run (a feature tap below the top).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        std::vector<torch::Tensor>* hidden_states = nullptr, int64_t num_layers = -1);
  torch::nn::ModuleList layers;

 private:
  bool recompute_ = false;  // gradient_checkpointing
};
TORCH_MODULE(ClipEncoder);

}  // namespace trialign
