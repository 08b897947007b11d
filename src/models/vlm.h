// The vision-language model of stages 2-3 (LLaVA, Liu et al. 2023): the stage-1 vision tower,
// a projector, and a LLaMA-layout language model. Parameter names:
//   vision_model.*   the CLIP vision tower, named as in stage 1's checkpoint (and Hugging Face)
//   mm_projector.*   the projector (models/projector.h)
//   model.*, lm_head.weight   the language model, exactly LlamaForCausalLM's names
// so one state dict serves every stage, and a component is a set of name prefixes.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/run_config.h"
#include "models/clip_model.h"
#include "models/llama.h"
#include "models/projector.h"
#include "models/vlm_inputs.h"

namespace trialign {

// Visual tokens one image becomes in the LLM's sequence, from the config alone (the projector is
// built, the towers are not): what data loading needs to know sequence lengths.
int64_t patches_per_image(const ModelConfig& mc);
int64_t visual_tokens_per_image(const ModelConfig& mc);

// Parameter-name prefixes of a component: vision_model, mm_projector, language_model (stages
// 2-3), text_model, visual_projection, text_projection (stage 1). Throws ConfigError for another.
std::vector<std::string> component_prefixes(const std::string& component);
// The components of a stage-1 (vlm = false: CLIPModel) or stage-2/3 model.
std::vector<std::string> model_components(bool vlm);
// The component a parameter of either model belongs to ("" for none).
std::string component_of(const std::string& param_name);

class VlmModelImpl : public torch::nn::Module {
 public:
  // `mc.llm.vocab_size` must be resolved (non-zero).
  explicit VlmModelImpl(const ModelConfig& mc);

  // pixels [I, 3, S, S] -> visual tokens [I, N, H] (projected features of the configured layer,
  // CLS dropped). A vision tower with no trainable parameter runs without a graph.
  torch::Tensor image_tokens(const torch::Tensor& pixels);

  // Token ids with image placeholders + labels per sample -> LLM inputs with the visual tokens
  // spliced in (right padding). pixels: every sample's images in batch order, undefined when none.
  // segments: per sample, empty or one segment id per id (VlmInputs::segment_ids).
  VlmInputs build_inputs(const torch::Tensor& pixels, const std::vector<std::vector<int64_t>>& ids,
                         const std::vector<std::vector<int64_t>>& labels, int64_t image_id,
                         const std::vector<std::vector<int64_t>>& segments = {});

  // Tokens per image after the projector.
  int64_t tokens_per_image() const { return tokens_per_image_; }

  ClipVisionTransformer vision_model{nullptr};
  std::shared_ptr<ProjectorImpl> mm_projector;
  LlamaForCausalLM llm{nullptr};  // its `model` and `lm_head` are registered here directly

 private:
  int feature_layer_;
  int64_t tokens_per_image_ = 0;
};
TORCH_MODULE(VlmModel);

}  // namespace trialign
