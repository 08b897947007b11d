// Weights in and out of the Hugging Face ecosystem, by parameter name. A model is a set of
// components, each a set of name prefixes (models/vlm.h: model_components, component_prefixes):
//   stage 1 (CLIPModel):      vision_model, text_model, visual_projection, text_projection
//   stages 2-3 (LLaVA-style): vision_model, mm_projector, language_model (model.*, lm_head.*)
// Our names are Hugging Face's, so a CLIPModel / CLIPVisionModel / LlamaForCausalLM file loads
// as it is; the layouts of the models these come inside (LLaVA in its Hugging Face and original
// forms) are renamed on the way in.
#pragma once
#include <torch/torch.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/run_config.h"

namespace trialign {

// Tensors of `component` renamed into our names. Of the known layouts (ours, LLaVA's, ...), the
// one that renames the most tensors into names of `model_names` wins; `layout` receives its
// description. Tensors of other components are left out.
std::map<std::string, torch::Tensor> map_hf_names(const std::map<std::string, torch::Tensor>& file,
                                                  const std::string& component,
                                                  const std::vector<std::string>& model_names,
                                                  std::string* layout = nullptr);

// Copies one component's tensors into `model` (dtype converted, e.g. bf16 files into fp32
// weights). Every parameter of the component must be present with its shape, and no tensor in
// the component's names may be left over: otherwise one DataError naming `source` lists the
// missing, unexpected and mis-shaped names. Returns the number of tensors copied.
int64_t load_component(torch::nn::Module& model, const std::map<std::string, torch::Tensor>& tensors,
                       const std::string& component, const std::string& source);

// Components from `init.checkpoint`: a trialign checkpoint or run folder (its newest complete
// checkpoint, checksums verified) or Hugging Face weights (a .safetensors file, a sharded
// index, or a folder; its config.json is checked against `mc`). Returns what was loaded from:
// the resolved checkpoint folder or the weights path. tokenizer: the run's data.tokenizer; a
// trialign checkpoint whose text_model or language_model is taken must have been trained with
// the same file (check_checkpoint_tokenizer), since their embeddings are indexed by its ids.
// No default: a caller that forgot it would skip that check silently.
std::string init_components(torch::nn::Module& model, const InitFrom& init, const ModelConfig& mc,
                            const std::string& tokenizer);

// Compares a Hugging Face config.json next to `weights` (if there is one) with the run's model
// config for `component`; returns one line per disagreeing field ("model.llm.rope_theta:
// config.json has 500000, the run config 10000").
std::vector<std::string> check_hf_config(const std::string& weights, const std::string& component,
                                         const ModelConfig& mc);

// config.json for an exported component: LlamaForCausalLM (language_model), CLIPVisionModel
// (vision_model), CLIPModel (component "clip": a whole stage-1 model), or our own description
// of the projector (mm_projector).
nlohmann::json hf_config_json(const std::string& component, const RunConfig& cfg);

}  // namespace trialign
