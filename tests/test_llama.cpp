// LLaMA-layout decoder: rotary embeddings against hand-computed values, KV-cache decoding equal
// to the full forward, left padding, grouped-query attention shapes and Hugging Face names,
// sampling filters and greedy decoding.
#include <catch2/catch.hpp>

#include <limits>

#include <cmath>
#include <set>

#include "models/generate.h"
#include "models/llama.h"

using namespace trialign;

namespace {

LlamaConfig tiny_config(int kv_heads = 2, bool tied = false) {
  LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = kv_heads;
  c.tie_word_embeddings = tied;
  return c;
}

}  // namespace

TEST_CASE("RoPE rotates head halves by position * theta^(-2i/d)", "[llama][rope]") {
  // head_dim 4, theta 1e4: inv_freq = [1, 0.01]; angles at position p: [p, .01p, p, .01p].
  // q = [1, 2, 3, 4], rotate_half(q) = [-3, -4, 1, 2]; q' = q cos + rotate_half(q) sin.
  // p = 1: [cos1 - 3 sin1, 2 cos.01 - 4 sin.01, 3 cos1 + sin1, 4 cos.01 + 2 sin.01]
  auto q = torch::tensor({1.f, 2.f, 3.f, 4.f}).view({1, 1, 1, 4});
  for (auto [p, want] : std::vector<std::pair<int64_t, std::vector<double>>>{
           {1, {-1.984111, 1.959901, 2.462378, 4.019800}}, {5, {3.160435, 1.797584, -0.107938, 4.094959}}}) {
    auto [cos, sin] = rope_cos_sin(torch::full({1, 1}, p, torch::kLong), 4, 10000.0);
    auto r = apply_rope(q, cos, sin).flatten();
    for (int i = 0; i < 4; ++i) CHECK(r[i].item<double>() == Approx(want[i]).epsilon(1e-5));
  }
  // Position 0 is the identity.
  auto [cos0, sin0] = rope_cos_sin(torch::zeros({1, 1}, torch::kLong), 4, 10000.0);
  CHECK(torch::allclose(apply_rope(q, cos0, sin0), q));
}

TEST_CASE("Hugging Face parameter names and grouped-query shapes", "[llama]") {
  torch::manual_seed(0);
  LlamaForCausalLM m(tiny_config());
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& p : m->named_parameters()) shapes[p.key()] = p.value().sizes().vec();
  CHECK(shapes.at("model.embed_tokens.weight") == std::vector<int64_t>{37, 32});
  CHECK(shapes.at("model.layers.1.self_attn.q_proj.weight") == std::vector<int64_t>{32, 32});
  CHECK(shapes.at("model.layers.1.self_attn.k_proj.weight") == std::vector<int64_t>{16, 32});  // 2 KV heads x Dh 8
  CHECK(shapes.at("model.layers.0.mlp.gate_proj.weight") == std::vector<int64_t>{48, 32});
  CHECK(shapes.at("model.layers.0.post_attention_layernorm.weight") == std::vector<int64_t>{32});
  CHECK(shapes.at("model.norm.weight") == std::vector<int64_t>{32});
  CHECK(shapes.at("lm_head.weight") == std::vector<int64_t>{37, 32});
  CHECK(shapes.size() == 1 + 2 * 9 + 1 + 1);
  LlamaForCausalLM tied(tiny_config(2, true));
  CHECK(tied->named_parameters().find("lm_head.weight") == nullptr);
  LlamaConfig bad = tiny_config(3);
  CHECK_THROWS_WITH(LlamaForCausalLM(bad), Catch::Contains("model.llm.num_key_value_heads"));
}

TEST_CASE("initializer_range sets the std of every matrix, norms start at one", "[llama]") {
  torch::manual_seed(0);
  LlamaConfig c = tiny_config();
  c.hidden_size = 128;
  c.intermediate_size = 256;
  for (double range : {0.02, 0.088}) {
    c.initializer_range = range;
    LlamaForCausalLM m(c);
    for (const auto& p : m->named_parameters()) {
      const auto& w = p.value();
      if (w.dim() == 2) {  // at least 37 x 128 = 4,736 draws: the sample std is within 5% of the range
        INFO(p.key() << " with initializer_range " << range);
        CHECK(w.std().item<double>() == Approx(range).epsilon(0.05));
        CHECK(std::abs(w.mean().item<double>()) < range / 10);
      } else {
        CHECK(torch::equal(w, torch::ones_like(w)));
      }
    }
  }
}

