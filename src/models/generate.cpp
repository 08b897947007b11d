#include "models/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <limits>

namespace trialign {

torch::Tensor filter_logits(const torch::Tensor& logits, int64_t top_k, double top_p) {
  const float neg = -std::numeric_limits<float>::infinity();
  auto out = logits.clone();
  const auto V = logits.size(-1);
  if (top_k > 0 && top_k < V) {
    auto kth = std::get<0>(out.topk(top_k, -1)).select(-1, top_k - 1).unsqueeze(-1);  // [B, 1]
    out = out.masked_fill(out < kth, neg);
  }
  if (top_p < 1.0) {
    auto [sorted, idx] = out.sort(-1, /*descending=*/true);
    auto probs = sorted.softmax(-1);
    // Drop a token when the tokens before it already reach top_p (so the first always stays).
    auto drop_sorted = (probs.cumsum(-1) - probs) >= top_p;
    drop_sorted.select(-1, 0).fill_(false);  // top_p <= 0 would drop everything
    auto drop = torch::zeros_like(drop_sorted).scatter(-1, idx, drop_sorted);
    out = out.masked_fill(drop, neg);
  }
  return out;
}

Generation generate(LlamaForCausalLM& model, const torch::Tensor& prompt_embeds, const torch::Tensor& attention_mask,
                    const SamplingOptions& opt) {
  torch::NoGradGuard ng;
  const auto B = prompt_embeds.size(0);
  auto dev = prompt_embeds.device();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opt.seed);
  auto mask = attention_mask.defined()
                  ? attention_mask.to(torch::kLong)
                  : torch::ones({B, prompt_embeds.size(1)}, torch::TensorOptions().dtype(torch::kLong).device(dev));
  KVCache cache;
  auto hidden = model->forward_hidden(prompt_embeds, mask, {}, &cache);  // prefill
  auto next_logits = model->logits(hidden.select(1, -1)).to(torch::kFloat32);  // [B, V]

  Generation g;
  g.tokens.assign(static_cast<size_t>(B), {});
  g.logprobs = torch::zeros({B, opt.max_new_tokens});
  std::vector<bool> done(static_cast<size_t>(B), false);
  torch::Tensor banned;
  if (!opt.banned_ids.empty()) banned = torch::tensor(opt.banned_ids, torch::kLong).to(dev);
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    // NaN or inf logits come from non-finite weights (a damaged or badly converted checkpoint);
    // sampling would fail deep in multinomial and greedy would quietly pick token 0.
    if (!torch::isfinite(next_logits).all().item<bool>())
      throw std::runtime_error("generate: the model's logits for generated token " + std::to_string(step + 1) +
                               " are not finite (NaN or inf): its weights hold non-finite values; check the "
                               "checkpoint ('trialign inspect --verify') or the weights it was imported from");
    if (banned.defined()) next_logits.index_fill_(1, banned, -std::numeric_limits<float>::infinity());
    torch::Tensor chosen, logp;
    if (opt.temperature <= 0) {
      chosen = next_logits.argmax(-1);
      logp = next_logits.log_softmax(-1).gather(1, chosen.unsqueeze(1)).squeeze(1);
    } else {
      auto scaled = next_logits / opt.temperature;  // [B, V]
      // A tiny temperature overflows logits to inf. Shifted so the largest is 0 before scaling,
      // the others go to -inf instead (greedy in the limit); only then, so that the draws of an
      // ordinary temperature stay bit for bit what they were.
      if (!torch::isfinite(scaled).all().item<bool>())
        scaled = (next_logits - std::get<0>(next_logits.max(-1, /*keepdim=*/true))) / opt.temperature;
      auto filtered = filter_logits(scaled, opt.top_k, opt.top_p);
      auto probs = filtered.softmax(-1);
      chosen = torch::multinomial(probs.cpu(), 1, /*replacement=*/false, gen).squeeze(1).to(dev);
      logp = filtered.log_softmax(-1).gather(1, chosen.unsqueeze(1)).squeeze(1);
    }
    auto chosen_cpu = chosen.cpu();
    auto logp_cpu = logp.cpu();
    bool all_done = true;
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      const int64_t t = chosen_cpu[b].item<int64_t>();
      g.tokens[b].push_back(t);
      g.logprobs[b][step] = logp_cpu[b].item<float>();
      if (t == opt.eos_id) done[b] = true;
      all_done = all_done && done[b];
    }
    if (all_done || step + 1 == opt.max_new_tokens) break;
    mask = torch::cat({mask, torch::ones({B, 1}, mask.options())}, 1);
    hidden = model->forward_hidden(model->embed(chosen.unsqueeze(1)), mask, {}, &cache);
    next_logits = model->logits(hidden.select(1, -1)).to(torch::kFloat32);
  }
  return g;
}

}  // namespace trialign
