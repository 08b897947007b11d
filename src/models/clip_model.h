// The stage-1 encoder pair in Hugging Face's CLIP layout:
//   vision_model.embeddings.{patch_embedding.weight, class_embedding, position_embedding.weight},
//   vision_model.pre_layrnorm (sic: the Hugging Face spelling), vision_model.encoder.layers.{i}.*,
//   vision_model.post_layernorm, text_model.embeddings.{token_embedding, position_embedding}.weight,
//   text_model.encoder.layers.{i}.*, text_model.final_layer_norm, visual_projection.weight,
//   text_projection.weight.
// Later stages take `vision_model` alone (a CLIPVisionModel) as the VLM's image encoder.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "core/run_config.h"
#include "models/clip_layers.h"

namespace trialign {

class ClipVisionEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit ClipVisionEmbeddingsImpl(const VisionConfig& c);
  torch::Tensor forward(const torch::Tensor& pixels);  // [B, C, H, W] -> [B, 1 + P, D]
  torch::nn::Conv2d patch_embedding{nullptr};
  torch::Tensor class_embedding;                     // [D]
  torch::nn::Embedding position_embedding{nullptr};  // [1 + P, D]
};
TORCH_MODULE(ClipVisionEmbeddings);

struct VisionOutput {
  torch::Tensor last_hidden_state;          // [B, 1 + P, D] (before post_layernorm)
  torch::Tensor pooled;                     // [B, D]: post_layernorm(CLS), or the mean / max of
                                            // post_layernorm(patch states) (model.vision.pooling)
  std::vector<torch::Tensor> hidden_states; // L + 1 entries when requested
};

class ClipVisionTransformerImpl : public torch::nn::Module {
 public:
  explicit ClipVisionTransformerImpl(const VisionConfig& c);
  VisionOutput forward(const torch::Tensor& pixels, bool output_hidden_states = false);
  // forward(pixels).pooled, [B, D]; with CLS pooling the last layer runs on the CLS rows only.
  torch::Tensor pooled(const torch::Tensor& pixels);
  // What select_vision_features(forward(pixels, true), layer) returns, [B, P, D], running only the
  // layers up to the tapped one (LLaVA's -2 skips the last layer's work).
  torch::Tensor patch_features(const torch::Tensor& pixels, int layer);
  ClipVisionEmbeddings embeddings{nullptr};
  torch::nn::LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
  ClipEncoder encoder{nullptr};

 private:
  std::string pooling_;  // cls | mean | max (validated by the config reader)
};
TORCH_MODULE(ClipVisionTransformer);

// Patch features for a VLM: hidden_states[layer] (Python-style index into the L + 1 states, so
// -2 is LLaVA's default "second to last layer"), CLS dropped. -> [B, P, D]. Throws ConfigError
// naming the valid range for an out-of-range layer.
torch::Tensor select_vision_features(const VisionOutput& out, int layer);

class ClipTextTransformerImpl : public torch::nn::Module {
 public:
  explicit ClipTextTransformerImpl(const TextConfig& c);
  // ids: [B, T] int64, lengths: [B] (tokens incl. bos/eos; the last one is the EOT token whose
  // final state is the pooled output). Causal attention, so padding after EOT never leaks in.
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& lengths);  // -> [B, D]
  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
  ClipEncoder encoder{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(ClipTextTransformer);

class ClipModelImpl : public torch::nn::Module {
 public:
  explicit ClipModelImpl(const ModelConfig& c);
  torch::Tensor encode_image(const torch::Tensor& pixels);                        // [B, E], unit norm
  torch::Tensor encode_text(const torch::Tensor& ids, const torch::Tensor& lengths);  // [B, E], unit norm
  ClipVisionTransformer vision_model{nullptr};
  ClipTextTransformer text_model{nullptr};
  torch::nn::Linear visual_projection{nullptr}, text_projection{nullptr};
};
TORCH_MODULE(ClipModel);

}  // namespace trialign
