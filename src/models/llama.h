// A decoder-only language model in the LLaMA layout (Touvron et al. 2023): RMSNorm, rotary
// position embeddings (Su et al. 2021) with configurable theta, SwiGLU MLP, grouped-query
// attention, optional tied embeddings. Parameters carry Hugging Face LlamaForCausalLM names:
//   model.embed_tokens.weight                       [V, H]
//   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (no biases; k/v: [KV * Dh, H])
//   model.layers.{i}.mlp.{gate,up,down}_proj.weight
//   model.layers.{i}.{input,post_attention}_layernorm.weight
//   model.norm.weight, lm_head.weight (absent when tie_word_embeddings)
// so safetensors from that ecosystem load by name. The forward takes input embeddings rather
// than ids, so the VLM can splice projected image tokens into the sequence.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "core/run_config.h"  // LlamaConfig

namespace trialign {

// Throws ConfigError naming the key when heads do not divide the width, etc.
void check_llama_config(const LlamaConfig& c, const std::string& path);

// Keys and values of every layer for incremental decoding. Tensors are [B, KV, T, Dh]; `length`
// counts the positions already cached (the next token's position when unpadded).
struct KVCache {
  std::vector<torch::Tensor> keys, values;
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int dim, double eps);
  torch::Tensor forward(const torch::Tensor& x);  // x / rms(x) * weight, computed in fp32
  torch::Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// cos/sin tables for positions [B, T] -> each [B, T, Dh] (Hugging Face's rotate_half layout:
// the first and second halves of a head form the rotated pairs).
std::pair<torch::Tensor, torch::Tensor> rope_cos_sin(const torch::Tensor& positions, int head_dim, double theta);
// x: [B, heads, T, Dh]; cos, sin: [B, T, Dh].
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  explicit LlamaAttentionImpl(const LlamaConfig& c);
  // x: [B, T, H]; mask: additive [B, 1, T, T_past + T]; cache entries are replaced by the
  // concatenation with this call's keys/values when given.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, torch::Tensor* cache_k, torch::Tensor* cache_v);
  // The output at R query rows per sample, rows [B, R] int64 -> [B, R, H]: keys and values from
  // every token of x, the rest for those rows only. row_mask: the rows' lines of the mask, [B, 1, R, T].
  torch::Tensor forward_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& row_mask, const torch::Tensor& rows);
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};

 private:
  // Queries from xq [B, R, H] rotated by cos_q/sin_q [B, R, Dh]; keys and values from x [B, T, H].
  torch::Tensor attend(const torch::Tensor& xq, const torch::Tensor& cos_q, const torch::Tensor& sin_q,
                       const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                       const torch::Tensor& mask, torch::Tensor* cache_k, torch::Tensor* cache_v);
  int heads_, kv_heads_, head_dim_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMlpImpl : public torch::nn::Module {
 public:
  explicit LlamaMlpImpl(const LlamaConfig& c);
  torch::Tensor forward(const torch::Tensor& x);  // down(silu(gate(x)) * up(x))
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMlp);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  explicit LlamaDecoderLayerImpl(const LlamaConfig& c);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, torch::Tensor* cache_k, torch::Tensor* cache_v);
  // forward(x, ...) read at rows [B, R] int64 -> [B, R, H]: the same values, with the query,
  // o_proj, MLP and norms after attention on B * R rows instead of B * T. mask: [B, 1, T, T].
  torch::Tensor forward_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                             const torch::Tensor& mask, const torch::Tensor& rows);
  LlamaAttention self_attn{nullptr};
  LlamaMlp mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// `model.*`: embeddings, layers, final norm.
class LlamaModelImpl : public torch::nn::Module {
 public:
  explicit LlamaModelImpl(const LlamaConfig& c);
  // rows: [B, R] int64 or undefined. When given (no cache), the output is read at those positions
  // only, [B, R, H], and the last layer runs on them (its keys and values still from every token).
  torch::Tensor forward(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                        const torch::Tensor& position_ids, KVCache* cache, const torch::Tensor& segment_ids = {},
                        const torch::Tensor& rows = {});
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};

 private:
  LlamaConfig cfg_;
};
TORCH_MODULE(LlamaModel);

class LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  explicit LlamaForCausalLMImpl(const LlamaConfig& c);

  // inputs_embeds: [B, T, H]. attention_mask: [B, T_past + T] with 1 for real tokens and 0 for
  // padding (undefined = all real). position_ids: [B, T] (undefined = derived from the mask, so
  // left padding works). With a cache, keys/values of this call are appended to it.
  // segment_ids: [B, T] int64 or undefined; several independent continuations of one prefix
  // packed in a row. A token of segment s > 0 sees the segment-0 tokens before it and its own
  // segment, nothing else; a segment-0 token sees every earlier segment-0 token. Positions then
  // count only what a token sees, so each segment computes exactly what it would alone after
  // the prefix (data.turns: independent). Not with a cache or explicit position_ids.
  // Returns the final hidden states [B, T, H].
  torch::Tensor forward_hidden(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask = {},
                               const torch::Tensor& position_ids = {}, KVCache* cache = nullptr,
                               const torch::Tensor& segment_ids = {});
  // The final hidden states at the positions where keep [B, T'] (T' <= T) is true, [n, H] in
  // row-major order, as forward_hidden(...).slice(1, 0, T').index({keep}) would give them. The
  // trainers read logits only where a label follows, so the last decoder layer computes its query,
  // attention output and MLP for those rows alone: for the bench card's stage 3 (24 of 112) that
  // saves about a ninth of the decoder's FLOPs. Rows are padded per sample to the largest count;
  // where that is more than 4/5 of the positions, the whole layer runs instead.
  torch::Tensor forward_hidden_at(const torch::Tensor& inputs_embeds, const torch::Tensor& attention_mask,
                                  const torch::Tensor& keep, const torch::Tensor& segment_ids = {});
  torch::Tensor logits(const torch::Tensor& hidden);  // [B, T, H] -> [B, T, V]
  torch::Tensor embed(const torch::Tensor& ids);      // [B, T] -> [B, T, H]
  // Convenience: ids [B, T] -> logits [B, T, V].
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& attention_mask = {}, KVCache* cache = nullptr);

  const LlamaConfig& config() const { return cfg_; }
  LlamaModel model{nullptr};
  torch::nn::Linear lm_head{nullptr};  // nullptr when tied

 private:
  LlamaConfig cfg_;
};
TORCH_MODULE(LlamaForCausalLM);

}  // namespace trialign
