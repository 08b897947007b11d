// `trialign bench CONFIG`: timed optimizer steps of the config's trainer (contrastive, adapter,
// finetune, preference on pairs) on synthetic batches of a fixed shape (the `bench:` section).
//
// What is timed is what training runs: the trainers' step functions (contrastive_step, vlm_step,
// the preference passes), gradient clipping and AdamW, with the batches built by the datasets'
// collate (PNG decode + transform) in the PrefetchLoader's data.workers threads. Only the token
// ids are synthetic (uniform random ids of the model's vocabulary), so the shapes are exact.
// Reported: median step time, samples/s, tokens/s, model FLOP/s against an n x n matmul measured
// in the same run, peak resident memory, the share of step time spent waiting for data, and the
// decode + transform rate of one core.
#pragma once
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "core/run_config.h"

namespace trialign {

// Forward FLOPs (2 per multiply-add) of the matmuls and attention products, per image / text /
// sequence. Embedding lookups, norms, activations, softmax and the optimizer are not counted
// (the usual "model FLOPs" of Kaplan et al. 2020 / PaLM's MFU, with full, not causal, attention).
// A ViT image: patch embedding + `layers` layers over 1 + P tokens (-1: all; the VLM runs the
// layers up to its model.vision_feature_layer).
double vision_forward_flops(const VisionConfig& v, int layers = -1);
// A ViT image to its pooled state. With CLS pooling the last layer computes keys and values for
// every token and the rest for the CLS row alone (ClipEncoder::forward_rows); mean and max
// pooling read every token, so they cost vision_forward_flops(v).
double vision_pooled_flops(const VisionConfig& v);
// A text of `tokens` positions through the text encoder to its end-of-text state (the last layer
// on that row alone, as for CLS), plus its projection to `projection_dim`.
double text_forward_flops(const TextConfig& t, int64_t tokens, int projection_dim);
// A sequence of `positions` through the LLaMA decoder, and the LM head on `head_positions` of them
// (the trainers compute logits only where a label follows). The last layer runs on those rows
// alone, with keys and values from every position (LlamaForCausalLM::forward_hidden_at).
double llm_forward_flops(const LlamaConfig& l, int64_t positions, int64_t head_positions);
// Backward costs twice the forward for a component whose weights train (input and weight
// gradients), once for a frozen one that gradients must cross (input gradients only), else 0.
int backward_multiple(bool trains, bool gradient_passes);

// Model FLOPs of one optimizer step of `cfg`'s trainer on the bench shapes: stage 1 both towers
// train; the VLM chain vision -> projector -> LLM with `trainable` naming the components whose
// weights train; preference: the policy over chosen + rejected plus a forward-only reference when
// `reference`. projector_weight_params: the projector's matrix entries (its FLOPs per visual token
// are twice that: linear, mlp2x_gelu; for the resampler it leaves out the attention products).
double bench_step_flops(const RunConfig& cfg, const std::set<std::string>& trainable, double projector_weight_params,
                        bool reference);

struct BenchOptions {
  std::string json_out;  // also write the JSON here ("" = RUN/bench.json only)
  bool quiet = false;    // no per-step lines
  std::string profile;   // write a Chrome trace of the timed steps here (LibTorch's autograd profiler)
};

// Runs the bench and returns its figures (also written to RUN/bench.json); null when a stop signal
// ended it early (nothing written). Throws ConfigError for what it cannot bench (GRPO's sampling,
// multi-process launches, shapes that do not fit).
nlohmann::json run_bench(const RunConfig& cfg, const BenchOptions& opt);

// The table `trialign bench` prints.
std::string bench_table(const nlohmann::json& j);

}  // namespace trialign
