// What a checkpoint holds, and weights in and out of it: `trialign inspect`, `export`, `import`
// and `forward` (src/main.cpp is their command line).
#pragma once
#include <torch/torch.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/run_config.h"

namespace trialign {

// The resolved config a checkpoint folder was written with (its config.yaml).
RunConfig checkpoint_config_of(const std::string& checkpoint_dir);

// What a trialign checkpoint (or a run folder's newest) or Hugging Face weights hold, read from
// manifests and safetensors headers only (no tensor is loaded): kind, trainer, step, files,
// tensors grouped by component with parameter counts and dtypes, and (with `tensors`) every
// tensor's name, dtype and shape. `verify` checks every file's checksum.
nlohmann::json inspect_weights(const std::string& path, bool tensors, bool verify);
std::string inspect_text(const nlohmann::json& j);

// Writes a checkpoint's trained components as Hugging Face folders under out_dir:
//   stage 1:    out_dir/{model.safetensors, config.json}                 CLIPModel (logit_scale included)
//   stages 2-3: out_dir/vision_model/   CLIPVisionModel (left out, with a warning, for overlapping patches)
//               out_dir/language_model/ LlamaForCausalLM (+ tokenizer.model)
//               out_dir/mm_projector/   projector weights + a config.json describing it
// dtype: "fp32" | "bf16" | "fp16". max_shard_bytes > 0 shards larger components (with an index).
// out_dir must not exist or be empty. Returns the files written.
std::vector<std::string> export_checkpoint(const std::string& checkpoint, const std::string& out_dir,
                                           const std::string& dtype, uint64_t max_shard_bytes);

// A component and where its weights come from (Hugging Face safetensors or a trialign checkpoint).
struct WeightSource {
  std::string component, path;
};
// "language_model=path/to/folder" -> {language_model, path/to/folder}; ConfigError otherwise.
WeightSource parse_weight_source(const std::string& arg);

// The model a config describes (stage 1's CLIPModel or the VLM of stages 2-3), seeded by
// run.seed, with the given components loaded (strict, by name; config.json checked).
std::shared_ptr<torch::nn::Module> build_model_with_weights(RunConfig& cfg, const std::vector<WeightSource>& sources);

// build_model_with_weights, then a checkpoint (step 0, trainer "import") in out_dir/checkpoints
// holding model.safetensors and the resolved config: usable by init_from, eval and generate.
// Returns the checkpoint folder.
std::string import_weights(RunConfig cfg, const std::vector<WeightSource>& sources, const std::string& out_dir);

// Outputs of a model for given inputs, for comparing numerics with other implementations:
//   image -> pixel_values [1, 3, S, S] (after the run's transform), then for stage 1 image_embeds
//            [1, E] (unit norm); for stages 2-3 image_features [1, P, Dv] (the configured layer,
//            CLS dropped) and image_tokens [1, N, H] (projected)
//   tokens / text -> input_ids [1, T], then for stage 1 text_embeds [1, E] (unit norm); for
//            stages 2-3 logits [1, T', V] (T' counts image tokens when the ids hold <image>)
struct ForwardInputs {
  std::vector<int64_t> tokens;  // used as given
  std::string text;             // tokenised as training does (stage 1: bos + text + eos)
  std::string image;
};
std::map<std::string, torch::Tensor> forward_outputs(torch::nn::Module& model, const RunConfig& cfg,
                                                     const ForwardInputs& in);

// A checkpoint's model with its weights and resolved config.
std::shared_ptr<torch::nn::Module> load_checkpoint_model(const std::string& checkpoint, RunConfig* cfg);

}  // namespace trialign
