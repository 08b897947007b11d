// The memory estimate logged at the start of a run: hand-worked numbers for a tiny config, and
// the warning when it would not fit.
#include <catch2/catch.hpp>

#include "trainers/memory_estimate.h"

using namespace trialign;

TEST_CASE("memory estimate: exact parameter and AdamW bytes, per-layer activations, the warning", "[memory]") {
  // s = 10 tokens, b = 2, h = 16, a = 2: 2 * 10 * 2 * 16 * (34 + 5 * 2 * 10 / 16) = 640 * 40.25.
  CHECK(layer_activation_bytes(10, 2, 16, 2) == Approx(25760.0));

  RunConfig cfg;  // stage 1
  cfg.model.vision.image_size = 32;
  cfg.model.vision.patch_size = 8;  // 16 patches + CLS = 17 tokens
  cfg.model.vision.hidden_size = cfg.model.text.hidden_size = 16;
  cfg.model.vision.num_attention_heads = cfg.model.text.num_attention_heads = 2;
  cfg.model.vision.num_hidden_layers = cfg.model.text.num_hidden_layers = 1;
  cfg.data.max_text_len = 24;
  cfg.train.batch_size = 16;
  cfg.train.grad_accum = 2;  // micro-batch 8
  const auto m = estimate_memory(cfg, 1000, 600);
  CHECK(m.parameters == 4000);
  CHECK(m.gradients == 2400);
  CHECK(m.optimizer == 4800);
  // vision 2*17*8*16*(34 + 5*2*17/16) = 194208; text 2*24*8*16*(34 + 5*2*24/16) = 301056
  CHECK(m.activations == Approx(194208.0 + 301056.0));
  // Each hard-negative caption is one more text sequence per pair.
  cfg.data.hard_negatives = 2;
  CHECK(estimate_memory(cfg, 1000, 600).activations == Approx(194208.0 + 3 * 301056.0));

  // Checkpointing the vision tower: its one layer keeps its input 4*17*8*16 = 8704 bytes and one
  // layer is rebuilt at a time in backward (with one layer, that is the whole of it again).
  CHECK(stack_activation_bytes(17, 8, 16, 2, 1, true) == Approx(8704.0 + 194208.0));
  CHECK(stack_activation_bytes(17, 8, 16, 2, 3, true) == Approx(3 * 8704.0 + 194208.0));
  CHECK(stack_activation_bytes(17, 8, 16, 2, 3, false) == Approx(3 * 194208.0));
  cfg.data.hard_negatives = 0;
  cfg.model.text.gradient_checkpointing = true;  // text: 1 layer, 4*24*8*16 = 12288 kept
  CHECK(estimate_memory(cfg, 1000, 600).activations == Approx(194208.0 + 12288.0 + 301056.0));
  cfg.model.text.gradient_checkpointing = false;
  cfg.data.hard_negatives = 2;

  CHECK(report_memory(cfg, m, 1e12).empty());
  CHECK_THAT(report_memory(cfg, m, 1000.0), Catch::Contains("may not fit in memory") && Catch::Contains("train.grad_accum"));
  CHECK(report_memory(cfg, m, 0).empty());  // unknown: no warning
}

TEST_CASE("memory estimate: the VLM counts the LLM over max_seq_len and the vision tower only when it trains",
          "[memory]") {
  RunConfig cfg;
  cfg.trainer = "finetune";
  cfg.model.vision.image_size = 16;
  cfg.model.vision.patch_size = 8;  // 4 patches + CLS
  cfg.model.vision.hidden_size = 8;
  cfg.model.vision.num_attention_heads = 2;
  cfg.model.vision.num_hidden_layers = 1;
  cfg.model.llm.hidden_size = 16;
  cfg.model.llm.num_attention_heads = 2;
  cfg.model.llm.num_hidden_layers = 2;
  cfg.model.llm.vocab_size = 100;
  cfg.data.max_seq_len = 10;
  cfg.train.batch_size = 2;
  const double llm = 2 * 25760.0 + 2 * 4.0 * 2 * 10 * 100;  // two layers + fp32 logits and their softmax
  const double vision = layer_activation_bytes(5, 2, 8, 2);
  CHECK(estimate_memory(cfg, 0, 0).activations == Approx(llm + vision));
  cfg.optim.param_groups.push_back({});
  cfg.optim.param_groups.back().match = "vision_model";
  cfg.optim.param_groups.back().freeze = true;
  CHECK(estimate_memory(cfg, 0, 0).activations == Approx(llm));
  cfg.trainer = "preference";  // chosen and rejected: twice the sequences
  CHECK(estimate_memory(cfg, 0, 0).activations == Approx(2 * llm));
  // Two micro-batches of 1 at once: the activations of both, and a gradient set per thread.
  cfg.train.grad_accum = 2;
  cfg.train.micro_batch_threads = 2;
  const auto m = estimate_memory(cfg, 100, 10);
  CHECK(m.activations == Approx(2 * llm));
  CHECK(m.gradients == Approx(4.0 * 10 * 3));
  cfg.train.micro_batch_threads = 1;  // in order: one micro-batch of 1, one gradient set
  CHECK(estimate_memory(cfg, 0, 0).activations == Approx(llm));
  CHECK(estimate_memory(cfg, 100, 10).gradients == Approx(4.0 * 10));
}
