#include "trainers/memory_estimate.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "core/distributed.h"
#include "models/vlm.h"

namespace trialign {

double layer_activation_bytes(double s, double b, double h, double a) { return 2.0 * s * b * h * (34.0 + 5.0 * a * s / h); }

double stack_activation_bytes(double s, double b, double h, double a, int layers, bool checkpointed) {
  if (!checkpointed) return layers * layer_activation_bytes(s, b, h, a);
  // Each layer keeps its fp32 input [b, s, h]; backward rebuilds one layer's activations at a time.
  return layers * 4.0 * s * b * h + layer_activation_bytes(s, b, h, a);
}

MemoryEstimate estimate_memory(const RunConfig& cfg, int64_t n_params, int64_t n_trainable) {
  MemoryEstimate m;
  m.parameters = 4.0 * static_cast<double>(n_params);
  // Micro-batches on threads: each running one holds its own gradients until they are added
  // into .grad (trainers/micro_batches.h), and its activations.
  const int at_once = cfg.train.micro_batch_threads > 1 ? cfg.train.micro_batch_threads : 0;
  m.gradients = 4.0 * static_cast<double>(n_trainable) * (1 + at_once);
  m.optimizer = 8.0 * static_cast<double>(n_trainable);  // AdamW: exp_avg and exp_avg_sq
  const double micro = static_cast<double>(cfg.train.batch_size) / cfg.train.grad_accum * std::max(1, at_once);
  const auto& v = cfg.model.vision;
  auto tower = [](double s, double b, const TowerDims& d) {
    return stack_activation_bytes(s, b, d.hidden_size, d.num_attention_heads, d.num_hidden_layers,
                                  d.gradient_checkpointing);
  };
  const double patches = static_cast<double>(patches_per_image(cfg.model)) + 1;  // + CLS
  if (!cfg.is_vlm()) {
    // Stage 1: both towers; each pair's hard-negative captions go through the text tower too.
    const auto& t = cfg.model.text;
    m.activations = tower(patches, micro, v) + tower(cfg.data.max_text_len, micro * (1 + cfg.data.hard_negatives), t);
    return m;
  }
  // Stages 2-3 and preference: the LLM over max_seq_len tokens (the longest a batch may hold),
  // the vision tower only when some of it trains (a frozen tower keeps no graph), and the fp32
  // logits of every position with their softmax.
  const auto& l = cfg.model.llm;
  double sequences = micro;
  if (cfg.trainer == "preference") sequences *= 2;  // chosen and rejected in one forward
  const double s = cfg.data.max_seq_len;
  m.activations = stack_activation_bytes(s, sequences, l.hidden_size, l.num_attention_heads, l.num_hidden_layers,
                                         l.gradient_checkpointing) +
                  2.0 * 4.0 * sequences * s * std::max(1, l.vocab_size);
  bool vision_trains = true;
  for (const auto& r : cfg.optim.param_groups)
    if (r.match == "vision_model" && r.freeze) vision_trains = false;
  if (vision_trains && !cfg.data.drop_images) m.activations += tower(patches, sequences, v);
  return m;
}

double available_memory_bytes() {
  double limit = 0;
  {
    std::ifstream in("/sys/fs/cgroup/memory.max");  // cgroup v2; "max" = none
    std::string v;
    if (in >> v && v != "max") limit = std::stod(v);
  }
  std::ifstream in("/proc/meminfo");
  std::string line;
  double avail = 0;
  while (std::getline(in, line))
    if (line.rfind("MemAvailable:", 0) == 0) {
      std::istringstream ss(line.substr(13));
      double kb = 0;
      ss >> kb;
      avail = kb * 1024.0;
    }
  if (limit > 0 && (avail == 0 || limit < avail)) avail = limit;
  return avail / dist::local_world_size();  // ranks on one machine share it
}

namespace {

std::string human(double bytes) {
  const double mb = bytes / (1024.0 * 1024.0);
  return mb < 1024 ? fmt::format("{:.1f} MB", mb) : fmt::format("{:.2f} GB", mb / 1024.0);
}

}  // namespace

std::string report_memory(const RunConfig& cfg, const MemoryEstimate& m, double available) {
  spdlog::info("memory estimate: {} (parameters {}, gradients {}, AdamW state {}, activations ~{} at {} samples per "
               "micro-batch{}){}",
               human(m.total()), human(m.parameters), human(m.gradients), human(m.optimizer), human(m.activations),
               cfg.train.batch_size / cfg.train.grad_accum,
               cfg.train.micro_batch_threads > 1 ? fmt::format(", {} at once", cfg.train.micro_batch_threads) : std::string(),
               available > 0 ? "; " + human(available) + " available" : std::string());
  if (available <= 0 || m.total() <= 0.9 * available) return "";
  const std::string w = fmt::format(
      "the run may not fit in memory: about {} needed, {} available. Lower train.batch_size or raise "
      "train.grad_accum (activations scale with the micro-batch), lower train.micro_batch_threads, set "
      "gradient_checkpointing: true under model.llm / model.vision / model.text (with train.micro_batch_threads 1), "
      "or lower data.max_seq_len / max_text_len",
      human(m.total()), human(available));
  spdlog::warn(w);
  return w;
}

}  // namespace trialign
