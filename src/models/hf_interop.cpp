#include "models/hf_interop.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <sstream>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/config_tree.h"
#include "core/errors.h"
#include "core/safetensors.h"
#include "core/json_text.h"
#include "core/weight_files.h"
#include "models/vlm.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// A layout: prefix renames (file -> ours), tried in order; a name no rule matches is not part of
// the component in that layout.
struct Layout {
  const char* description;
  std::vector<std::pair<std::string, std::string>> rules;
};

const std::vector<Layout>& layouts(const std::string& component) {
  static const std::map<std::string, std::vector<Layout>> all = {
      {"vision_model",
       {{"CLIPModel / CLIPVisionModel (vision_model.*)", {{"vision_model.", "vision_model."}}},
        {"LLaVA, Hugging Face (vision_tower.vision_model.*)", {{"vision_tower.vision_model.", "vision_model."}}},
        {"LLaVA, Hugging Face >= 4.52 (model.vision_tower.vision_model.*)",
         {{"model.vision_tower.vision_model.", "vision_model."}}},
        {"LLaVA, original (model.vision_tower.vision_tower.vision_model.*)",
         {{"model.vision_tower.vision_tower.vision_model.", "vision_model."}}}}},
      {"text_model", {{"CLIPModel / CLIPTextModel (text_model.*)", {{"text_model.", "text_model."}}}}},
      {"visual_projection", {{"CLIPModel (visual_projection.*)", {{"visual_projection.", "visual_projection."}}}}},
      {"text_projection", {{"CLIPModel (text_projection.*)", {{"text_projection.", "text_projection."}}}}},
      {"mm_projector",
       {{"trialign (mm_projector.*)", {{"mm_projector.", "mm_projector."}}},
        {"LLaVA, original (model.mm_projector.*)", {{"model.mm_projector.", "mm_projector."}}},
        {"LLaVA, Hugging Face (multi_modal_projector.linear_1/2.*)",
         {{"multi_modal_projector.linear_1.", "mm_projector.0."}, {"multi_modal_projector.linear_2.", "mm_projector.2."}}},
        {"LLaVA, Hugging Face >= 4.52 (model.multi_modal_projector.linear_1/2.*)",
         {{"model.multi_modal_projector.linear_1.", "mm_projector.0."},
          {"model.multi_modal_projector.linear_2.", "mm_projector.2."}}}}},
      {"language_model",
       {{"LlamaForCausalLM (model.*, lm_head.*)", {{"model.", "model."}, {"lm_head.", "lm_head."}}},
        {"LLaVA, Hugging Face (language_model.model.*, language_model.lm_head.*)",
         {{"language_model.model.", "model."}, {"language_model.lm_head.", "lm_head."}}},
        {"LLaVA, Hugging Face >= 4.52 (model.language_model.*, lm_head.*)",
         {{"model.language_model.", "model."}, {"lm_head.", "lm_head."}}}}},
  };
  auto it = all.find(component);
  if (it == all.end()) throw ConfigError("unknown component '" + component + "'");
  return it->second;
}

// Buffers some Hugging Face files carry that are recomputed here, not learned.
bool recomputed_buffer(const std::string& name) {
  return ends_with(name, "rotary_emb.inv_freq") || ends_with(name, "embeddings.position_ids");
}

std::string join(const std::vector<std::string>& v, size_t max = 12) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < max; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > max) s += ", ... (" + std::to_string(v.size() - max) + " more)";
  return s;
}

std::string config_json_path(const std::string& weights) {
  std::error_code ec;
  const fs::path p = fs::is_directory(weights, ec) ? fs::path(weights) : fs::path(weights).parent_path();
  return (p / "config.json").string();
}

}  // namespace

std::map<std::string, torch::Tensor> map_hf_names(const std::map<std::string, torch::Tensor>& file,
                                                  const std::string& component,
                                                  const std::vector<std::string>& model_names, std::string* layout) {
  const std::set<std::string> ours(model_names.begin(), model_names.end());
  std::map<std::string, torch::Tensor> best;
  int64_t best_hits = -1;
  for (const auto& l : layouts(component)) {
    std::map<std::string, torch::Tensor> mapped;
    int64_t hits = 0;
    for (const auto& [name, t] : file)
      for (const auto& [from, to] : l.rules)
        if (starts_with(name, from)) {
          const std::string renamed = to + name.substr(from.size());
          hits += ours.count(renamed);
          mapped.emplace(renamed, t);
          break;
        }
    if (hits > best_hits) {
      best_hits = hits;
      best = std::move(mapped);
      if (layout) *layout = l.description;
    }
  }
  return best;
}

