#include "models/clip_model.h"

#include <cmath>

#include "core/errors.h"

namespace trialign {

namespace {

torch::nn::LayerNorm layer_norm(int d, double eps) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({d}).eps(eps));
}

// CLIP's initialisation (Radford et al. 2021 code): small normal embeddings, projections scaled
// by width^-0.5, linear layers normal(0, 0.02) with zero bias. LibTorch's default kaiming-uniform
// makes deep residual stacks start with large activations.
void init_linear_layers(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& sub : m.modules(/*include_self=*/false)) {
    if (auto* lin = sub->as<torch::nn::Linear>()) {
      torch::nn::init::normal_(lin->weight, 0.0, 0.02);
      if (lin->bias.defined()) lin->bias.zero_();
    }
  }
}

}  // namespace

ClipVisionEmbeddingsImpl::ClipVisionEmbeddingsImpl(const VisionConfig& c) {
  const int num_patches = (c.image_size / c.patch_size) * (c.image_size / c.patch_size);
  patch_embedding = register_module(
      "patch_embedding",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(c.num_channels, c.hidden_size, c.kernel())
                            .stride(c.patch_size)
                            .padding((c.kernel() - c.patch_size) / 2)
                            .bias(false)));
  class_embedding = register_parameter("class_embedding", torch::randn({c.hidden_size}) * std::pow(c.hidden_size, -0.5));
  position_embedding = register_module("position_embedding", torch::nn::Embedding(num_patches + 1, c.hidden_size));
  torch::NoGradGuard ng;
  torch::nn::init::normal_(position_embedding->weight, 0.0, 0.02);
}

torch::Tensor ClipVisionEmbeddingsImpl::forward(const torch::Tensor& pixels) {
  const auto B = pixels.size(0);
  const auto& pos = position_embedding->weight;                                  // [1 + P, D]
  auto patches = patch_embedding(pixels).flatten(2).transpose(1, 2) + pos.slice(0, 1);  // [B, P, D]
  // Positions are added to the CLS token and the patches separately, not to their concatenation:
  // with B = 1, `cat(...) + pos` would hand class_embedding and position_embedding gradients that
  // are views of one buffer, and LibTorch's gradient accumulation, which adopts such a gradient
  // as .grad on the first backward, then adds each one's next micro-batch into the other's too.
  auto cls = (class_embedding + pos[0]).view({1, 1, -1}).expand({B, 1, pos.size(1)});  // [B, 1, D]
  return torch::cat({cls, patches}, 1);                                           // [B, 1 + P, D]
}

ClipVisionTransformerImpl::ClipVisionTransformerImpl(const VisionConfig& c) : pooling_(c.pooling) {
  TORCH_CHECK(pooling_ == "cls" || pooling_ == "mean" || pooling_ == "max",
              "model.vision.pooling must be cls, mean or max, got '", pooling_, "'");
  embeddings = register_module("embeddings", ClipVisionEmbeddings(c));
  pre_layrnorm = register_module("pre_layrnorm", layer_norm(c.hidden_size, c.layer_norm_eps));
  encoder = register_module("encoder", ClipEncoder(c, c.num_hidden_layers));
  post_layernorm = register_module("post_layernorm", layer_norm(c.hidden_size, c.layer_norm_eps));
  init_linear_layers(*encoder);
}

VisionOutput ClipVisionTransformerImpl::forward(const torch::Tensor& pixels, bool output_hidden_states) {
  VisionOutput out;
  auto x = pre_layrnorm(embeddings(pixels));
  out.last_hidden_state = encoder(x, torch::Tensor(), output_hidden_states ? &out.hidden_states : nullptr);
  if (pooling_ == "cls") {
    out.pooled = post_layernorm(out.last_hidden_state.select(1, 0));  // CLS token
  } else {
    // Every patch state normalised, then pooled over P: [B, P, D] -> [B, D]. Normalising first
    // keeps each token's scale equal, so no token wins the max by its norm alone.
    const auto patches = post_layernorm(out.last_hidden_state.slice(1, 1));
    out.pooled = pooling_ == "mean" ? patches.mean(1) : std::get<0>(patches.max(1));
  }
  return out;
}

torch::Tensor ClipVisionTransformerImpl::pooled(const torch::Tensor& pixels) {
  if (pooling_ != "cls") return forward(pixels).pooled;  // mean / max read every patch's last state
  auto x = pre_layrnorm(embeddings(pixels));
  const auto cls = torch::zeros({x.size(0)}, torch::TensorOptions().dtype(torch::kLong).device(x.device()));
  return post_layernorm(encoder->forward_rows(x, torch::Tensor(), cls));  // [B, D]
}

