// Typed configuration of a training run. Raw YAML never reaches a trainer: load_run_config()
// parses, composes (include:, --set), validates every field and every `type:` component, and
// returns these structs. Field comments give an example value; docs/user-guide.md lists all.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "core/config_reader.h"

namespace trialign {

struct RunSection {
  std::string name = "run";          // run name, used in logs, e.g. "stage1"
  std::string out_dir = "runs/run";  // run directory: logs, metrics.jsonl, checkpoints/
  uint64_t seed = 0;                 // one seed for init, data order and augmentation
  int threads = 0;                   // LibTorch intra-op threads; 0 = all cores
  std::string device = "cpu";        // cpu | auto | cuda
  std::string precision = "auto";    // auto (bf16 where the CPU supports it) | fp32 | bf16
  template <class V> void fields(V& v) {
    v("name", name);
    v("out_dir", out_dir);
    v("seed", seed);
    v("threads", threads, at_least(0));
    v("device", device, one_of({"cpu", "auto", "cuda"}));
    v("precision", precision, one_of({"auto", "fp32", "bf16"}));
  }
};

struct AugmentConfig {
  bool random_resized_crop = false;  // train-time RandomResizedCrop (val never augments)
  double scale_min = 0.8;            // fraction of the area kept, lower bound
  double scale_max = 1.0;
  double ratio_min = 3.0 / 4.0;      // aspect ratio bounds
  double ratio_max = 4.0 / 3.0;
  template <class V> void fields(V& v) {
    v("random_resized_crop", random_resized_crop);
    v("scale_min", scale_min, in_range(0.01, 1.0));
    v("scale_max", scale_max, in_range(0.01, 1.0));
    v("ratio_min", ratio_min, positive());
    v("ratio_max", ratio_max, positive());
  }
};

struct DataConfig {
  std::string train;            // manifest (JSON list or JSONL), e.g. data/shapes/train.jsonl
  std::string val;              // held-out manifest; empty = no validation
  std::string image_root;       // images resolve against this; empty = the manifest's folder
  std::string tokenizer;        // sentencepiece .model
  int image_size = 64;          // square side after resize + centre crop
  int max_text_len = 32;        // text encoder context, incl. bos/eos
  std::string on_bad_record = "fail";  // fail | skip (skips are counted and reported)
  int workers = 2;              // background loader threads
  int prefetch = 4;             // batches prepared ahead
  int64_t val_limit = 0;        // first N validation records only; 0 = all
  // Stage 1: up to this many of each record's "negatives" (captions with one error) join the
  // text side of the batch as extra negatives (NegCLIP); 0 = off. Drawn per (seed, epoch, index).
  int hard_negatives = 0;
  AugmentConfig augment;
  // Stages 2-3 (conversation data):
  std::string chat_template = "chat";  // chat | plain (image then caption; LLaVA feature alignment)
  int max_seq_len = 256;               // tokens after each <image> becomes its visual tokens
  std::string on_too_long = "fail";    // fail | skip (counted) | truncate (text after the last image)
  bool drop_images = false;            // text-only training on the same records (LM pretraining)
  // sequential: a multi-turn record is one conversation, each reply seeing every earlier turn.
  // independent: each exchange is trained as if asked alone after the image, all in one sequence
  // (data/conversation.h, tokenize_independent_turns). Training records only.
  std::string turns = "sequential";
  std::string caption_prompt = "Describe the image.";  // user turn for {"image","caption"} records
  // Decode every training image once before the first step (rank 0; cached in the run folder per
  // set of files), so a corrupt file stops the run before it starts, not hours in.
  bool check_images = true;
  template <class V> void fields(V& v) {
    v("train", train);
    v("val", val);
    v("image_root", image_root);
    v("tokenizer", tokenizer);
    v("image_size", image_size, at_least(8));
    v("max_text_len", max_text_len, at_least(3));
    v("on_bad_record", on_bad_record, one_of({"fail", "skip"}));
    v("workers", workers, at_least(1));
    v("prefetch", prefetch, at_least(1));
    v("val_limit", val_limit, at_least(0));
    v("hard_negatives", hard_negatives, at_least(0));
    v("augment", augment);
    v("template", chat_template, one_of({"chat", "plain"}));
    v("max_seq_len", max_seq_len, at_least(4));
    v("on_too_long", on_too_long, one_of({"fail", "skip", "truncate"}));
    v("drop_images", drop_images);
    v("turns", turns, one_of({"sequential", "independent"}));
    v("caption_prompt", caption_prompt);
    v("check_images", check_images);
  }
};

// The dimensions every transformer tower shares, under Hugging Face's config names.
struct TowerDims {
  int hidden_size = 128;
  int intermediate_size = 512;
  int num_hidden_layers = 4;
  int num_attention_heads = 4;
  std::string hidden_act = "quick_gelu";  // quick_gelu | gelu
  double layer_norm_eps = 1e-5;
  bool gradient_checkpointing = false;    // recompute each layer's activations in backward (models/recompute.h)
  template <class V> void dims_fields(V& v) {
    v("hidden_size", hidden_size, at_least(1));
    v("intermediate_size", intermediate_size, at_least(1));
    v("num_hidden_layers", num_hidden_layers, at_least(1));
    v("num_attention_heads", num_attention_heads, at_least(1));
    v("hidden_act", hidden_act, one_of({"quick_gelu", "gelu"}));
    v("layer_norm_eps", layer_norm_eps, positive());
    v("gradient_checkpointing", gradient_checkpointing);
  }
};

// Hugging Face CLIPVisionConfig field names, so a config.json maps across one to one.
struct VisionConfig : TowerDims {
  int image_size = 64;
  int patch_size = 8;
  // Side of the patch embedding's convolution window; 0 = patch_size (Hugging Face CLIP's
  // non-overlapping patches). A larger window, centred on each patch with zero padding of
  // (patch_kernel_size - patch_size) / 2, lets every token see its neighbourhood: an object
  // smaller than the window is wholly inside one token's input instead of cut across several.
  int patch_kernel_size = 0;
  int num_channels = 3;
  // What the contrastive image embedding reads from the last layer: "cls" (Hugging Face CLIP:
  // post_layernorm of the CLS state), "mean" or "max" (post_layernorm of every patch state
  // [B, P, D], then the mean or the channel-wise max over P). With mean or max the patch states
  // themselves must carry what captions name, and they are what the projector of stages 2-3
  // reads; max reads "is there an X anywhere" from whichever token holds the object.
  std::string pooling = "cls";
  int kernel() const { return patch_kernel_size > 0 ? patch_kernel_size : patch_size; }
  template <class V> void fields(V& v) {
    v("image_size", image_size, at_least(8));
    v("patch_size", patch_size, at_least(1));
    v("patch_kernel_size", patch_kernel_size, at_least(0));
    v("num_channels", num_channels, at_least(1));
    v("pooling", pooling, one_of({"cls", "mean", "max"}));
    dims_fields(v);
  }
};

// Hugging Face CLIPTextConfig field names.
struct TextConfig : TowerDims {
  int vocab_size = 0;                 // 0 = take it from the tokenizer
  int max_position_embeddings = 32;
  template <class V> void fields(V& v) {
    v("vocab_size", vocab_size, at_least(0));
    v("max_position_embeddings", max_position_embeddings, at_least(2));
    dims_fields(v);
  }
};

// Hugging Face LlamaConfig field names.
struct LlamaConfig {
  int vocab_size = 0;               // 0 = take it from the tokenizer
  int hidden_size = 256;
  int intermediate_size = 704;      // SwiGLU width
  int num_hidden_layers = 4;
  int num_attention_heads = 4;
  int num_key_value_heads = 0;      // 0 = num_attention_heads (no grouping)
  int max_position_embeddings = 512;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  double initializer_range = 0.02;  // std of the normal init of every matrix (embeddings included)
  bool gradient_checkpointing = false;  // recompute each decoder layer's activations in backward (models/recompute.h)
  template <class V> void fields(V& v) {
    v("vocab_size", vocab_size, at_least(0));
    v("hidden_size", hidden_size, at_least(1));
    v("intermediate_size", intermediate_size, at_least(1));
    v("num_hidden_layers", num_hidden_layers, at_least(1));
    v("num_attention_heads", num_attention_heads, at_least(1));
    v("num_key_value_heads", num_key_value_heads, at_least(0));
    v("max_position_embeddings", max_position_embeddings, at_least(1));
    v("rms_norm_eps", rms_norm_eps, positive());
    v("rope_theta", rope_theta, positive());
    v("tie_word_embeddings", tie_word_embeddings);
    v("initializer_range", initializer_range, positive());
    v("gradient_checkpointing", gradient_checkpointing);
  }
  int kv_heads() const { return num_key_value_heads > 0 ? num_key_value_heads : num_attention_heads; }
  int head_dim() const { return hidden_size / num_attention_heads; }
};

// Stage 1 uses vision + text + projection_dim; stages 2-3 use vision + projector + llm.
struct ModelConfig {
  VisionConfig vision;
  TextConfig text;
  int projection_dim = 128;  // shared embedding space of the contrastive pair
  LlamaConfig llm;           // the language model of stages 2-3
  TypedSpec projector{"mlp2x_gelu", {}, "model.projector"};  // linear | mlp2x_gelu | resampler
  int vision_feature_layer = -2;  // hidden state feeding the projector (-2: second to last)
  template <class V> void fields(V& v) {
    v("vision", vision);
    v("text", text);
    v("projection_dim", projection_dim, at_least(1));
    v("llm", llm);
    v("projector", projector);
    v("vision_feature_layer", vision_feature_layer);
  }
};

// Which components a fresh run takes from an earlier checkpoint (the stage hand-off).
struct InitFrom {
  std::string checkpoint;               // checkpoint folder or run folder (its newest checkpoint)
  std::vector<std::string> components;  // vision_model | mm_projector | language_model
  template <class V> void fields(V& v) {
    v("checkpoint", checkpoint);
    v("components", components);
  }
};

// Freezing and per-module learning rates. `match` is a component name (vision_model,
// mm_projector, language_model) or a glob over parameter names ("model.layers.0.*"); the first
// rule that matches a parameter decides. A rule that matches nothing is an error (typo guard).
struct ParamGroupRule {
  std::string match;
  bool freeze = false;  // no gradient, no optimizer state, module kept in eval mode
  double lr = 0;        // peak lr of this group; 0 = optim.lr
  template <class V> void fields(V& v) {
    v("match", match);
    v("freeze", freeze);
    v("lr", lr, non_negative());
  }
};

struct OptimConfig {
  double lr = 5e-4;                      // peak learning rate
  double weight_decay = 0.1;             // decoupled (AdamW); not applied to norms, biases, embeddings
  std::vector<double> betas = {0.9, 0.98};
  double eps = 1e-6;
  double grad_clip = 1.0;                // max global grad norm; 0 = off
  std::vector<ParamGroupRule> param_groups;  // freezing / per-module lr, first match wins
  template <class V> void fields(V& v) {
    v("lr", lr, positive());
    v("weight_decay", weight_decay, non_negative());
    v("betas", betas, Check<std::vector<double>>([](const std::vector<double>& b) {
        return (b.size() == 2 && b[0] >= 0 && b[0] < 1 && b[1] >= 0 && b[1] < 1)
                   ? "" : "expected two values in [0, 1), e.g. [0.9, 0.98]";
      }));
    v("eps", eps, positive());
    v("grad_clip", grad_clip, non_negative());
    v("param_groups", param_groups);
  }
};

struct ScheduleConfig {
  std::string type = "cosine";  // cosine | linear | constant (after warmup)
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.0;     // final lr = min_lr_ratio * lr
  template <class V> void fields(V& v) {
    v("type", type, one_of({"cosine", "linear", "constant"}));
    v("warmup_steps", warmup_steps, at_least(0));
    v("min_lr_ratio", min_lr_ratio, in_range(0.0, 1.0));
  }
};

struct TrainSection {
  int64_t steps = 1000;         // optimizer steps
  int batch_size = 64;          // samples per optimizer step (all micro-batches together)
  int grad_accum = 1;           // micro-batches per step; batch_size must divide evenly
  // Micro-batches of a step run at once, each on its own thread with run.threads / this many
  // LibTorch threads (trainers/micro_batches.h); at most grad_accum. VLM and preference trainers.
  int micro_batch_threads = 1;
  int64_t log_every = 10;
  int64_t eval_every = 0;       // 0 = only at the end
  int64_t save_every = 0;       // 0 = only at the end
  int keep_last = 3;            // checkpoints kept (older ones deleted)
  int64_t keep_every = 0;       // also keep every checkpoint whose step is a multiple of this; 0 = none
  // A step whose loss or gradient norm is not finite, or whose batch cannot be built (an image
  // that fails to decode): stop (checkpoint of the last good state, then the error) or skip
  // (no update, counted in the log; the step still counts, so the data order is unchanged).
  std::string on_nonfinite = "stop";  // stop | skip
  std::string on_bad_batch = "stop";  // stop | skip
  int64_t max_skipped_steps = 10;     // skips in a row that stop the run anyway
  template <class V> void fields(V& v) {
    v("steps", steps, at_least(1));
    v("batch_size", batch_size, at_least(1));
    v("grad_accum", grad_accum, at_least(1));
    v("micro_batch_threads", micro_batch_threads, at_least(1));
    v("log_every", log_every, at_least(1));
    v("eval_every", eval_every, at_least(0));
    v("save_every", save_every, at_least(0));
    v("keep_last", keep_last, at_least(1));
    v("keep_every", keep_every, at_least(0));
    v("on_nonfinite", on_nonfinite, one_of({"stop", "skip"}));
    v("on_bad_batch", on_bad_batch, one_of({"stop", "skip"}));
    v("max_skipped_steps", max_skipped_steps, at_least(1));
  }
};

// A held-out set scored by the VLM trainers: token loss, exact match of the generated final
// reply (per `question_type` when records have one) and, for records with a shapes-world
// `scene`, which objects a generated caption names.
struct EvalSet {
  std::string name;    // key prefix in the results, e.g. "vqa"
  std::string data;    // manifest
  int64_t limit = 0;   // first N records; 0 = all
  template <class V> void fields(V& v) {
    v("name", name);
    v("data", data);
    v("limit", limit, at_least(0));
  }
};

struct EvalSection {
  std::vector<int64_t> recall_at = {1, 5, 10};
  // Samples per evaluation forward: in stage 1 this many image-caption pairs; in stages 2-3 and
  // preference runs at most this many, and never more than the training micro-batch
  // (train.batch_size / train.grad_accum), so lowering it lowers an evaluation's memory.
  int batch_size = 256;
  std::vector<EvalSet> sets;    // VLM trainers; empty = data.val (data.val_limit) as "val"
  int max_new_tokens = 32;      // generation length cap for exact match / captions
  bool at_start = false;        // also score the starting model (step 0) on a fresh run
  // GRPO: completions drawn per held-out prompt at the loss's sampling settings, scored besides
  // the greedy one (sampled/exact_match: the mean reward of the policy's own draws); 0 = greedy only.
  int64_t samples = 0;
  // JSON {"category": ["phrase", ...]} naming the objects CHAIR looks for in replies to records
  // with an "objects" list; "" = each listed object names itself (eval/caption_objects.h).
  std::string object_vocabulary;
  template <class V> void fields(V& v) {
    v("recall_at", recall_at);
    v("batch_size", batch_size, at_least(1));
    v("sets", sets);
    v("max_new_tokens", max_new_tokens, at_least(1));
    v("at_start", at_start);
    v("samples", samples, at_least(0));
    v("object_vocabulary", object_vocabulary);
  }
  // The evaluation batch of a VLM run whose training micro-batch is `micro`.
  int vlm_batch(int micro) const { return std::max(1, std::min(batch_size, micro)); }
};

// The preference trainer's own switches (the loss's options live under loss:).
struct PreferenceSection {
  // Compute the reference model's log-probs of every training pair once, before the first step,
  // and drop the reference model when no other pass needs it (mDPO's corrupted-image passes do).
  // Needs deterministic inputs: refused with data.augment.random_resized_crop.
  bool cache_reference = false;
  template <class V> void fields(V& v) { v("cache_reference", cache_reference); }
};

// Multi-process data parallel (core/distributed.h). The process group itself comes from the
// launcher's environment (torchrun, Slurm or `trialign train --nproc N`); these keys only say how
// to talk. train.batch_size is per rank: the global batch is batch_size x world size.
struct DistributedSection {
  std::string backend = "auto";  // auto (nccl on CUDA, else gloo) | gloo | nccl
  int64_t timeout_s = 1800;      // a collective that waits longer (a dead or stuck rank) fails the run
  int64_t bucket_mb = 25;        // gradients are all-reduced in flat buckets of about this size
  template <class V> void fields(V& v) {
    v("backend", backend, one_of({"auto", "gloo", "nccl"}));
    v("timeout_s", timeout_s, at_least(1));
    v("bucket_mb", bucket_mb, at_least(1));
  }
};

// `trialign bench` (trainers/bench.h): timed optimizer steps of the config's trainer on synthetic
// batches of a fixed shape. A bench card (configs/bench/) has no data of its own.
struct BenchSection {
  bool card = false;           // no data of its own: data.train / data.tokenizer may be empty; not trainable
  int64_t warmup = 3;          // untimed steps first
  int64_t steps = 10;          // timed steps (the median is reported)
  int64_t text_tokens = 48;    // VLM sequences: text tokens after the image's visual tokens
  int64_t loss_tokens = 24;    // the last ones carry the loss (the reply; chosen / rejected differ there)
  int64_t images = 64;         // distinct images, rendered once and decoded from PNG for every batch
  int64_t matmul_size = 1024;  // n of the n x n matmul whose FLOP/s is the peak the model's is compared with
  template <class V> void fields(V& v) {
    v("card", card);
    v("warmup", warmup, at_least(0));
    v("steps", steps, at_least(1));
    v("text_tokens", text_tokens, at_least(2));
    v("loss_tokens", loss_tokens, at_least(1));
    v("images", images, at_least(1));
    v("matmul_size", matmul_size, at_least(16));
  }
};

struct RunConfig {
  // contrastive (stage 1) | adapter (stage 2: projector only) | finetune (stage 3 and LM
  // pretraining: whatever optim.param_groups leaves trainable) | preference (DPO, mDPO, GRPO:
  // the loss decides; see losses/preference.h)
  std::string trainer = "contrastive";
  RunSection run;
  DataConfig data;
  ModelConfig model;
  TypedSpec loss{"", {}, "loss"};  // default: infonce (contrastive), cross_entropy (adapter, finetune), dpo (preference)
  // Reward functions of losses that sample completions (GRPO), each {type, weight, options};
  // empty = [{type: exact_match}].
  std::vector<TypedSpec> rewards;
  PreferenceSection preference;
  DistributedSection distributed;
  BenchSection bench;
  std::vector<InitFrom> init_from;  // fresh runs only: components from earlier checkpoints
  std::vector<std::string> plugins;  // shared libraries to load first (core/plugins.h)
  OptimConfig optim;
  ScheduleConfig schedule;
  TrainSection train;
  EvalSection eval;

  std::string source;  // the file it came from (not a YAML key)

  template <class V> void fields(V& v) {
    v("trainer", trainer, one_of({"contrastive", "adapter", "finetune", "preference"}));
    v("plugins", plugins);
    v("run", run);
    v("data", data);
    v("model", model);
    v("loss", loss);
    v("optim", optim);
    v("schedule", schedule);
    v("train", train);
    v("eval", eval);
    v("init_from", init_from);
    v("rewards", rewards);
    v("preference", preference);
    v("distributed", distributed);
    v("bench", bench);
  }
  bool is_vlm() const { return trainer != "contrastive"; }
};

// Loads, composes and validates a run config: file + includes + overrides, typed reading,
// cross-field checks and every `type:` component's options. Relative paths inside the config are
// taken relative to the current directory, like every path on the command line. Every problem is
// reported in one ConfigError.
RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same, from an already composed tree (tests, checkpoints).
RunConfig run_config_from_tree(const ConfigNode& tree, const std::string& label);
std::string resolved_yaml(const RunConfig& cfg);

}  // namespace trialign
