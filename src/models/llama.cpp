#include "models/llama.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/errors.h"
#include "models/fast_ops.h"
#include "models/recompute.h"

namespace trialign {

void check_llama_config(const LlamaConfig& c, const std::string& path) {
  auto fail = [&](const std::string& key, const std::string& msg) { throw ConfigError(path + "." + key + ": " + msg); };
  if (c.vocab_size <= 0) fail("vocab_size", "must be set (or left 0 to follow the tokenizer)");
  if (c.hidden_size % c.num_attention_heads != 0)
    fail("num_attention_heads", "hidden_size " + std::to_string(c.hidden_size) + " is not divisible by " +
                                    std::to_string(c.num_attention_heads) + " heads");
  if (c.num_attention_heads % c.kv_heads() != 0)
    fail("num_key_value_heads", std::to_string(c.num_attention_heads) + " attention heads are not a multiple of " +
                                    std::to_string(c.kv_heads()) + " key/value heads");
  if (c.head_dim() % 2 != 0) fail("hidden_size", "head dimension must be even for rotary embeddings");
}

namespace {
// x [B, T, D] at rows [B, R] int64 -> [B, R, D].
torch::Tensor gather_rows(const torch::Tensor& x, const torch::Tensor& rows) {
  return x.gather(1, rows.unsqueeze(-1).expand({rows.size(0), rows.size(1), x.size(2)}));
}
}  // namespace

RMSNormImpl::RMSNormImpl(int dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  // fp32 statistics even under bf16 autocast: the mean square of a bf16 row loses too much. One
  // pass each way for fp32 CPU tensors (models/fast_ops.h), the composite ops otherwise.
  return rms_norm(x, weight, eps_);  // in bf16 under bf16 autocast: only matmuls read it
}

std::pair<torch::Tensor, torch::Tensor> rope_cos_sin(const torch::Tensor& positions, int head_dim, double theta) {
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(positions.device());
  // inv_freq_i = theta^(-2i / Dh), i = 0 .. Dh/2 - 1
  auto inv_freq = torch::pow(theta, -torch::arange(0, head_dim, 2, opts) / static_cast<double>(head_dim));
  auto angles = positions.to(torch::kFloat32).unsqueeze(-1) * inv_freq;  // [B, T, Dh/2]
  auto emb = torch::cat({angles, angles}, -1);                           // [B, T, Dh]
  return {emb.cos(), emb.sin()};
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  if (rope_fits(x, cos, sin)) return rope(x, cos, sin);  // one pass each way (models/fast_ops.h)
  const auto half = x.size(-1) / 2;
  auto x1 = x.slice(-1, 0, half), x2 = x.slice(-1, half);
  auto rotated = torch::cat({-x2, x1}, -1);  // rotate_half
  auto c = cos.unsqueeze(1).to(x.scalar_type()), s = sin.unsqueeze(1).to(x.scalar_type());  // [B, 1, T, Dh]
  return x * c + rotated * s;
}

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaConfig& c)
    : heads_(c.num_attention_heads), kv_heads_(c.kv_heads()), head_dim_(c.head_dim()) {
  auto lin = [](int in, int out) { return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)); };
  q_proj = register_module("q_proj", lin(c.hidden_size, heads_ * head_dim_));
  k_proj = register_module("k_proj", lin(c.hidden_size, kv_heads_ * head_dim_));
  v_proj = register_module("v_proj", lin(c.hidden_size, kv_heads_ * head_dim_));
  o_proj = register_module("o_proj", lin(heads_ * head_dim_, c.hidden_size));
}

torch::Tensor LlamaAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                          const torch::Tensor& mask, torch::Tensor* cache_k, torch::Tensor* cache_v) {
  return attend(x, cos, sin, x, cos, sin, mask, cache_k, cache_v);
}

torch::Tensor LlamaAttentionImpl::forward_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                               const torch::Tensor& row_mask, const torch::Tensor& rows) {
  return attend(gather_rows(x, rows), gather_rows(cos, rows), gather_rows(sin, rows), x, cos, sin, row_mask, nullptr,
                nullptr);
}