namespace {

// Python-style index `layer` into n hidden states, or a ConfigError naming the valid range.
int hidden_state_index(int layer, int n) {
  const int idx = layer < 0 ? n + layer : layer;
  if (idx < 0 || idx >= n)
    throw ConfigError("vision feature layer " + std::to_string(layer) + " is out of range: the encoder has " +
                      std::to_string(n) + " hidden states (use -" + std::to_string(n) + " .. " + std::to_string(n - 1) + ")");
  return idx;
}

}  // namespace

torch::Tensor ClipVisionTransformerImpl::patch_features(const torch::Tensor& pixels, int layer) {
  const int idx = hidden_state_index(layer, static_cast<int>(encoder->layers->size()) + 1);
  return encoder(pre_layrnorm(embeddings(pixels)), torch::Tensor(), nullptr, idx).slice(1, 1);  // drop CLS
}

torch::Tensor select_vision_features(const VisionOutput& out, int layer) {
  const int n = static_cast<int>(out.hidden_states.size());
  TORCH_CHECK(n > 0, "select_vision_features: run the vision model with output_hidden_states");
  return out.hidden_states[static_cast<size_t>(hidden_state_index(layer, n))].slice(1, 1);  // drop CLS
}

ClipTextTransformerImpl::ClipTextTransformerImpl(const TextConfig& c) {
  TORCH_CHECK(c.vocab_size > 0, "text model: vocab_size must be set (from the tokenizer)");
  // Hugging Face nests the two embeddings under `embeddings.`; a plain Module holder keeps the
  // names identical without a class of its own.
  token_embedding = torch::nn::Embedding(c.vocab_size, c.hidden_size);
  position_embedding = torch::nn::Embedding(c.max_position_embeddings, c.hidden_size);
  auto holder = std::make_shared<torch::nn::Module>();
  holder->register_module("token_embedding", token_embedding);
  holder->register_module("position_embedding", position_embedding);
  register_module("embeddings", holder);
  encoder = register_module("encoder", ClipEncoder(c, c.num_hidden_layers));
  final_layer_norm = register_module("final_layer_norm", layer_norm(c.hidden_size, c.layer_norm_eps));
  torch::NoGradGuard ng;
  torch::nn::init::normal_(token_embedding->weight, 0.0, 0.02);
  torch::nn::init::normal_(position_embedding->weight, 0.0, 0.01);
  init_linear_layers(*encoder);
}

torch::Tensor ClipTextTransformerImpl::forward(const torch::Tensor& ids, const torch::Tensor& lengths) {
  const auto T = ids.size(1);
  auto x = token_embedding(ids) + position_embedding->weight.slice(0, 0, T).unsqueeze(0);  // [B, T, D]
  // Causal additive mask [T, T]: position t attends to <= t.
  auto mask = torch::full({T, T}, -std::numeric_limits<float>::infinity(), x.options()).triu(1);
  // Only the end-of-text row of the last layer is read, so that layer runs on it alone.
  auto eot = (lengths - 1).clamp_min(0).to(torch::kLong).to(x.device());                 // [B]
  return final_layer_norm(encoder->forward_rows(x, mask, eot));                           // [B, D]
}

ClipModelImpl::ClipModelImpl(const ModelConfig& c) {
  vision_model = register_module("vision_model", ClipVisionTransformer(c.vision));
  text_model = register_module("text_model", ClipTextTransformer(c.text));
  visual_projection = register_module(
      "visual_projection", torch::nn::Linear(torch::nn::LinearOptions(c.vision.hidden_size, c.projection_dim).bias(false)));
  text_projection = register_module(
      "text_projection", torch::nn::Linear(torch::nn::LinearOptions(c.text.hidden_size, c.projection_dim).bias(false)));
  torch::NoGradGuard ng;
  torch::nn::init::normal_(visual_projection->weight, 0.0, std::pow(c.vision.hidden_size, -0.5));
  torch::nn::init::normal_(text_projection->weight, 0.0, std::pow(c.text.hidden_size, -0.5));
}

torch::Tensor ClipModelImpl::encode_image(const torch::Tensor& pixels) {
  // fp32 before normalising: under bf16 autocast the towers run in bf16, the loss does not.
  return torch::nn::functional::normalize(visual_projection(vision_model->pooled(pixels)).to(torch::kFloat32),
                                          torch::nn::functional::NormalizeFuncOptions().dim(-1));
}

torch::Tensor ClipModelImpl::encode_text(const torch::Tensor& ids, const torch::Tensor& lengths) {
  return torch::nn::functional::normalize(text_projection(text_model(ids, lengths)).to(torch::kFloat32),
                                          torch::nn::functional::NormalizeFuncOptions().dim(-1));
}

}  // namespace trialign
