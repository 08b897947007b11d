// Projectors: registry names, Hugging Face / LLaVA parameter names, shapes and values; the
// vision feature tap; the patch embedding with overlapping windows.
#include <catch2/catch.hpp>

#include "core/config_tree.h"
#include "core/errors.h"
#include "models/clip_model.h"
#include "models/projector.h"

using namespace trialign;

namespace {

std::shared_ptr<ProjectorImpl> make(const std::string& type, const std::string& options = "{}") {
  TypedSpec spec{type, parse_config_string(options, "inline"), "model.projector"};
  return projectors().create_or_throw(spec, ProjectorDims{8, 12});
}

std::vector<std::string> names(const torch::nn::Module& m) {
  std::vector<std::string> out;
  for (const auto& p : m.named_parameters()) out.push_back(p.key());
  return out;
}

}  // namespace

TEST_CASE("projectors are registered by name with LLaVA parameter names", "[projector]") {
  CHECK(projectors().names() == std::vector<std::string>{"linear", "mlp2x_gelu", "resampler"});
  CHECK(names(*make("linear")) == std::vector<std::string>{"weight", "bias"});
  CHECK(names(*make("mlp2x_gelu")) == std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"});
  CHECK_THROWS_WITH(make("mlp3x"), Catch::Contains("unknown projector type 'mlp3x'; registered: linear, mlp2x_gelu, resampler"));
  CHECK_THROWS_WITH(make("resampler", "num_heads: 3"), Catch::Contains("not divisible by num_heads 3"));
  CHECK_THROWS_WITH(make("resampler", "num_querys: 3"), Catch::Contains("did you mean 'num_queries'"));
}

TEST_CASE("linear and mlp2x_gelu map each patch: values by hand", "[projector]") {
  auto lin = make("linear");
  {
    torch::NoGradGuard ng;
    lin->named_parameters()["weight"].fill_(0.5);
    lin->named_parameters()["bias"].fill_(1.0);
  }
  auto x = torch::ones({2, 5, 8});
  auto y = lin->forward(x);
  CHECK(y.sizes() == torch::IntArrayRef({2, 5, 12}));
  CHECK(y[1][4][7].item<float>() == Approx(8 * 0.5 + 1.0));  // sum of 8 inputs x 0.5, plus bias
  auto mlp = make("mlp2x_gelu");
  {
    torch::NoGradGuard ng;
    for (auto& p : mlp->parameters()) p.fill_(0.0);
    mlp->named_parameters()["0.bias"].fill_(1.0);   // hidden = gelu(1) = 0.841345
    mlp->named_parameters()["2.weight"].fill_(1.0); // out = 12 * 0.841345
  }
  CHECK(mlp->forward(x)[0][0][0].item<float>() == Approx(12 * 0.841345).epsilon(1e-5));
  CHECK(mlp->num_tokens(64) == 64);
}

TEST_CASE("resampler gives a fixed number of tokens and trains end to end", "[projector]") {
  auto r = make("resampler", "num_queries: 3\nnum_layers: 1\nnum_heads: 2");
  CHECK(r->num_tokens(64) == 3);
  auto x = torch::randn({2, 7, 8}, torch::requires_grad());
  auto y = r->forward(x);
  CHECK(y.sizes() == torch::IntArrayRef({2, 3, 12}));
  y.sum().backward();
  CHECK(x.grad().abs().sum().item<double>() > 0);
  CHECK(r->named_parameters()["query"].grad().abs().sum().item<double>() > 0);
}

TEST_CASE("vision features come from the requested hidden state without CLS", "[projector][vision]") {
  VisionConfig c;
  c.image_size = 16;
  c.patch_size = 8;
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 2;
  ClipVisionTransformer v(c);
  auto out = v->forward(torch::randn({2, 3, 16, 16}), /*output_hidden_states=*/true);
  REQUIRE(out.hidden_states.size() == 4);  // embeddings + 3 layers
  auto f = select_vision_features(out, -2);  // output of layer 2 of 3
  CHECK(f.sizes() == torch::IntArrayRef({2, 4, 8}));  // 4 patches, CLS dropped
  CHECK(torch::equal(f, out.hidden_states[2].slice(1, 1)));
  CHECK(torch::equal(select_vision_features(out, -1), out.last_hidden_state.slice(1, 1)));
  CHECK_THROWS_AS(select_vision_features(out, -5), ConfigError);
}

TEST_CASE("overlapping patch embedding: each token is its window of the zero-padded image", "[projector][vision]") {
  // 8x8 image, patch 4 (a 2x2 grid), window 8: each token sees its 4x4 cell plus 2 pixels of
  // border on every side, zeros outside the image.
  VisionConfig v;
  v.image_size = 8, v.patch_size = 4, v.patch_kernel_size = 8, v.num_channels = 1, v.hidden_size = 4,
  v.intermediate_size = 8, v.num_hidden_layers = 1, v.num_attention_heads = 1;
  ClipVisionEmbeddings emb(v);
  REQUIRE(emb->patch_embedding->weight.sizes() == torch::IntArrayRef({4, 1, 8, 8}));
  torch::NoGradGuard ng;
  emb->position_embedding->weight.zero_();
  // Output channel k weighs window pixel (r, c) by 1 if r * 8 + c == 9 * k + 2 (a hand-picked
  // pixel each), so channel k of token (i, j) reads padded-image pixel (4i + r, 4j + c).
  emb->patch_embedding->weight.zero_();
  for (int k = 0; k < 4; ++k) emb->patch_embedding->weight[k][0][(9 * k + 2) / 8][(9 * k + 2) % 8] = 1.0;
  auto img = torch::arange(1, 65, torch::kFloat).view({1, 1, 8, 8});  // pixel (y, x) = 8y + x + 1
  const auto tokens = emb->forward(img);                              // [1, 1 + 4, 4]
  REQUIRE(tokens.sizes() == torch::IntArrayRef({1, 5, 4}));
  auto padded = [&](int y, int x) {  // the image with 2 pixels of zeros around it
    y -= 2, x -= 2;
    return (y < 0 || x < 0 || y >= 8 || x >= 8) ? 0.0 : 8.0 * y + x + 1;
  };
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int k = 0; k < 4; ++k) {
        const int r = (9 * k + 2) / 8, c = (9 * k + 2) % 8;
        INFO("token " << i << "," << j << " channel " << k);
        CHECK(tokens[0][1 + 2 * i + j][k].item<double>() == padded(4 * i + r, 4 * j + c));
      }
  // Hand-checked corners of that rule: token (0,0) channel 0 reads padded (0, 2) = a zero of the
  // border; token (1,1) channel 3 reads padded (4 + 3, 4 + 5) = image (5, 7) = 48.
  CHECK(tokens[0][1][0].item<double>() == 0.0);
  CHECK(tokens[0][4][3].item<double>() == 48.0);
}