torch::Tensor LlamaAttentionImpl::attend(const torch::Tensor& xq, const torch::Tensor& cos_q, const torch::Tensor& sin_q,
                                         const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                         const torch::Tensor& mask, torch::Tensor* cache_k, torch::Tensor* cache_v) {
  const auto B = x.size(0), T = x.size(1), R = xq.size(1);
  auto q = q_proj(xq).view({B, R, heads_, head_dim_}).transpose(1, 2);    // [B, Hq, R, Dh]
  auto k = k_proj(x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);  // [B, KV, T, Dh]
  auto v = v_proj(x).view({B, T, kv_heads_, head_dim_}).transpose(1, 2);
  q = apply_rope(q, cos_q, sin_q);
  k = apply_rope(k, cos, sin);
  if (cache_k) {
    if (cache_k->defined()) {
      k = torch::cat({*cache_k, k}, 2);  // [B, KV, T_past + T, Dh]
      v = torch::cat({*cache_v, v}, 2);
    }
    *cache_k = k;
    *cache_v = v;
  }
  if (kv_heads_ != heads_) {  // grouped-query attention: each KV head serves heads / KV query heads
    const int rep = heads_ / kv_heads_;
    k = k.repeat_interleave(rep, 1);
    v = v.repeat_interleave(rep, 1);
  }
  // softmax in fp32 (bf16 would round the weights of long rows away), returned in v's dtype.
  auto attn = attention_softmax(torch::matmul(q, k.transpose(-2, -1)), 1.0 / std::sqrt(static_cast<double>(head_dim_)),
                                mask)  // [B, Hq, R, T_past + T]
                  .to(v.scalar_type());
  auto out = torch::matmul(attn, v).transpose(1, 2).reshape({B, R, heads_ * head_dim_});
  return o_proj(out);
}

LlamaMlpImpl::LlamaMlpImpl(const LlamaConfig& c) {
  auto lin = [](int in, int out) { return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)); };
  gate_proj = register_module("gate_proj", lin(c.hidden_size, c.intermediate_size));
  up_proj = register_module("up_proj", lin(c.hidden_size, c.intermediate_size));
  down_proj = register_module("down_proj", lin(c.intermediate_size, c.hidden_size));
}

torch::Tensor LlamaMlpImpl::forward(const torch::Tensor& x) {
  return down_proj(swiglu(gate_proj(x), up_proj(x)));  // silu(gate) * up, one pass each way in fp32
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaConfig& c) {
  self_attn = register_module("self_attn", LlamaAttention(c));
  mlp = register_module("mlp", LlamaMlp(c));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                             const torch::Tensor& mask, torch::Tensor* cache_k, torch::Tensor* cache_v) {
  auto h = x + self_attn(input_layernorm(x), cos, sin, mask, cache_k, cache_v);
  return h + mlp(post_attention_layernorm(h));
}

torch::Tensor LlamaDecoderLayerImpl::forward_rows(const torch::Tensor& x, const torch::Tensor& cos,
                                                  const torch::Tensor& sin, const torch::Tensor& mask,
                                                  const torch::Tensor& rows) {
  const auto B = x.size(0), T = x.size(1);
  TORCH_CHECK(rows.dim() == 2 && rows.size(0) == B && rows.scalar_type() == torch::kLong && rows.device() == x.device(),
              "forward_rows: rows must be int64 [", B, ", R] on ", x.device(), ", got ", rows.scalar_type(), " ",
              rows.sizes(), " on ", rows.device());
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == B && mask.size(2) == T, "forward_rows: mask must be [", B, ", 1, ", T,
              ", T], got ", mask.sizes());
  const auto R = rows.size(1);
  auto row_mask = mask.gather(2, rows.view({B, 1, R, 1}).expand({B, mask.size(1), R, mask.size(3)}));  // [B, 1, R, T]
  auto h = gather_rows(x, rows) + self_attn->forward_rows(input_layernorm(x), cos, sin, row_mask, rows);  // [B, R, H]
  return h + mlp(post_attention_layernorm(h));
}