int64_t load_component(torch::nn::Module& model, const std::map<std::string, torch::Tensor>& tensors,
                       const std::string& component, const std::string& source) {
  const auto prefixes = component_prefixes(component);
  auto in_component = [&](const std::string& n) {
    return std::any_of(prefixes.begin(), prefixes.end(), [&](const std::string& p) { return starts_with(n, p); });
  };
  std::vector<std::string> missing, mismatched, unexpected, skipped, nonfinite;
  std::set<std::string> used;
  int64_t copied = 0, params = 0;
  torch::NoGradGuard ng;
  auto state = named_state(model);
  for (auto& [name, dst] : state) {
    if (!in_component(name)) continue;
    ++params;
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      missing.push_back(name);
      continue;
    }
    used.insert(name);
    if (it->second.sizes() != dst.sizes()) {
      std::ostringstream os;
      os << name << " (file " << it->second.sizes() << ", model " << dst.sizes() << ")";
      mismatched.push_back(os.str());
      continue;
    }
    // Integers cast into a float weight would load as nonsense (a norm weight of 1065353216).
    if (dst.is_floating_point() && !it->second.is_floating_point()) {
      mismatched.push_back(name + " (stored as " + std::string(c10::toString(it->second.scalar_type())) +
                           ", a floating-point weight expected)");
      continue;
    }
    // NaN or inf would surface as a non-finite loss at step 1, far from the file that holds it.
    if (dst.is_floating_point() && !torch::isfinite(it->second).all().item<bool>()) {
      nonfinite.push_back(name);
      continue;
    }
    dst.copy_(it->second.to(dst.device(), dst.scalar_type()));
    ++copied;
  }
  if (params == 0) {
    const bool vlm = std::any_of(state.begin(), state.end(), [](const auto& p) { return starts_with(p.first, "mm_projector."); });
    throw ConfigError("component '" + component + "' is not part of this model (its components: " +
                      join(model_components(vlm)) + ")");
  }
  const bool has_lm_head = std::any_of(used.begin(), used.end(), [](const std::string& n) { return starts_with(n, "lm_head."); }) ||
                           std::any_of(missing.begin(), missing.end(), [](const std::string& n) { return starts_with(n, "lm_head."); });
  for (const auto& [name, t] : tensors) {
    if (!in_component(name) || used.count(name)) continue;
    // A tied model has no lm_head; files of tied models sometimes still carry the copy.
    if (recomputed_buffer(name) || (name == "lm_head.weight" && !has_lm_head)) skipped.push_back(name);
    else unexpected.push_back(name);
  }
  if (!nonfinite.empty())
    throw DataError(source + ": component '" + component + "' holds NaN or infinite values in " +
                    std::to_string(nonfinite.size()) + " tensor(s): " + join(nonfinite) +
                    "; these weights are damaged (or were saved from a run that diverged): use another copy");
  if (!missing.empty() || !mismatched.empty() || !unexpected.empty()) {
    std::string msg = source + " does not fit component '" + component + "' of this model:";
    if (!missing.empty()) msg += "\n  missing (" + std::to_string(missing.size()) + "): " + join(missing);
    if (!unexpected.empty()) msg += "\n  unexpected (" + std::to_string(unexpected.size()) + "): " + join(unexpected);
    if (!mismatched.empty()) msg += "\n  mis-shaped (" + std::to_string(mismatched.size()) + "): " + join(mismatched);
    msg += "\ncheck that model.vision / model.text / model.llm / model.projector describe the model these weights "
           "belong to";
    throw DataError(msg);
  }
  if (!skipped.empty()) spdlog::info("{}: ignored {} (recomputed or tied): {}", source, skipped.size(), join(skipped, 4));
  return copied;
}

