#include "core/run_config.h"

#include <algorithm>

#include "core/errors.h"
#include "core/plugins.h"
#include "losses/loss.h"
#include "losses/preference.h"
#include "models/projector.h"
#include "models/vlm.h"

namespace trialign {

namespace {

void cross_checks(const RunConfig& c, const ConfigNode& tree, ConfigErrors& errors) {
  auto at = [&](const std::string& dotted) -> const ConfigNode* {
    const ConfigNode* n = &tree;
    size_t start = 0;
    while (n && start <= dotted.size()) {
      size_t dot = dotted.find('.', start);
      std::string part = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      const ConfigNode* next = n->find(part);
      if (!next) return n;  // closest enclosing node that exists
      n = next;
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    return n;
  };
  if (c.train.batch_size % c.train.grad_accum != 0)
    errors.add(at("train.grad_accum"), "train.grad_accum",
               "train.batch_size (" + std::to_string(c.train.batch_size) + ") must be a multiple of grad_accum (" +
                   std::to_string(c.train.grad_accum) + ")");
  if (c.train.micro_batch_threads > 1 && c.trainer == "contrastive") {
    errors.add(at("train.micro_batch_threads"), "train.micro_batch_threads",
               "applies to the VLM and preference trainers; stage 1's loss scores the whole batch at once (its "
               "micro-batches re-encode for the gradient cache), so set it to 1 for trainer: contrastive");
  } else if (c.train.micro_batch_threads > c.train.grad_accum) {
    errors.add(at("train.micro_batch_threads"), "train.micro_batch_threads",
               std::to_string(c.train.micro_batch_threads) + " micro-batches at once, but a step has train.grad_accum = " +
                   std::to_string(c.train.grad_accum) + "; set train.grad_accum to a multiple of " +
                   std::to_string(c.train.micro_batch_threads) +
                   " (the same batch, cut into that many micro-batches; train.batch_size must divide by it), or "
                   "lower train.micro_batch_threads");
  }
  if (c.train.micro_batch_threads > 1)
    for (const auto& [key, on] : {std::pair<const char*, bool>{"model.vision", c.model.vision.gradient_checkpointing},
                                  {"model.text", c.model.text.gradient_checkpointing},
                                  {"model.llm", c.model.llm.gradient_checkpointing}})
      if (on)
        errors.add(at(std::string(key) + ".gradient_checkpointing"), std::string(key) + ".gradient_checkpointing",
                   "cannot be combined with train.micro_batch_threads > 1: the recomputed layers add their weights' "
                   "gradients straight into the weights from every thread at once, so the threads' timing would "
                   "decide the sum's rounding; choose one of the two (both save memory per step: checkpointing "
                   "trades time for it, fewer threads trade speed)");
  const auto& v = c.model.vision;
  if (v.image_size != c.data.image_size)
    errors.add(at("model.vision.image_size"), "model.vision.image_size",
               "must equal data.image_size (" + std::to_string(c.data.image_size) + "), got " +
                   std::to_string(v.image_size));
  if (v.image_size % v.patch_size != 0)
    errors.add(at("model.vision.patch_size"), "model.vision.patch_size",
               "image_size " + std::to_string(v.image_size) + " is not a multiple of patch_size " +
                   std::to_string(v.patch_size));
  if (v.patch_kernel_size > 0 &&
      (v.patch_kernel_size < v.patch_size || (v.patch_kernel_size - v.patch_size) % 2 != 0))
    errors.add(at("model.vision.patch_kernel_size"), "model.vision.patch_kernel_size",
               "must be 0 (= patch_size) or patch_size (" + std::to_string(v.patch_size) +
                   ") plus an even number, so the window pads equally on both sides; got " +
                   std::to_string(v.patch_kernel_size));
  if (v.hidden_size % v.num_attention_heads != 0)
    errors.add(at("model.vision.num_attention_heads"), "model.vision.num_attention_heads",
               "hidden_size " + std::to_string(v.hidden_size) + " is not divisible by " +
                   std::to_string(v.num_attention_heads) + " heads");
  const auto& t = c.model.text;
  if (t.hidden_size % t.num_attention_heads != 0)
    errors.add(at("model.text.num_attention_heads"), "model.text.num_attention_heads",
               "hidden_size " + std::to_string(t.hidden_size) + " is not divisible by " +
                   std::to_string(t.num_attention_heads) + " heads");
  if (t.max_position_embeddings < c.data.max_text_len)
    errors.add(at("model.text.max_position_embeddings"), "model.text.max_position_embeddings",
               "must be >= data.max_text_len (" + std::to_string(c.data.max_text_len) + ")");
  if (c.data.augment.scale_min > c.data.augment.scale_max)
    errors.add(at("data.augment.scale_min"), "data.augment.scale_min", "must be <= scale_max");
  if (c.schedule.warmup_steps > c.train.steps)
    errors.add(at("schedule.warmup_steps"), "schedule.warmup_steps",
               "warmup (" + std::to_string(c.schedule.warmup_steps) + ") is longer than train.steps (" +
                   std::to_string(c.train.steps) + ")");
  if (c.eval.recall_at.empty())
    errors.add(at("eval.recall_at"), "eval.recall_at", "needs at least one k, e.g. [1, 5, 10]");
  if (c.run.device != "cpu")
    errors.add(at("run.device"), "run.device",
               "'" + c.run.device + "' is not available yet: this version trains on the CPU only; use cpu");
  if (c.distributed.backend == "nccl")
    errors.add(at("distributed.backend"), "distributed.backend",
               "nccl needs the model on CUDA, and this version trains on the CPU only; use gloo (or auto)");
  for (auto k : c.eval.recall_at)
    if (k < 1) errors.add(at("eval.recall_at"), "eval.recall_at", "every k must be >= 1");
  if (c.bench.loss_tokens >= c.bench.text_tokens)
    errors.add(at("bench.loss_tokens"), "bench.loss_tokens",
               "must be less than bench.text_tokens (" + std::to_string(c.bench.text_tokens) + "): the prompt needs a token");
  if (c.data.train.empty() && !c.bench.card)
    errors.add(at("data"), "data.train", "missing: the training manifest, e.g. data/shapes/train.jsonl");
  if (c.data.tokenizer.empty() && !c.bench.card)
    errors.add(at("data"), "data.tokenizer",
               "missing: a sentencepiece .model (make one with `trialign tokenizer train`)");
  // Components by model: stage 1's CLIPModel or the VLM of stages 2-3 (models/hf_interop.h).
  const std::vector<std::string> known = model_components(c.is_vlm());
  std::string known_list;
  for (const auto& k : known) known_list += (known_list.empty() ? "" : ", ") + k;
  for (size_t k = 0; k < c.init_from.size(); ++k) {
    const auto& init = c.init_from[k];
    const std::string key = "init_from[" + std::to_string(k) + "]";
    for (size_t i = 0; i < init.components.size(); ++i)
      if (std::find(known.begin(), known.end(), init.components[i]) == known.end())
        errors.add(at("init_from"), key + ".components[" + std::to_string(i) + "]",
                   "unknown component '" + init.components[i] + "' for the " + c.trainer + " trainer; use " + known_list);
    if (init.checkpoint.empty())
      errors.add(at("init_from"), key + ".checkpoint",
                 "missing: a checkpoint or run folder, or Hugging Face safetensors (file, index .json or folder)");
    if (init.components.empty())
      errors.add(at("init_from"), key + ".components", "missing: which components to take, e.g. [" + known_list + "]");
  }
  for (size_t i = 0; i < c.optim.param_groups.size(); ++i)
    if (c.optim.param_groups[i].match.empty())
      errors.add(at("optim.param_groups"), "optim.param_groups[" + std::to_string(i) + "].match",
                 "missing: a component name or a glob over parameter names");
  if (!c.is_vlm()) return;
  // ---- stages 2-3 ----
  if (c.data.turns == "independent" && c.data.chat_template != "chat")
    errors.add(at("data.turns"), "data.turns",
               "independent turns are built with the chat template; set data.template: chat or data.turns: sequential");
  if (c.trainer == "preference") {
    if (c.data.chat_template != "chat")
      errors.add(at("data.template"), "data.template",
                 "the preference trainer renders prompts and replies with the chat template; use chat");
    if (c.data.drop_images)
      errors.add(at("data.drop_images"), "data.drop_images",
                 "is not supported by the preference trainer (its images are part of what is compared)");
    if (c.data.turns != "sequential")
      errors.add(at("data.turns"), "data.turns",
                 "applies to conversation training (stages 2-3); preference records have one prompt each");
  }
  const auto& l = c.model.llm;
  if (l.hidden_size % l.num_attention_heads != 0)
    errors.add(at("model.llm.num_attention_heads"), "model.llm.num_attention_heads",
               "hidden_size " + std::to_string(l.hidden_size) + " is not divisible by " +
                   std::to_string(l.num_attention_heads) + " heads");
  else if ((l.hidden_size / l.num_attention_heads) % 2 != 0)
    errors.add(at("model.llm.hidden_size"), "model.llm.hidden_size",
               "the head dimension must be even for rotary embeddings");
  if (l.num_attention_heads % l.kv_heads() != 0)
    errors.add(at("model.llm.num_key_value_heads"), "model.llm.num_key_value_heads",
               std::to_string(l.num_attention_heads) + " attention heads are not a multiple of " +
                   std::to_string(l.kv_heads()) + " key/value heads");
  if (c.data.max_seq_len > l.max_position_embeddings)
    errors.add(at("data.max_seq_len"), "data.max_seq_len",
               std::to_string(c.data.max_seq_len) + " is longer than model.llm.max_position_embeddings (" +
                   std::to_string(l.max_position_embeddings) + ")");
  const int states = v.num_hidden_layers + 1;  // embeddings + every layer
  if (c.model.vision_feature_layer < -states || c.model.vision_feature_layer >= states)
    errors.add(at("model.vision_feature_layer"), "model.vision_feature_layer",
               "must be in [" + std::to_string(-states) + ", " + std::to_string(states - 1) +
                   "] (Python-style index into the " + std::to_string(states) + " hidden states; -2 = second to last)");
  for (size_t i = 0; i < c.eval.sets.size(); ++i) {
    const auto& s = c.eval.sets[i];
    const std::string key = "eval.sets[" + std::to_string(i) + "]";
    if (s.name.empty())
      errors.add(at("eval.sets"), key + ".name", "missing: the set's name, which prefixes its results (e.g. vqa)");
    if (s.data.empty())
      errors.add(at("eval.sets"), key + ".data", "missing: the manifest to evaluate on (e.g. data/shapes/val_vqa.jsonl)");
    for (size_t k = 0; k < i; ++k)
      if (!s.name.empty() && c.eval.sets[k].name == s.name)
        errors.add(at("eval.sets"), "eval.sets[" + std::to_string(i) + "].name",
                   "'" + s.name + "' is also eval.sets[" + std::to_string(k) +
                       "]'s name; results are filed by name, so give each set its own");
  }
}

}  // namespace

RunConfig run_config_from_tree(const ConfigNode& tree, const std::string& label) {
  RunConfig cfg;
  ConfigErrors errors;
  // The loss's default type depends on the trainer, so `loss: {option: v}` without `type:`
  // (or `--set loss.option=v`) means the trainer's default loss with that option.
  if (const ConfigNode* t = tree.find("trainer"); t && t->kind == ConfigNode::Kind::Scalar) cfg.trainer = t->scalar;
  cfg.loss.type = cfg.trainer == "preference" ? "dpo" : cfg.is_vlm() ? "cross_entropy" : "infonce";
  read_config(tree, cfg, errors);
  // Plugins first: what they register is then checked like a built-in.
  if (!cfg.plugins.empty()) load_plugins(cfg.plugins, tree.find("plugins"), errors);
  if (cfg.loss.options.kind != ConfigNode::Kind::Map) cfg.loss.options.kind = ConfigNode::Kind::Map;
  if (errors.empty()) {
    cross_checks(cfg, tree, errors);
    // Validates the `type:` components' own options and writes their defaults in, so the
    // resolved config names every value (create_filling).
    if (cfg.trainer == "preference") {
      auto loss = preference_losses().create_filling(cfg.loss, errors);
      for (auto& r : cfg.rewards) {
        if (r.options.kind != ConfigNode::Kind::Map) r.options.kind = ConfigNode::Kind::Map;
        reward_functions().create_filling(r, errors);
      }
      if (loss && !loss->sampling() && !cfg.rewards.empty())
        errors.add(tree.find("rewards"), "rewards",
                   "loss '" + cfg.loss.type + "' trains on chosen/rejected pairs and uses no reward functions; remove "
                   "rewards or use a loss that samples completions (grpo)");
    }
    if (cfg.is_vlm()) {
      if (cfg.trainer != "preference") lm_losses().create_filling(cfg.loss, errors);
      auto proj = projectors().create_filling(cfg.model.projector, errors,
                                      ProjectorDims{cfg.model.vision.hidden_size, cfg.model.llm.hidden_size});
      const int64_t side = cfg.model.vision.image_size / cfg.model.vision.patch_size;
      try {
        if (proj) proj->num_tokens(side * side);
      } catch (const std::exception& e) {
        errors.add(tree.find("model") ? tree.find("model")->find("projector") : nullptr, "model.projector", e.what());
      }
    } else {
      contrastive_losses().create_filling(cfg.loss, errors);
    }
  }
  errors.throw_if_any("invalid config " + label);
  cfg.source = label;
  return cfg;
}

RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  ConfigNode tree = load_config_file(path);
  for (const auto& o : overrides) apply_override(tree, o);
  return run_config_from_tree(tree, path);
}

std::string resolved_yaml(const RunConfig& cfg) {
  return to_yaml(ConfigWriter::to_node(cfg));
}

}  // namespace trialign