LlamaModelImpl::LlamaModelImpl(const LlamaConfig& c) : cfg_(c) {
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(c.vocab_size, c.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int i = 0; i < c.num_hidden_layers; ++i) layers->push_back(LlamaDecoderLayer(c));
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps));
  // Hugging Face's LLaMA initialisation: normal(0, initializer_range) for every matrix.
  torch::NoGradGuard ng;
  for (auto& p : named_parameters(true))
    if (p.value().dim() == 2) torch::nn::init::normal_(p.value(), 0.0, c.initializer_range);
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                                      const torch::Tensor& position_ids, KVCache* cache,
                                      const torch::Tensor& segment_ids, const torch::Tensor& rows) {
  TORCH_CHECK(!rows.defined() || !cache, "llama: rows are read without a cache");
  const auto B = inputs_embeds.size(0), T = inputs_embeds.size(1);
  const int64_t past = cache ? cache->length() : 0;
  const int64_t total = past + T;
  auto dev = inputs_embeds.device();
  auto mask01 = attention_mask.defined() ? attention_mask.to(torch::kLong)
                                         : torch::ones({B, total}, torch::TensorOptions().dtype(torch::kLong).device(dev));
  TORCH_CHECK(mask01.size(1) == total, "llama: attention_mask covers ", mask01.size(1), " positions, expected ",
              total, " (cached ", past, " + new ", T, ")");
  // Additive mask [B, 1, T, total]: query i (absolute past + i) sees key j <= past + i that is real.
  auto q_idx = torch::arange(past, total, torch::TensorOptions().dtype(torch::kLong).device(dev)).view({T, 1});
  auto k_idx = torch::arange(total, torch::TensorOptions().dtype(torch::kLong).device(dev)).view({1, total});
  auto allowed = (k_idx <= q_idx).unsqueeze(0) & (mask01.unsqueeze(1) > 0);  // [B, T, total]
  auto pos = position_ids;
  if (segment_ids.defined()) {
    TORCH_CHECK(!cache && !position_ids.defined(), "llama: segment_ids work without a cache or explicit positions");
    TORCH_CHECK(segment_ids.sizes() == mask01.sizes(), "llama: segment_ids ", segment_ids.sizes(),
                " must match the attention mask ", mask01.sizes());
    auto seg = segment_ids.to(torch::kLong).to(dev);
    auto kseg = seg.unsqueeze(1), qseg = seg.unsqueeze(2);  // [B, 1, total], [B, T, 1]
    allowed = allowed & (kseg.eq(0) | kseg.eq(qseg));
    pos = (allowed.sum(-1) - 1).clamp_min(0);  // [B, T]: what a token sees sets its position
  } else if (!pos.defined()) {  // position = number of real tokens before this one, so left padding is harmless
    pos = (mask01.cumsum(1) - 1).clamp_min(0).slice(1, past, total);  // [B, T]
  }
  auto [cos, sin] = rope_cos_sin(pos, cfg_.head_dim(), cfg_.rope_theta);
  const float neg = -std::numeric_limits<float>::infinity();
  auto mask = torch::zeros({B, 1, T, total}, torch::TensorOptions().dtype(torch::kFloat32).device(dev))
                  .masked_fill(allowed.unsqueeze(1).logical_not(), neg);
  // A fully padded query row (padding before any real token) would softmax over nothing: let it
  // see itself; its output is never used.
  auto self = (k_idx == q_idx).unsqueeze(0).unsqueeze(0).expand({B, 1, T, total});
  auto empty_row = allowed.any(-1).logical_not().unsqueeze(1).unsqueeze(-1);  // [B, 1, T, 1]
  mask = mask.masked_fill(self & empty_row, 0.0);

  if (cache && cache->keys.empty()) {
    cache->keys.resize(layers->size());
    cache->values.resize(layers->size());
  }
  auto h = inputs_embeds;
  const size_t n = layers->size();
  for (size_t i = 0; i < n; ++i) {
    auto* l = layers[i]->as<LlamaDecoderLayer>();
    if (rows.defined() && i + 1 == n) {  // the last layer at the requested rows only
      auto top = [l, c = cos, s = sin, mask, rows](const torch::Tensor& in) { return l->forward_rows(in, c, s, mask, rows); };
      h = cfg_.gradient_checkpointing ? checkpointed(top, h, *l) : top(h);
      continue;
    }
    if (cfg_.gradient_checkpointing && !cache)  // decoding keeps no graph anyway
      // Captured by value: backward calls it after this function has returned.
      h = checkpointed([l, c = cos, s = sin, mask](const torch::Tensor& in) { return l->forward(in, c, s, mask, nullptr, nullptr); },
                       h, *l);
    else
      h = l->forward(h, cos, sin, mask, cache ? &cache->keys[i] : nullptr, cache ? &cache->values[i] : nullptr);
  }
  if (rows.defined() && n == 0) h = gather_rows(h, rows);
  return norm(h);
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaConfig& c) : cfg_(c) {
  check_llama_config(c, "model.llm");
  model = register_module("model", LlamaModel(c));
  if (!c.tie_word_embeddings) {
    lm_head = register_module("lm_head", torch::nn::Linear(torch::nn::LinearOptions(c.hidden_size, c.vocab_size).bias(false)));
    torch::NoGradGuard ng;
    torch::nn::init::normal_(lm_head->weight, 0.0, c.initializer_range);
  }
}

