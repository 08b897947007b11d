#include "models/vlm.h"

#include "core/errors.h"

namespace trialign {

std::vector<std::string> component_prefixes(const std::string& component) {
  if (component == "vision_model") return {"vision_model."};
  if (component == "mm_projector") return {"mm_projector."};
  if (component == "language_model") return {"model.", "lm_head."};
  // Stage 1's CLIPModel.
  if (component == "text_model") return {"text_model."};
  if (component == "visual_projection") return {"visual_projection."};
  if (component == "text_projection") return {"text_projection."};
  throw ConfigError("unknown component '" + component +
                    "'; use vision_model, mm_projector or language_model (stages 2-3), or vision_model, text_model, "
                    "visual_projection, text_projection (stage 1)");
}

std::vector<std::string> model_components(bool vlm) {
  if (vlm) return {"vision_model", "mm_projector", "language_model"};
  return {"vision_model", "text_model", "visual_projection", "text_projection"};
}

std::string component_of(const std::string& name) {
  for (const bool vlm : {true, false})
    for (const auto& c : model_components(vlm))
      for (const auto& p : component_prefixes(c))
        if (name.compare(0, p.size(), p) == 0) return c;
  return "";
}

VlmModelImpl::VlmModelImpl(const ModelConfig& mc) : feature_layer_(mc.vision_feature_layer) {
  vision_model = register_module("vision_model", ClipVisionTransformer(mc.vision));
  mm_projector = register_module(
      "mm_projector", projectors().create_or_throw(mc.projector, ProjectorDims{mc.vision.hidden_size, mc.llm.hidden_size}));
  llm = LlamaForCausalLM(mc.llm);
  // Registered by their own names so the state dict reads like LlamaForCausalLM's.
  register_module("model", llm->model);
  if (llm->lm_head) register_module("lm_head", llm->lm_head);
  tokens_per_image_ = mm_projector->num_tokens(patches_per_image(mc));
}

int64_t patches_per_image(const ModelConfig& mc) {
  const int64_t side = mc.vision.image_size / mc.vision.patch_size;
  return side * side;
}

int64_t visual_tokens_per_image(const ModelConfig& mc) {
  return projectors()
      .create_or_throw(mc.projector, ProjectorDims{mc.vision.hidden_size, mc.llm.hidden_size})
      ->num_tokens(patches_per_image(mc));
}

torch::Tensor VlmModelImpl::image_tokens(const torch::Tensor& pixels) {
  bool vision_trains = false;
  for (const auto& p : vision_model->parameters()) vision_trains = vision_trains || p.requires_grad();
  torch::Tensor features;  // [I, P, Dv]
  {
    torch::AutoGradMode grad_mode(vision_trains && torch::GradMode::is_enabled());
    features = vision_model->patch_features(pixels, feature_layer_);
  }
  return mm_projector->forward(features);  // [I, N, H]
}

VlmInputs VlmModelImpl::build_inputs(const torch::Tensor& pixels, const std::vector<std::vector<int64_t>>& ids,
                                     const std::vector<std::vector<int64_t>>& labels, int64_t image_id,
                                     const std::vector<std::vector<int64_t>>& segments) {
  torch::Tensor tokens;
  if (pixels.defined() && pixels.size(0) > 0) tokens = image_tokens(pixels);
  return splice_image_tokens(ids, labels, tokens, image_id, [&](const torch::Tensor& t) { return llm->embed(t); },
                             segments);
}

}  // namespace trialign
