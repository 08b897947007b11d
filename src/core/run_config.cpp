#include "core/run_config.h"

#include "core/errors.h"
#include "losses/loss.h"

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
  const auto& v = c.model.vision;
  if (v.image_size != c.data.image_size)
    errors.add(at("model.vision.image_size"), "model.vision.image_size",
               "must equal data.image_size (" + std::to_string(c.data.image_size) + "), got " +
                   std::to_string(v.image_size));
  if (v.image_size % v.patch_size != 0)
    errors.add(at("model.vision.patch_size"), "model.vision.patch_size",
               "image_size " + std::to_string(v.image_size) + " is not a multiple of patch_size " +
                   std::to_string(v.patch_size));
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
  for (auto k : c.eval.recall_at)
    if (k < 1) errors.add(at("eval.recall_at"), "eval.recall_at", "every k must be >= 1");
  if (c.data.train.empty())
    errors.add(at("data"), "data.train", "missing: the training manifest, e.g. data/shapes/train.jsonl");
  if (c.data.tokenizer.empty())
    errors.add(at("data"), "data.tokenizer",
               "missing: a sentencepiece .model (make one with `trialign tokenizer train`)");
}

}  // namespace

RunConfig run_config_from_tree(const ConfigNode& tree, const std::string& label) {
  RunConfig cfg;
  ConfigErrors errors;
  read_config(tree, cfg, errors);
  if (errors.empty()) {
    cross_checks(cfg, tree, errors);
    contrastive_losses().create(cfg.loss, errors);  // validates the loss's own options
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