torch::Tensor LlamaForCausalLMImpl::forward_hidden(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                                                   const torch::Tensor& position_ids, KVCache* cache,
                                                   const torch::Tensor& segment_ids) {
  return model->forward(inputs_embeds, attention_mask, position_ids, cache, segment_ids);
}

torch::Tensor LlamaForCausalLMImpl::forward_hidden_at(const torch::Tensor& inputs_embeds,
                                                      const torch::Tensor& attention_mask, const torch::Tensor& keep,
                                                      const torch::Tensor& segment_ids) {
  const auto B = inputs_embeds.size(0), T = inputs_embeds.size(1);
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == B && keep.size(1) <= T && keep.scalar_type() == torch::kBool,
              "llama: keep must be bool [", B, ", <= ", T, "], got ", keep.scalar_type(), " ", keep.sizes());
  const auto Tk = keep.size(1);
  const auto kept = keep.to(inputs_embeds.device());
  // At least one row, so that an empty result still reaches every parameter (zero gradients, as
  // on a rank whose batch has rows).
  const int64_t R = B == 0 || Tk == 0 ? 0 : std::max<int64_t>(1, kept.sum(1).max().item<int64_t>());
  // Rows padded to nearly every position save nothing over the whole layer and cost the gathers.
  if (R == 0 || 5 * R > 4 * T)
    return model->forward(inputs_embeds, attention_mask, {}, nullptr, segment_ids).slice(1, 0, Tk).index({kept});
  // Each sample's kept positions first, in order (sort keys t and Tk + t), padded with position
  // 0, whose state is computed and dropped.
  auto t = torch::arange(Tk, torch::TensorOptions().dtype(torch::kLong).device(kept.device())).expand({B, Tk});
  auto order = std::get<0>(torch::where(kept, t, t + Tk).sort(1)).slice(1, 0, R);  // [B, R]
  auto valid = order < Tk;
  auto rows = torch::where(valid, order, torch::zeros_like(order));
  return model->forward(inputs_embeds, attention_mask, {}, nullptr, segment_ids, rows).index({valid});  // [n, H]
}

torch::Tensor LlamaForCausalLMImpl::logits(const torch::Tensor& hidden) {
  if (lm_head) return lm_head(hidden);
  return torch::matmul(hidden, model->embed_tokens->weight.t().to(hidden.scalar_type()));
}

torch::Tensor LlamaForCausalLMImpl::embed(const torch::Tensor& ids) { return model->embed_tokens(ids); }

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& ids, const torch::Tensor& attention_mask, KVCache* cache) {
  return logits(forward_hidden(embed(ids), attention_mask, {}, cache));
}

}  // namespace trialign