TEST_CASE("vision pooling: CLS, mean or channel max of the normalised patch states", "[projector][vision]") {
  // Hidden size 2, so every layer norm maps a state (a, b) with a != b to about (+1, -1) or
  // (-1, +1) (exactly (a - b) / 2 / sqrt(((a - b) / 2)^2 + eps) per channel). With the layer's
  // residual branches zeroed the encoder is the identity, so the pooled output can be worked out.
  // Image 0: patch 0 (the top-left 4x4, all +1) embeds as (16, -16), the other three (all -1) as
  // (-16, 16); image 1 is all -1. CLS is (1, -1) in both. After pre_layrnorm and post_layernorm:
  // patch 0 of image 0 and CLS -> (1, -1), every other patch -> (-1, 1). So cls = (1, -1) twice,
  // mean = (-0.5, 0.5) and (-1, 1), max = (1, 1) and (-1, 1): image 1's max would be (1, 1) if
  // CLS were pooled with the patches.
  VisionConfig v;
  v.image_size = 8, v.patch_size = 4, v.num_channels = 1, v.hidden_size = 2, v.intermediate_size = 4,
  v.num_hidden_layers = 1, v.num_attention_heads = 1, v.layer_norm_eps = 1e-12;
  auto img = -torch::ones({2, 1, 8, 8});
  img[0].slice(1, 0, 4).slice(2, 0, 4).fill_(1.0);
  // Per pooling: image 0 then image 1, two channels each.
  const std::vector<std::pair<std::string, std::vector<float>>> expected = {
      {"cls", {1, -1, 1, -1}}, {"mean", {-0.5, 0.5, -1, 1}}, {"max", {1, 1, -1, 1}}};
  for (const auto& [pooling, want] : expected) {
    v.pooling = pooling;
    ClipVisionTransformer tower(v);
    torch::NoGradGuard ng;
    for (auto& p : tower->named_parameters()) {
      const auto& name = p.key();
      if (name.find("out_proj") != std::string::npos || name.find("fc2") != std::string::npos ||
          name.find("position_embedding") != std::string::npos)
        p.value().zero_();
    }
    tower->embeddings->patch_embedding->weight.select(0, 0).fill_(1.0);   // channel 0 = pixel sum
    tower->embeddings->patch_embedding->weight.select(0, 1).fill_(-1.0);  // channel 1 = -sum
    tower->embeddings->class_embedding.copy_(torch::tensor({1.0f, -1.0f}));
    const auto pooled = tower->forward(img).pooled;  // [2, 2]
    INFO("pooling " << pooling << ": " << pooled);
    REQUIRE(pooled.sizes() == torch::IntArrayRef({2, 2}));
    for (int i = 0; i < 4; ++i) CHECK(pooled[i / 2][i % 2].item<float>() == Approx(want[i]).margin(1e-5));
  }
}
