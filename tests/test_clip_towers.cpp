// The pooled towers run their last layer on the pooled rows only (ClipEncoder::forward_rows): the
// values and every parameter's gradient must be those of the whole last layer read at those rows.
#include <catch2/catch.hpp>

#include <limits>

#include "models/clip_model.h"

using namespace trialign;

namespace {

// max |a - b| over two tensors of the same shape
double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  REQUIRE(a.sizes() == b.sizes());
  return (a - b).abs().max().item<double>();
}

// Gradients of sum(out * weights) for every parameter of `m`, by name.
std::map<std::string, torch::Tensor> grads_of(torch::nn::Module& m, const torch::Tensor& out, const torch::Tensor& weights) {
  for (auto& p : m.parameters()) p.mutable_grad() = torch::Tensor();
  (out * weights).sum().backward();
  std::map<std::string, torch::Tensor> g;
  for (const auto& p : m.named_parameters()) {
    INFO(p.key());
    REQUIRE(p.value().grad().defined());
    g[p.key()] = p.value().grad().clone();
  }
  return g;
}

void check_same_grads(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  REQUIRE(a.size() == b.size());
  for (const auto& [name, g] : a) {
    INFO(name << ": " << g.abs().max().item<double>());
    CHECK(max_diff(g, b.at(name)) <= 1e-5 * (1.0 + g.abs().max().item<double>()));
  }
}

}  // namespace

TEST_CASE("an encoder layer at chosen rows equals its whole output at those rows", "[clip]") {
  torch::manual_seed(4);
  ClipBlockConfig c;
  c.hidden_size = 8, c.intermediate_size = 16, c.num_attention_heads = 2;
  ClipEncoderLayer layer(c);
  const auto x = torch::randn({3, 5, 8});
  const auto rows = torch::tensor({4, 0, 2}, torch::kLong);
  const auto mask = torch::full({5, 5}, -std::numeric_limits<float>::infinity()).triu(1);
  for (const bool masked : {false, true}) {
    INFO("causal mask " << masked);
    const auto m = masked ? mask : torch::Tensor();
    const auto whole = layer->forward(x, m);  // [3, 5, 8]
    const auto picked = torch::stack({whole[0][4], whole[1][0], whole[2][2]}).unsqueeze(1);
    const auto got = layer->forward_rows(x, m, rows);
    REQUIRE(got.sizes() == torch::IntArrayRef({3, 1, 8}));  // B rows computed, not B * T
    CHECK(torch::allclose(got, picked, 1e-5, 1e-6));
  }
  CHECK_THROWS_WITH(layer->forward_rows(x, mask, rows.to(torch::kInt)), Catch::Contains("rows must be int64 [3]"));
}

TEST_CASE("vision tower with CLS pooling: the last layer on the CLS rows equals the whole layer", "[vision][clip]") {
  for (const bool recompute : {false, true}) {
    torch::manual_seed(3);
    VisionConfig v;
    v.image_size = 16, v.patch_size = 4, v.num_channels = 3, v.hidden_size = 8, v.intermediate_size = 16,
    v.num_hidden_layers = 2, v.num_attention_heads = 2, v.gradient_checkpointing = recompute;
    ClipVisionTransformer tower(v);
    const auto pixels = torch::randn({3, 3, 16, 16});
    const auto w = torch::randn({3, 8});
    INFO("gradient_checkpointing " << recompute);
    const auto whole = tower->forward(pixels).pooled;  // [3, 8]: every token through every layer
    const auto gw = grads_of(*tower, whole, w);
    const auto rows = tower->pooled(pixels);
    const auto gr = grads_of(*tower, rows, w);
    CHECK(torch::allclose(rows, whole, 1e-5, 1e-6));
    check_same_grads(gw, gr);
    // The last layer's MLP saw 3 rows, not 3 * 17: its weights' gradients are sums over 3 rows
    // of that layer only, and the first layer's q_proj still got gradient through the keys.
    CHECK(gr.at("encoder.layers.0.self_attn.q_proj.weight").abs().sum().item<double>() > 0);
  }
}

TEST_CASE("text tower: the last layer at each text's end-of-text row equals the whole layer", "[clip]") {
  for (const bool recompute : {false, true}) {
    torch::manual_seed(5);
    TextConfig t;
    t.vocab_size = 20, t.max_position_embeddings = 6, t.hidden_size = 8, t.intermediate_size = 16,
    t.num_hidden_layers = 2, t.num_attention_heads = 2, t.gradient_checkpointing = recompute;
    ClipTextTransformer tower(t);
    const auto ids = torch::randint(0, 20, {3, 6});
    const auto lengths = torch::tensor({6, 3, 1});
    const auto w = torch::randn({3, 8});
    INFO("gradient_checkpointing " << recompute);
    // The whole encoder over every position, causal, then each text's end-of-text state.
    auto whole_fn = [&] {
      auto x = tower->token_embedding(ids) + tower->position_embedding->weight.slice(0, 0, 6).unsqueeze(0);
      auto mask = torch::full({6, 6}, -std::numeric_limits<float>::infinity()).triu(1);
      auto h = tower->final_layer_norm(tower->encoder(x, mask));  // [3, 6, 8]
      return torch::stack({h[0][5], h[1][2], h[2][0]});
    };
    const auto whole = whole_fn();
    const auto gw = grads_of(*tower, whole, w);
    const auto rows = tower->forward(ids, lengths);
    const auto gr = grads_of(*tower, rows, w);
    CHECK(torch::allclose(rows, whole, 1e-5, 1e-6));
    check_same_grads(gw, gr);
    // Causal: tokens after a text's end do not reach its state.
    auto changed = ids.clone();
    changed[1].slice(0, 3).fill_(7);
    torch::NoGradGuard ng;
    CHECK(max_diff(tower->forward(changed, lengths)[1], rows[1].detach()) == 0.0);
  }
}