std::string init_components(torch::nn::Module& model, const InitFrom& init, const ModelConfig& mc,
                            const std::string& tokenizer) {
  std::vector<std::string> names;
  for (const auto& [n, t] : named_state(model)) names.push_back(n);
  std::string source, used;
  std::map<std::string, torch::Tensor> tensors;
  const bool hf = is_hf_weights(init.checkpoint);
  if (hf) {
    used = source = init.checkpoint;
    tensors = load_weights(init.checkpoint);
  } else {
    try {
      used = resolve_checkpoint(init.checkpoint, [](const std::string& w) { spdlog::warn(w); }, CheckpointUse::Weights);
    } catch (const DataError& e) {
      throw DataError(std::string("init_from: ") + e.what() +
                      " (a fresh run takes its starting weights from there: run that stage first, or fix the path)");
    }
    verify_checkpoint(used, CheckpointUse::Weights);
    for (const auto& c : init.components)
      if (c == "text_model" || c == "language_model") {
        check_checkpoint_tokenizer(used, tokenizer, "init_from " + c);
        break;
      }
    source = used + "/model.safetensors";
    tensors = load_safetensors(source);
  }
  int64_t copied = 0;
  std::error_code ec;
  if (hf && !fs::exists(config_json_path(init.checkpoint), ec))
    spdlog::warn("init_from: no {} beside the weights, so the run config's sizes, rope_theta and norm eps were not "
                 "checked against them (only tensor names and shapes are)",
                 config_json_path(init.checkpoint));
  for (const auto& component : init.components) {
    if (hf) {
      const auto diff = check_hf_config(init.checkpoint, component, mc);
      if (!diff.empty()) {
        std::string msg = config_json_path(init.checkpoint) + " disagrees with the run config for '" + component + "':";
        for (const auto& d : diff) msg += "\n  " + d;
        throw ConfigError(msg + "\nset these keys to the values of the weights");
      }
      std::string layout;
      const auto mapped = map_hf_names(tensors, component, names, &layout);
      copied += load_component(model, mapped, component, source);
      spdlog::info("init_from: {} read as {}", component, layout);
    } else {
      copied += load_component(model, tensors, component, source);
    }
  }
  spdlog::info("init_from: {} tensors of [{}] from {}", copied, join(init.components), used);
  return used;
}

