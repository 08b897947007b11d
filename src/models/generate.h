// Decoding with the KV cache: greedy, temperature, top-k and top-p (nucleus, Holtzman et al.
// 2020) sampling. The prompt is given as embeddings, so a VLM prompt with image tokens spliced
// in decodes the same way as text.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "models/llama.h"

namespace trialign {

struct SamplingOptions {
  int64_t max_new_tokens = 32;
  double temperature = 0.0;  // 0 = greedy (argmax)
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  int64_t eos_id = -1;       // stop a sequence after it emits this id; -1 = never
  uint64_t seed = 0;         // sampling generator seed (results are reproducible)
  // Never emitted (e.g. the image placeholder: a sampled one would ask for an image that is not there).
  std::vector<int64_t> banned_ids;
};

// Sets the logits of tokens outside the top-k and outside the smallest set whose probability
// reaches top_p to -inf. logits: [B, V] (fp32). The most probable token always survives.
torch::Tensor filter_logits(const torch::Tensor& logits, int64_t top_k, double top_p);

struct Generation {
  std::vector<std::vector<int64_t>> tokens;  // per sequence, without the prompt, eos included if emitted
  torch::Tensor logprobs;                    // [B, max_new] log-prob of each chosen token under the
                                             // sampling distribution (0 after a sequence ended)
};

// prompt_embeds: [B, T, H]; attention_mask: [B, T] (1 real, 0 left padding) or undefined.
Generation generate(LlamaForCausalLM& model, const torch::Tensor& prompt_embeds, const torch::Tensor& attention_mask,
                    const SamplingOptions& opt);

}  // namespace trialign
