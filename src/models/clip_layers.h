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
  // The output at one query row per sample, rows [B] int64 -> [B, 1, D]. Keys and values come
  // from every token; row_mask is the additive mask of those rows, [B, 1, 1, T], or undefined.
  torch::Tensor forward_rows(const torch::Tensor& x, const torch::Tensor& row_mask, const torch::Tensor& rows);

  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};

 private:
  // Queries from xq [B, Tq, D], keys and values from x [B, T, D]; mask additive, broadcast to
  // [B, H, Tq, T], or undefined. -> [B, Tq, D]
  torch::Tensor attend(const torch::Tensor& xq, const torch::Tensor& x, const torch::Tensor& mask);
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
  // forward(x, mask) at one row per sample, rows [B] int64 -> [B, 1, D]: the same values, but the
  // query, out_proj and MLP run on B rows instead of B * T. mask: additive [T, T] or undefined.
  torch::Tensor forward_rows(const torch::Tensor& x, const torch::Tensor& mask, const torch::Tensor& rows);
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
  // forward(x, mask) read at one row per sample, rows [B] int64 -> [B, D], for a pooled tower
  // (CLS, or the text's end-of-text token). Every row of the last layer but those is never read,
  // so that layer runs on its keys and values and the B pooled rows only: for the bench card's
  // towers (4 layers) that is about a fifth of their forward and backward FLOPs saved.
  torch::Tensor forward_rows(const torch::Tensor& x, const torch::Tensor& mask, const torch::Tensor& rows);
  torch::nn::ModuleList layers;

 private:
  bool recompute_ = false;  // gradient_checkpointing
};
TORCH_MODULE(ClipEncoder);

}  // namespace trialign