std::vector<std::string> check_hf_config(const std::string& weights, const std::string& component,
                                         const ModelConfig& mc) {
  const std::string path = config_json_path(weights);
  std::error_code ec;
  if (!fs::exists(path, ec)) return {};
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(path + ": not valid JSON (" + e.what() + ")");
  }
  const std::string type =
      j.contains("model_type") && j["model_type"].is_string() ? j["model_type"].get<std::string>() : std::string();
  auto sub = [&](const char* own_type, const char* key) -> const nlohmann::json* {
    if (type == own_type) return &j;
    if (j.contains(key) && j[key].is_object()) return &j[key];
    return nullptr;
  };
  std::vector<std::string> diff;
  auto num = [&](const nlohmann::json* c, const char* field, double ours, const std::string& key) {
    if (!c || !c->contains(field) || (*c)[field].is_null()) return;
    if (!(*c)[field].is_number()) {
      diff.push_back(key + ": config.json's " + field + " is " + json_text((*c)[field]) + ", not a number");
      return;
    }
    const double theirs = (*c)[field].get<double>();
    if (std::abs(theirs - ours) > 1e-9 * std::max(1.0, std::abs(ours))) {
      std::ostringstream os;
      os << key << ": config.json has " << json_text((*c)[field]) << ", the run config " << ours;
      diff.push_back(os.str());
    }
  };
  auto str = [&](const nlohmann::json* c, const char* field, const std::string& ours, const std::string& key) {
    if (!c || !c->contains(field) || !(*c)[field].is_string()) return;
    if ((*c)[field].get<std::string>() != ours)
      diff.push_back(key + ": config.json has \"" + (*c)[field].get<std::string>() + "\", the run config \"" + ours + "\"");
  };
  auto tower = [&](const nlohmann::json* c, const TowerDims& d, const std::string& k) {
    num(c, "hidden_size", d.hidden_size, k + ".hidden_size");
    num(c, "intermediate_size", d.intermediate_size, k + ".intermediate_size");
    num(c, "num_hidden_layers", d.num_hidden_layers, k + ".num_hidden_layers");
    num(c, "num_attention_heads", d.num_attention_heads, k + ".num_attention_heads");
    num(c, "layer_norm_eps", d.layer_norm_eps, k + ".layer_norm_eps");
    str(c, "hidden_act", d.hidden_act, k + ".hidden_act");
  };
  if (component == "language_model") {
    const auto* c = sub("llama", "text_config");
    // Other decoders (Mistral, Qwen2, ...) may share LLaMA's tensor names and load without a
    // complaint, then run without what differs (sliding-window attention, attention biases).
    // The language model's own model_type: text_config's in a Hugging Face LLaVA folder, else the
    // top level's (the original LLaVA writes "llava" / "llava_llama" beside LLaMA's fields).
    std::string lm_type = type;
    if (j.contains("text_config") && j["text_config"].is_object())
      lm_type = j["text_config"].contains("model_type") && j["text_config"]["model_type"].is_string()
                    ? j["text_config"]["model_type"].get<std::string>()
                    : "";
    else if (type == "llava" || type == "llava_llama")
      lm_type = "llama";
    if (!lm_type.empty() && lm_type != "llama")
      diff.push_back("model_type: config.json has \"" + lm_type +
                     "\"; trialign's language model is LLaMA (LlamaForCausalLM), and weights of another architecture "
                     "would run without what makes it differ: use LLaMA-architecture weights");
    const auto& l = mc.llm;
    if (l.vocab_size > 0) num(c, "vocab_size", l.vocab_size, "model.llm.vocab_size");
    num(c, "hidden_size", l.hidden_size, "model.llm.hidden_size");
    num(c, "intermediate_size", l.intermediate_size, "model.llm.intermediate_size");
    num(c, "num_hidden_layers", l.num_hidden_layers, "model.llm.num_hidden_layers");
    num(c, "num_attention_heads", l.num_attention_heads, "model.llm.num_attention_heads");
    num(c, "num_key_value_heads", l.kv_heads(), "model.llm.num_key_value_heads");
    num(c, "rms_norm_eps", l.rms_norm_eps, "model.llm.rms_norm_eps");
    num(c, "rope_theta", l.rope_theta, "model.llm.rope_theta");
    if (c && c->contains("tie_word_embeddings") && (*c)["tie_word_embeddings"].is_boolean() &&
        (*c)["tie_word_embeddings"].get<bool>() != l.tie_word_embeddings)
      diff.push_back(std::string("model.llm.tie_word_embeddings: config.json has ") +
                     ((*c)["tie_word_embeddings"].get<bool>() ? "true" : "false") + ", the run config " +
                     (l.tie_word_embeddings ? "true" : "false"));
    str(c, "hidden_act", "silu", "(SwiGLU activation)");
    if (c && c->contains("rope_scaling") && !(*c)["rope_scaling"].is_null())
      diff.push_back("rope_scaling: config.json sets " + json_text((*c)["rope_scaling"]) + "; trialign's RoPE has no scaling");
  } else if (component == "vision_model") {
    const auto* c = sub("clip_vision_model", "vision_config");
    tower(c, mc.vision, "model.vision");
    num(c, "image_size", mc.vision.image_size, "model.vision.image_size");
    num(c, "patch_size", mc.vision.patch_size, "model.vision.patch_size");
    if (c && mc.vision.kernel() != mc.vision.patch_size)
      diff.push_back("model.vision.patch_kernel_size: the run config has " + std::to_string(mc.vision.kernel()) +
                     "; Hugging Face CLIP patches do not overlap (set it to 0)");
  } else if (component == "text_model") {
    const auto* c = sub("clip_text_model", "text_config");
    tower(c, mc.text, "model.text");
    if (mc.text.vocab_size > 0) num(c, "vocab_size", mc.text.vocab_size, "model.text.vocab_size");
    num(c, "max_position_embeddings", mc.text.max_position_embeddings, "model.text.max_position_embeddings");
  } else if (component == "visual_projection" || component == "text_projection") {
    num(type == "clip" ? &j : nullptr, "projection_dim", mc.projection_dim, "model.projection_dim");
  }
  return diff;
}