TEST_CASE("KV-cache decoding equals the full causal forward", "[llama][kv]") {
  torch::manual_seed(1);
  for (bool tied : {false, true}) {
    LlamaForCausalLM m(tiny_config(2, tied));
    m->eval();
    torch::NoGradGuard ng;
    auto ids = torch::randint(0, 37, {2, 10}, torch::kLong);
    auto full = m->forward(ids);  // [2, 10, V]
    KVCache cache;
    std::vector<torch::Tensor> pieces = {m->forward(ids.slice(1, 0, 6), {}, &cache)};
    for (int t = 6; t < 10; ++t) pieces.push_back(m->forward(ids.slice(1, t, t + 1), {}, &cache));
    CHECK(cache.length() == 10);
    CHECK(torch::allclose(torch::cat(pieces, 1), full, 1e-5, 1e-5));
    // Causality: changing a later token leaves earlier logits untouched.
    auto ids2 = ids.clone();
    ids2[0][9] = (ids[0][9].item<int64_t>() + 1) % 37;
    CHECK(torch::allclose(m->forward(ids2).slice(1, 0, 9), full.slice(1, 0, 9), 1e-6, 1e-6));
  }
}

TEST_CASE("left padding does not change the real tokens' logits", "[llama][kv]") {
  torch::manual_seed(2);
  LlamaForCausalLM m(tiny_config());
  m->eval();
  torch::NoGradGuard ng;
  auto ids = torch::randint(1, 37, {1, 5}, torch::kLong);
  auto alone = m->forward(ids);
  auto padded = torch::cat({torch::zeros({1, 3}, torch::kLong), ids}, 1);
  auto mask = torch::cat({torch::zeros({1, 3}, torch::kLong), torch::ones({1, 5}, torch::kLong)}, 1);
  auto out = m->forward(padded, mask);
  CHECK(torch::allclose(out.slice(1, 3), alone, 1e-5, 1e-5));
  CHECK_FALSE(torch::isnan(out).any().item<bool>());  // fully masked pad rows stay finite
}

TEST_CASE("top-k and top-p filtering keep the right tokens", "[llama][sampling]") {
  // logits [2, 1, 0, -1] -> p = [0.6439, 0.2369, 0.0871, 0.0321]; mass before each: [0, .644, .881, .968]
  auto logits = torch::tensor({{2.f, 1.f, 0.f, -1.f}});
  auto kept = [](const torch::Tensor& t) {
    std::set<int64_t> s;
    for (int64_t i = 0; i < t.size(1); ++i)
      if (std::isfinite(t[0][i].item<float>())) s.insert(i);
    return s;
  };
  CHECK(kept(filter_logits(logits, 3, 1.0)) == std::set<int64_t>{0, 1, 2});
  CHECK(kept(filter_logits(logits, 0, 0.8)) == std::set<int64_t>{0, 1});
  CHECK(kept(filter_logits(logits, 0, 0.5)) == std::set<int64_t>{0});
  CHECK(kept(filter_logits(logits, 2, 0.95)) == std::set<int64_t>{0, 1});
  CHECK(kept(filter_logits(logits, 0, 1.0)) == std::set<int64_t>{0, 1, 2, 3});
}

TEST_CASE("greedy generation with the cache follows the full-forward argmax chain", "[llama][sampling]") {
  torch::manual_seed(3);
  LlamaForCausalLM m(tiny_config());
  m->eval();
  torch::NoGradGuard ng;
  auto prompt = torch::randint(0, 37, {1, 4}, torch::kLong);
  SamplingOptions o;
  o.max_new_tokens = 6;
  auto g = generate(m, m->embed(prompt), {}, o);
  REQUIRE(g.tokens[0].size() == 6);
  auto seq = prompt.clone();
  for (int i = 0; i < 6; ++i) {
    const int64_t next = m->forward(seq).select(1, -1).argmax(-1).item<int64_t>();
    CHECK(g.tokens[0][i] == next);
    seq = torch::cat({seq, torch::full({1, 1}, next, torch::kLong)}, 1);
  }
  // Sampling is reproducible from its seed, and stops at eos.
  SamplingOptions s;
  s.max_new_tokens = 8;
  s.temperature = 1.0;
  s.top_k = 5;
  s.seed = 11;
  auto a = generate(m, m->embed(prompt), {}, s), b = generate(m, m->embed(prompt), {}, s);
  CHECK(a.tokens == b.tokens);
  s.eos_id = a.tokens[0][2];
  auto c = generate(m, m->embed(prompt), {}, s);
  CHECK(c.tokens[0].size() <= 3);
  CHECK(c.tokens[0].back() == s.eos_id);
  // A temperature so small that logits / temperature overflows float samples the most likely
  // token every time: greedy's tokens, not a failure inside the sampler.
  SamplingOptions tiny = s;
  tiny.eos_id = -1;
  tiny.max_new_tokens = 6;
  tiny.temperature = 1e-40;
  CHECK(generate(m, m->embed(prompt), {}, tiny).tokens == g.tokens);
  // Non-finite weights: a named error, not multinomial's (sampling) or token 0 (greedy).
  m->lm_head->weight.data()[3][0] = std::numeric_limits<float>::quiet_NaN();
  for (double t : {0.0, 1.0}) {
    tiny.temperature = t;
    CHECK_THROWS_WITH(generate(m, m->embed(prompt), {}, tiny),
                      Catch::Contains("generate: the model's logits for generated token 1 are not finite"));
  }
}

