#include "models/clip_layers.h"

#include "models/fast_ops.h"
#include "models/recompute.h"

#include <cmath>

namespace trialign {

namespace {

// x [B, T, D] at one row per sample, rows [B] -> [B, 1, D]
torch::Tensor gather_rows(const torch::Tensor& x, const torch::Tensor& rows) {
  return x.gather(1, rows.view({-1, 1, 1}).expand({x.size(0), 1, x.size(2)}));
}

}  // namespace

torch::Tensor apply_activation(const std::string& name, const torch::Tensor& x) {
  if (name == "quick_gelu") return quick_gelu(x);  // x * sigmoid(1.702 x), one pass each way in fp32
  return torch::gelu(x);
}

ClipAttentionImpl::ClipAttentionImpl(const ClipBlockConfig& c)
    : heads_(c.num_attention_heads), head_dim_(c.hidden_size / c.num_attention_heads) {
  TORCH_CHECK(c.hidden_size % c.num_attention_heads == 0, "ClipAttention: hidden_size ", c.hidden_size,
              " not divisible by ", c.num_attention_heads, " heads");
  q_proj = register_module("q_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
  k_proj = register_module("k_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
  v_proj = register_module("v_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
  out_proj = register_module("out_proj", torch::nn::Linear(c.hidden_size, c.hidden_size));
}

torch::Tensor ClipAttentionImpl::attend(const torch::Tensor& xq, const torch::Tensor& x, const torch::Tensor& mask) {
  const auto B = x.size(0), Tq = xq.size(1);
  // [B, T, D] -> [B, H, T, Dh]
  auto split = [&](const torch::Tensor& t) { return t.view({B, t.size(1), heads_, head_dim_}).transpose(1, 2); };
  auto q = split(q_proj(xq)), k = split(k_proj(x)), v = split(v_proj(x));
  auto attn = attention_softmax(torch::matmul(q, k.transpose(-2, -1)), 1.0 / std::sqrt(static_cast<double>(head_dim_)),
                                mask);  // [B, H, Tq, T], in the scores' dtype
  auto out = torch::matmul(attn, v).transpose(1, 2).reshape({B, Tq, heads_ * head_dim_});
  return out_proj(out);
}

torch::Tensor ClipAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) { return attend(x, x, mask); }

torch::Tensor ClipAttentionImpl::forward_rows(const torch::Tensor& x, const torch::Tensor& row_mask,
                                              const torch::Tensor& rows) {
  return attend(gather_rows(x, rows), x, row_mask);
}

ClipMlpImpl::ClipMlpImpl(const ClipBlockConfig& c) : act_(c.hidden_act) {
  fc1 = register_module("fc1", torch::nn::Linear(c.hidden_size, c.intermediate_size));
  fc2 = register_module("fc2", torch::nn::Linear(c.intermediate_size, c.hidden_size));
}

torch::Tensor ClipMlpImpl::forward(const torch::Tensor& x) { return fc2(apply_activation(act_, fc1(x))); }

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const ClipBlockConfig& c) {
  auto ln = [&] {
    return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size}).eps(c.layer_norm_eps));
  };
  self_attn = register_module("self_attn", ClipAttention(c));
  layer_norm1 = register_module("layer_norm1", ln());
  mlp = register_module("mlp", ClipMlp(c));
  layer_norm2 = register_module("layer_norm2", ln());
}

torch::Tensor ClipEncoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) {
  auto h = x + self_attn(layer_norm1(x), mask);
  return h + mlp(layer_norm2(h));
}

torch::Tensor ClipEncoderLayerImpl::forward_rows(const torch::Tensor& x, const torch::Tensor& mask,
                                                 const torch::Tensor& rows) {
  const auto B = x.size(0), T = x.size(1);
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == B && rows.scalar_type() == torch::kLong && rows.device() == x.device(),
              "forward_rows: rows must be int64 [", B, "] on ", x.device(), ", got ", rows.scalar_type(), " ",
              rows.sizes(), " on ", rows.device());
  torch::Tensor row_mask;  // [T, T] -> the rows' own lines, [B, 1, 1, T]
  if (mask.defined()) {
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == T && mask.size(1) == T, "forward_rows: mask must be [", T, ", ", T,
                "], got ", mask.sizes());
    row_mask = mask.index_select(0, rows).view({B, 1, 1, T});
  }
  auto h = gather_rows(x, rows) + self_attn->forward_rows(layer_norm1(x), row_mask, rows);  // [B, 1, D]
  return h + mlp(layer_norm2(h));
}

ClipEncoderImpl::ClipEncoderImpl(const ClipBlockConfig& c, int num_layers) : recompute_(c.gradient_checkpointing) {
  layers = register_module("layers", torch::nn::ModuleList());
  for (int i = 0; i < num_layers; ++i) layers->push_back(ClipEncoderLayer(c));
}

torch::Tensor ClipEncoderImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                       std::vector<torch::Tensor>* hidden_states, int64_t num_layers) {
  auto h = x;
  if (hidden_states) hidden_states->push_back(h);
  const int64_t n = num_layers < 0 ? static_cast<int64_t>(layers->size()) : std::min<int64_t>(num_layers, layers->size());
  for (int64_t i = 0; i < n; ++i) {
    auto* l = layers[i]->as<ClipEncoderLayer>();
    h = recompute_ ? checkpointed([l, mask](const torch::Tensor& in) { return l->forward(in, mask); }, h, *l)
                   : l->forward(h, mask);
    if (hidden_states) hidden_states->push_back(h);
  }
  return h;
}

torch::Tensor ClipEncoderImpl::forward_rows(const torch::Tensor& x, const torch::Tensor& mask, const torch::Tensor& rows) {
  const int64_t n = static_cast<int64_t>(layers->size());
  if (n == 0) return gather_rows(x, rows).squeeze(1);
  auto h = forward(x, mask, nullptr, n - 1);
  auto* last = layers[n - 1]->as<ClipEncoderLayer>();
  auto top = [last, mask, rows](const torch::Tensor& in) { return last->forward_rows(in, mask, rows); };
  return (recompute_ ? checkpointed(top, h, *last) : top(h)).squeeze(1);  // [B, D]
}

}  // namespace trialign