nlohmann::json hf_config_json(const std::string& component, const RunConfig& cfg) {
  const auto& mc = cfg.model;
  auto tower = [](const TowerDims& d) {
    return nlohmann::json{{"hidden_size", d.hidden_size},
                          {"intermediate_size", d.intermediate_size},
                          {"num_hidden_layers", d.num_hidden_layers},
                          {"num_attention_heads", d.num_attention_heads},
                          {"hidden_act", d.hidden_act},
                          {"layer_norm_eps", d.layer_norm_eps}};
  };
  auto vision = [&] {
    if (mc.vision.kernel() != mc.vision.patch_size)
      throw ConfigError("model.vision.patch_kernel_size is " + std::to_string(mc.vision.kernel()) +
                        ": a Hugging Face CLIP vision config cannot describe overlapping patches "
                        "(its kernel is patch_size); use the checkpoint's model.safetensors with init_from instead");
    auto v = tower(mc.vision);
    v["image_size"] = mc.vision.image_size;
    v["patch_size"] = mc.vision.patch_size;
    v["num_channels"] = mc.vision.num_channels;
    v["projection_dim"] = mc.projection_dim;
    v["model_type"] = "clip_vision_model";
    return v;
  };
  if (component == "language_model") {
    const auto& l = mc.llm;
    return {{"architectures", {"LlamaForCausalLM"}},
            {"model_type", "llama"},
            {"vocab_size", l.vocab_size},
            {"hidden_size", l.hidden_size},
            {"intermediate_size", l.intermediate_size},
            {"num_hidden_layers", l.num_hidden_layers},
            {"num_attention_heads", l.num_attention_heads},
            {"num_key_value_heads", l.kv_heads()},
            {"head_dim", l.head_dim()},
            {"max_position_embeddings", l.max_position_embeddings},
            {"rms_norm_eps", l.rms_norm_eps},
            {"rope_theta", l.rope_theta},
            {"rope_scaling", nullptr},
            {"initializer_range", l.initializer_range},
            {"tie_word_embeddings", l.tie_word_embeddings},
            {"hidden_act", "silu"},
            {"attention_bias", false},
            {"mlp_bias", false},
            {"torch_dtype", "float32"}};
  }
  if (component == "vision_model") {
    auto v = vision();
    v["architectures"] = {"CLIPVisionModel"};
    v["torch_dtype"] = "float32";
    return v;
  }
  if (component == "clip") {
    // Pooling has no weights, so a tower pooled otherwise imports from and exports to
    // CLIPVisionModel (LLaVA reads its hidden states, not its pooler output). A whole CLIPModel is
    // different: its image embeddings are the pooled CLS, and this model's would not be.
    if (mc.vision.pooling != "cls")
      throw ConfigError("model.vision.pooling is " + mc.vision.pooling +
                        ": a Hugging Face CLIPModel embeds images by their CLS state, so it would not "
                        "reproduce this model's image embeddings (`trialign export` writes such a model's vision "
                        "tower alone, as a CLIPVisionModel)");
    auto t = tower(mc.text);
    t["vocab_size"] = mc.text.vocab_size;
    t["max_position_embeddings"] = mc.text.max_position_embeddings;
    t["projection_dim"] = mc.projection_dim;
    t["model_type"] = "clip_text_model";
    return {{"architectures", {"CLIPModel"}}, {"model_type", "clip"},       {"projection_dim", mc.projection_dim},
            {"text_config", t},               {"vision_config", vision()}, {"torch_dtype", "float32"}};
  }
  if (component == "mm_projector") {
    // No Hugging Face class holds a projector alone: this names what trialign needs to rebuild it.
    return {{"trialign_component", "mm_projector"},
            {"projector_type", mc.projector.type},
            {"options_yaml", to_yaml(mc.projector.options)},
            {"mm_hidden_size", mc.vision.hidden_size},
            {"hidden_size", mc.llm.hidden_size},
            {"vision_feature_layer", mc.vision_feature_layer},
            {"vision_feature_select_strategy", "default"}};
  }
  throw ConfigError("no config.json for component '" + component + "'");
}

}  // namespace trialign