TEST_CASE("segment ids: each packed continuation computes what it would alone after the prefix", "[llama][segments]") {
  torch::manual_seed(3);
  LlamaForCausalLM m(tiny_config());
  m->eval();
  torch::NoGradGuard ng;
  // Row 0: prefix (3) | segment 1 (2) | segment 2 (3) | padding (1). Row 1: no segments (all 0),
  // which must stay an ordinary causal sequence.
  auto ids = torch::randint(1, 37, {2, 9}, torch::kLong);
  auto seg = torch::tensor({0L, 0L, 0L, 1L, 1L, 2L, 2L, 2L, 0L, 0L, 0L, 0L, 0L, 0L, 0L, 0L, 0L, 0L}).view({2, 9});
  auto mask = torch::ones({2, 9}, torch::kLong);
  mask[0][8] = 0;
  auto packed = m->logits(m->forward_hidden(m->embed(ids), mask, {}, nullptr, seg));  // [2, 9, V]

  auto alone = [&](std::vector<int64_t> cols) {  // row 0's prefix + one segment, run by itself
    return m->forward(ids[0].index({torch::tensor(cols)}).unsqueeze(0))[0];
  };
  auto first = alone({0, 1, 2, 3, 4}), second = alone({0, 1, 2, 5, 6, 7});
  CHECK(torch::allclose(packed[0].slice(0, 0, 5), first, 1e-5, 1e-5));
  CHECK(torch::allclose(packed[0].slice(0, 5, 8), second.slice(0, 3, 6), 1e-5, 1e-5));
  // The second segment does not see the first: without the mask its logits differ.
  CHECK_FALSE(torch::allclose(m->forward(ids.slice(1, 0, 8))[0].slice(0, 5, 8), second.slice(0, 3, 6), 1e-3, 1e-3));
  CHECK(torch::allclose(packed[1], m->forward(ids.slice(0, 1, 2))[0], 1e-5, 1e-5));
  CHECK_FALSE(torch::isnan(packed).any().item<bool>());

  KVCache cache;
  CHECK_THROWS_WITH(m->forward_hidden(m->embed(ids), mask, {}, &cache, seg), Catch::Contains("without a cache"));
}

namespace {

// Each parameter's gradient (zeros where none), by name, after out's backward through `weights`.
std::map<std::string, torch::Tensor> grads_after(LlamaForCausalLM& m, const torch::Tensor& out,
                                                 const torch::Tensor& weights) {
  m->zero_grad();
  (out * weights).sum().backward();
  std::map<std::string, torch::Tensor> g;
  for (const auto& p : m->named_parameters())
    g[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::zeros_like(p.value());
  return g;
}

}  // namespace

TEST_CASE("a decoder layer read at chosen rows equals the whole layer at those rows", "[llama][rows]") {
  torch::manual_seed(4);
  LlamaDecoderLayer layer(tiny_config());
  const int64_t B = 2, T = 6;
  auto x = torch::randn({B, T, 32});
  auto [cos, sin] = rope_cos_sin(torch::arange(T).expand({B, T}), 8, 10000.0);
  const float inf = std::numeric_limits<float>::infinity();
  auto causal = torch::triu(torch::full({T, T}, -inf), 1);
  causal[4].fill_(-inf);  // row 4 sees nothing: NaN wherever it is computed
  auto mask = causal.expand({B, 1, T, T});
  // Out of order and repeated rows, none of them 4: each output row is its own position's.
  auto rows = torch::tensor({5L, 2L, 2L, 0L, 3L, 1L}).view({B, 3});
  auto x_whole = x.clone().requires_grad_(), x_rows = x.clone().requires_grad_();
  auto whole = layer->forward(x_whole, cos, sin, mask, nullptr, nullptr);  // [B, T, H]
  auto at = layer->forward_rows(x_rows, cos, sin, mask, rows);             // [B, 3, H]
  REQUIRE(at.sizes() == torch::IntArrayRef({B, 3, 32}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t r = 0; r < 3; ++r)
      CHECK(torch::allclose(at[b][r], whole[b][rows[b][r].item<int64_t>()], 1e-5, 1e-6));
  // Row 4's query, MLP and output are never computed: every gradient stays finite. Read from the
  // whole layer, the same rows' gradients are NaN (0 x NaN in the weight gradients).
  auto finite_grads = [&](const torch::Tensor& out) {
    layer->zero_grad();
    out.sum().backward();
    bool finite = true;
    for (const auto& p : layer->parameters()) finite = finite && torch::isfinite(p.grad()).all().item<bool>();
    return finite;
  };
  CHECK(finite_grads(at));
  CHECK_FALSE(finite_grads(whole.gather(1, rows.unsqueeze(-1).expand({B, 3, 32}))));
  CHECK_THROWS_WITH(layer->forward_rows(x, cos, sin, mask, rows.to(torch::kInt)), Catch::Contains("rows must be int64"));
}

TEST_CASE("forward_hidden_at equals the whole forward at the kept rows, values and every gradient", "[llama][rows]") {
  torch::manual_seed(5);
  const int64_t B = 3, T = 8, H = 32;
  // Sample 0: 3 kept rows; 1 (right padded): 1; 2 (left padded): none, so it is all padding rows.
  auto keep = torch::zeros({B, T - 1}, torch::kBool);
  keep[0][1] = keep[0][4] = keep[0][6] = true;
  keep[1][3] = true;
  auto mask = torch::ones({B, T}, torch::kLong);
  mask[1].slice(0, 5).fill_(0);
  mask[2].slice(0, 0, 2).fill_(0);
  auto seg = torch::zeros({B, T}, torch::kLong);
  seg[0].slice(0, 3, 5).fill_(1), seg[0].slice(0, 5).fill_(2);
  for (bool checkpointing : {false, true})
    for (bool segments : {false, true}) {
      CAPTURE(checkpointing, segments);
      auto c = tiny_config();
      c.gradient_checkpointing = checkpointing;
      LlamaForCausalLM m(c);
      auto embeds = torch::randn({B, T, H}).requires_grad_(true);
      const auto s = segments ? seg : torch::Tensor();
      auto whole = m->forward_hidden(embeds, mask, {}, nullptr, s).slice(1, 0, T - 1).index({keep});  // [4, H]
      auto at = m->forward_hidden_at(embeds, mask, keep, s);
      REQUIRE(at.sizes() == torch::IntArrayRef({4, H}));
      CHECK(torch::allclose(at, whole, 1e-5, 1e-6));
      auto w = torch::randn({4, H});
      auto g_whole = grads_after(m, whole, w);
      auto e_whole = embeds.grad().clone();
      embeds.mutable_grad().zero_();
      auto g_at = grads_after(m, at, w);
      CHECK(torch::allclose(embeds.grad(), e_whole, 1e-5, 1e-6));
      for (const auto& [name, g] : g_whole) {
        CAPTURE(name);
        CHECK(torch::allclose(g_at.at(name), g, 1e-4, 1e-6));
      }
      CHECK(g_whole.at("model.layers.1.mlp.down_proj.weight").abs().sum().item<double>() > 0);
    }
  // Nearly every position kept: the whole layer runs (the rows would save nothing), same values.
  {
    LlamaForCausalLM m(tiny_config());
    auto embeds = torch::randn({B, T, H});
    auto most = torch::ones({B, T - 1}, torch::kBool);
    most[2][0] = false;
    CHECK(torch::allclose(m->forward_hidden_at(embeds, mask, most),
                          m->forward_hidden(embeds, mask).slice(1, 0, T - 1).index({most}), 1e-5, 1e-6));
  }
  // Nothing kept: [0, H], and a backward through it reaches every decoder parameter with zeros
  // (a rank with no rows still has gradients to average with the others').
  LlamaForCausalLM m(tiny_config());
  auto none = m->forward_hidden_at(torch::randn({B, T, H}), mask, torch::zeros({B, T - 1}, torch::kBool));
  REQUIRE(none.sizes() == torch::IntArrayRef({0, H}));
  none.sum().backward();
  for (const auto& p : m->named_parameters()) {
    if (p.key().rfind("model.layers.", 0) != 0 && p.key() != "model.norm.weight") continue;  // not in forward_hidden
    CAPTURE(p.key());
    REQUIRE(p.value().grad().defined());
    CHECK(p.value().grad().abs().sum().item<double>() == 0.0);
  }
}
