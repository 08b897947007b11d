#include "trainers/bench.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <torch/csrc/autograd/profiler_legacy.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <opencv2/imgcodecs.hpp>
#include <optional>
#include <sstream>

#include "core/errors.h"
#include "core/rng.h"
#include "data/caption_dataset.h"
#include "data/image.h"
#include "data/prefetch_loader.h"
#include "data/preference_dataset.h"
#include "data/shapes_world.h"
#include "losses/loss.h"
#include "losses/preference.h"
#include "trainers/contrastive.h"
#include "trainers/fused_adamw.h"
#include "trainers/preference_passes.h"
#include "trainers/vlm.h"
#include "core/json_text.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// One transformer layer over s tokens of width d, MLP width f, with q/o of width d and k/v of
// width kv: 2 FLOPs per weight per token for the projections, 2 * s * d each for QK^T and AV.
double layer_flops(double s, double d, double kv, double f, int mlp_matrices) {
  return 2.0 * s * (2.0 * d * d + 2.0 * d * kv + mlp_matrices * d * f) + 4.0 * s * s * d;
}

// The same layer read at r of the s rows: keys and values for every token, the query, output
// projection, MLP and attention products for those rows (r = s gives layer_flops).
double rows_layer_flops(double s, double r, double d, double kv, double f, int mlp_matrices) {
  return 2.0 * s * 2.0 * d * kv + 2.0 * r * (2.0 * d * d + mlp_matrices * d * f) + 4.0 * r * s * d;
}
double pooled_layer_flops(double s, double d, double kv, double f, int mlp_matrices) {
  return rows_layer_flops(s, 1, d, kv, f, mlp_matrices);
}

}  // namespace

double vision_forward_flops(const VisionConfig& v, int layers) {
  const double p = static_cast<double>(v.image_size / v.patch_size) * (v.image_size / v.patch_size);
  const double d = v.hidden_size, patch = 2.0 * v.num_channels * v.kernel() * v.kernel() * d * p;
  return patch + (layers < 0 ? v.num_hidden_layers : layers) * layer_flops(p + 1, d, d, v.intermediate_size, 2);
}

double vision_pooled_flops(const VisionConfig& v) {
  const int L = v.num_hidden_layers;
  if (v.pooling != "cls" || L == 0) return vision_forward_flops(v);
  const double p = static_cast<double>(v.image_size / v.patch_size) * (v.image_size / v.patch_size);
  const double d = v.hidden_size;
  return vision_forward_flops(v, L - 1) + pooled_layer_flops(p + 1, d, d, v.intermediate_size, 2);
}

double text_forward_flops(const TextConfig& t, int64_t tokens, int projection_dim) {
  const double d = t.hidden_size, s = static_cast<double>(tokens);
  const int L = t.num_hidden_layers;
  const double layers = L == 0 ? 0.0
                               : (L - 1) * layer_flops(s, d, d, t.intermediate_size, 2) +
                                     pooled_layer_flops(s, d, d, t.intermediate_size, 2);
  return layers + 2.0 * d * projection_dim;
}

double llm_forward_flops(const LlamaConfig& l, int64_t positions, int64_t head_positions) {
  const double s = static_cast<double>(positions), d = l.hidden_size, r = static_cast<double>(head_positions);
  const double kv = static_cast<double>(l.kv_heads()) * l.head_dim();
  const int L = l.num_hidden_layers;
  if (L == 0) return 2.0 * r * d * l.vocab_size;
  return (L - 1) * layer_flops(s, d, kv, l.intermediate_size, 3) + rows_layer_flops(s, r, d, kv, l.intermediate_size, 3) +
         2.0 * r * d * l.vocab_size;
}

int backward_multiple(bool trains, bool gradient_passes) { return trains ? 2 : gradient_passes ? 1 : 0; }

double bench_step_flops(const RunConfig& cfg, const std::set<std::string>& trainable, double projector_weight_params,
                        bool reference) {
  const double B = static_cast<double>(cfg.train.batch_size);
  const auto& m = cfg.model;
  if (!cfg.is_vlm()) {  // both towers and their projections train
    const double image = vision_pooled_flops(m.vision) + 2.0 * m.vision.hidden_size * m.projection_dim;
    return 3.0 * B * (image + text_forward_flops(m.text, cfg.data.max_text_len, m.projection_dim));
  }
  // Visual tokens per image and the sequence length after the placeholder expands.
  const double tpi = static_cast<double>(visual_tokens_per_image(m));
  const int64_t positions = static_cast<int64_t>(tpi) + cfg.bench.text_tokens;
  const int states = m.vision.num_hidden_layers + 1, tap = m.vision_feature_layer;
  const double f_vision = vision_forward_flops(m.vision, tap < 0 ? states + tap : tap), f_proj = 2.0 * projector_weight_params * tpi,
               f_llm = llm_forward_flops(m.llm, positions, cfg.bench.loss_tokens);
  const bool v = trainable.count("vision_model") > 0, p = trainable.count("mm_projector") > 0,
             l = trainable.count("language_model") > 0;
  const double per_sequence = f_vision * (1 + backward_multiple(v, false)) + f_proj * (1 + backward_multiple(p, v)) +
                              f_llm * (1 + backward_multiple(l, v || p));
  if (cfg.trainer != "preference") return B * per_sequence;
  // chosen + rejected of every pair through the policy, and through the reference forward only
  return 2.0 * B * per_sequence + (reference ? 2.0 * B * (f_vision + f_proj + f_llm) : 0.0);
}

namespace {

// Peak FLOP/s of an n x n matmul in the run's precision, with the run's threads.
double matmul_peak(int64_t n, bool bf16) {
  const auto dtype = bf16 ? torch::kBFloat16 : torch::kFloat32;
  auto a = torch::randn({n, n}).to(dtype), b = torch::randn({n, n}).to(dtype);
  for (int i = 0; i < 2; ++i) (void)torch::mm(a, b);
  int reps = 0;
  const auto t0 = Clock::now();
  double t = 0;
  while (reps < 3 || t < 0.5) {
    (void)torch::mm(a, b);
    ++reps;
    t = seconds_since(t0);
  }
  return 2.0 * static_cast<double>(n) * n * n * reps / t;
}

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;  // Linux reports KiB
}

// `count` shapes-world scenes rendered once as PNG under RUN/bench_images; the batches decode them.
std::vector<std::string> render_images(const RunConfig& cfg) {
  const fs::path dir = fs::path(cfg.run.out_dir) / "bench_images";
  fs::create_directories(dir);
  shapes::GeneratorOptions gen;
  gen.image_size = std::max(16, cfg.data.image_size);
  gen.seed = cfg.run.seed;
  std::vector<std::string> paths;
  for (int64_t i = 0; i < cfg.bench.images; ++i) {
    const fs::path png = dir / ("bench_" + std::to_string(i) + ".png");
    if (!fs::exists(png) && !cv::imwrite(png.string(), shapes::render(shapes::sample_scene(gen, "bench", i), gen.image_size)))
      throw ConfigError("bench: cannot write " + png.string() + " (run.out_dir must be writable)");
    paths.push_back(png.string());
  }
  return paths;
}

// Decode + transform of one core: images per second over at least half a second.
double decode_rate(const std::vector<std::string>& images, const DataConfig& data) {
  const bool augment = data.augment.random_resized_crop;
  int64_t n = 0;
  const auto t0 = Clock::now();
  double t = 0;
  while (n < 32 || t < 0.5) {
    (void)load_sample_image(images[static_cast<size_t>(n) % images.size()], data, augment, static_cast<uint64_t>(n), "");
    ++n;
    t = seconds_since(t0);
  }
  return static_cast<double>(n) / t;
}

// n uniform random ids in [lo, hi), seeded per sample, never `avoid` (a tokenizer's <image> id can
// sit inside that range, and a stray placeholder would ask for an image the sample does not have).
std::vector<int64_t> random_ids(int64_t n, int64_t lo, int64_t hi, uint64_t seed, int64_t avoid = -1) {
  Rng rng(seed);
  const bool skip = avoid >= lo && avoid < hi;
  std::vector<int64_t> ids(static_cast<size_t>(n));
  for (auto& id : ids) {
    id = lo + static_cast<int64_t>(rng.below(static_cast<uint64_t>(hi - lo - (skip ? 1 : 0))));
    if (skip && id >= avoid) ++id;
  }
  return ids;
}

// A stop signal (SIGINT / SIGTERM) between bench steps.
struct BenchStopped : std::runtime_error {
  BenchStopped() : std::runtime_error("bench stopped") {}
};

struct Timing {
  std::vector<double> step_s, wait_s;
};

// warmup + steps optimizer steps; `step(batch)` runs one. Step time includes the wait for data.
// With `profile`, the timed steps run under the autograd profiler, which writes a Chrome trace
// (chrome://tracing, Perfetto) of every operator there when it stops.
template <class Batch, class Step>
Timing time_steps(PrefetchLoader<Batch>& loader, const BenchSection& b, const BenchOptions& opt, Step&& step) {
  Timing t;
  const int64_t total = b.warmup + b.steps;
  std::unique_ptr<torch::autograd::profiler::RecordProfile> profiler;
  for (int64_t s = 0; s < total; ++s) {
    if (stop_requested()) throw BenchStopped();  // Ctrl-C: no figures from a partial run
    if (s == b.warmup && !opt.profile.empty())
      profiler = std::make_unique<torch::autograd::profiler::RecordProfile>(opt.profile);
    const auto t0 = Clock::now();
    const double w0 = loader.wait_seconds();
    Batch batch = loader.next();
    const double wait = loader.wait_seconds() - w0;
    step(batch);
    const double dt = seconds_since(t0);
    if (s >= b.warmup) t.step_s.push_back(dt), t.wait_s.push_back(wait);
    if (!opt.quiet)
      spdlog::info("bench step {}/{}{}: {:.3f} s (data wait {:.3f} s)", s + 1, total, s < b.warmup ? " (warm-up)" : "", dt,
                   wait);
  }
  profiler.reset();
  if (!opt.profile.empty()) spdlog::info("profile of the timed steps: {}", opt.profile);
  return t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The vocabulary the synthetic ids come from: the model's, or the tokenizer's when it is 0.
int resolve_vocab(int configured, const std::optional<Tokenizer>& tok, const std::string& key) {
  if (configured > 0) return configured;
  if (!tok)
    throw ConfigError(key + " is 0 (follow the tokenizer) but data.tokenizer is empty; a bench card sets the vocabulary, "
                            "e.g. " + key + ": 2048");
  return tok->vocab_size();
}

struct Measured {
  Timing timing;
  double flops = 0, samples = 0, tokens = 0;
  int64_t trainable_params = 0;
  // The optimizer's groups (options, parameter shapes), for the optimizer timing after the steps.
  std::vector<std::pair<torch::optim::AdamWOptions, std::vector<std::vector<int64_t>>>> groups;
};

void record_groups(Measured& m, torch::optim::Optimizer& opt) {
  for (auto& g : opt.param_groups()) {
    std::vector<std::vector<int64_t>> shapes;
    for (const auto& p : g.params()) shapes.push_back(p.sizes().vec());
    m.groups.emplace_back(static_cast<const torch::optim::AdamWOptions&>(g.options()), std::move(shapes));
  }
}

// The AdamW update of weights shaped and grouped like the trained ones (the same decay and
// no-decay groups), timed with the fused optimizer the trainers use and with LibTorch's
// (interleaved, median of 5 after 2 untimed each): what the one-pass update saves per step on
// this machine. Seconds, {fused, LibTorch}.
std::pair<double, double> optimizer_step_times(const Measured& m) {
  std::vector<std::vector<torch::Tensor>> params;
  for (const auto& [options, shapes] : m.groups) {
    params.emplace_back();
    for (const auto& s : shapes) {
      auto p = torch::randn(s).requires_grad_(true);
      p.mutable_grad() = torch::randn(s);
      params.back().push_back(p);
    }
  }
  auto groups = [&] {
    std::vector<torch::optim::OptimizerParamGroup> g;
    for (size_t i = 0; i < params.size(); ++i)
      g.emplace_back(params[i], std::make_unique<torch::optim::AdamWOptions>(m.groups[i].first));
    return g;
  };
  FusedAdamW fused(groups());
  torch::optim::AdamW reference(groups());
  std::vector<double> tf, tr;
  for (int i = 0; i < 7; ++i) {
    auto t0 = Clock::now();
    fused.step();
    if (i >= 2) tf.push_back(seconds_since(t0));
    t0 = Clock::now();
    reference.step();
    if (i >= 2) tr.push_back(seconds_since(t0));
  }
  return {median(tf), median(tr)};
}

Measured bench_contrastive(RunConfig& cfg, const std::optional<Tokenizer>& tok, const std::vector<std::string>& images,
                           bool bf16, const BenchOptions& opt) {
  cfg.model.text.vocab_size = resolve_vocab(cfg.model.text.vocab_size, tok, "model.text.vocab_size");
  ClipModel model(cfg.model);
  auto loss = contrastive_losses().create_or_throw(cfg.loss);
  const auto named = trainable_params(model, *loss);
  std::vector<torch::Tensor> params;
  Measured m;
  for (const auto& [n, p] : named) params.push_back(p), m.trainable_params += p.numel();
  FusedAdamW optimizer(adamw_groups(named, cfg.optim));

  // Every caption fills the context: [bos] random ids [eos].
  const int64_t T = cfg.data.max_text_len, V = cfg.model.text.vocab_size, B = cfg.train.batch_size;
  const int64_t bos = tok ? tok->bos_id() : 2, eos = tok ? tok->eos_id() : 3, pad = tok ? tok->pad_id() : 0;
  const int64_t n = std::max<int64_t>(B, static_cast<int64_t>(images.size()));
  std::vector<std::string> paths;
  std::vector<std::vector<int64_t>> tokens;
  for (int64_t i = 0; i < n; ++i) {
    auto ids = random_ids(T - 2, 4, V, mix_seed({cfg.run.seed, static_cast<uint64_t>(i)}));
    ids.insert(ids.begin(), bos);
    ids.push_back(eos);
    tokens.push_back(std::move(ids));
    paths.push_back(images[static_cast<size_t>(i) % images.size()]);
  }
  CaptionDataset data(std::move(paths), std::move(tokens), cfg.data, static_cast<int>(pad), true);
  EpochSampler sampler(cfg.run.seed, data.size());
  const int64_t total = cfg.bench.warmup + cfg.bench.steps;
  PrefetchLoader<CaptionBatch> loader([&](int64_t s) { return data.collate(sampler.batch(s, B), cfg.run.seed); }, 0,
                                      total, cfg.data.workers, cfg.data.prefetch);
  TrainOptions topt;
  StepGuard guard(cfg, topt, [] { return std::string(); });
  model->train();
  int64_t step = 0;
  m.timing = time_steps(loader, cfg.bench, opt, [&](const CaptionBatch& batch) {
    set_lr(optimizer, lr_at(cfg.schedule, cfg.optim.lr, step, total));
    optimizer.release_grads();
    const auto out = contrastive_step(model, *loss, batch, cfg.train.grad_accum, bf16);
    if (guard.clip(++step, out.loss, params)) {
      optimizer.step();
      loss->post_step();
    }
  });
  m.flops = bench_step_flops(cfg, {}, 0, false);
  m.samples = static_cast<double>(B);
  const int64_t side = cfg.model.vision.image_size / cfg.model.vision.patch_size;
  m.tokens = static_cast<double>(B * (side * side + 1 + T));
  record_groups(m, optimizer);
  return m;
}

// One synthetic VLM sequence: [<image>] prompt ids, then `reply` ids (labelled).
TokenizedConversation synthetic_sequence(const std::vector<int64_t>& prompt, const std::vector<int64_t>& reply,
                                         int64_t image_id) {
  TokenizedConversation t;
  t.ids.push_back(image_id);
  t.ids.insert(t.ids.end(), prompt.begin(), prompt.end());
  t.labels.assign(t.ids.size(), kIgnoreIndex);
  t.ids.insert(t.ids.end(), reply.begin(), reply.end());
  t.labels.insert(t.labels.end(), reply.begin(), reply.end());
  t.num_images = 1;
  return t;
}

// The VLM, its trainable parameters and the components whose weights train.
struct VlmSetup {
  VlmModel model{nullptr};
  ParamPlan plan;
  std::vector<torch::Tensor> params;
  std::set<std::string> trainable;
  double projector_weights = 0;
  int64_t image_id = 0, vocab = 0;
};

VlmSetup build_vlm(RunConfig& cfg, const std::optional<Tokenizer>& tok) {
  VlmSetup s;
  cfg.model.llm.vocab_size = resolve_vocab(cfg.model.llm.vocab_size, tok, "model.llm.vocab_size");
  s.vocab = cfg.model.llm.vocab_size;
  s.image_id = tok && tok->image_id() >= 0 ? tok->image_id() : s.vocab - 1;  // a card's placeholder: the last id
  const int64_t expanded = visual_tokens_per_image(cfg.model) + cfg.bench.text_tokens;
  if (expanded > cfg.data.max_seq_len)
    throw ConfigError("bench: a sequence of " + std::to_string(visual_tokens_per_image(cfg.model)) + " visual + " +
                      std::to_string(cfg.bench.text_tokens) + " text tokens (bench.text_tokens) is longer than data.max_seq_len (" +
                      std::to_string(cfg.data.max_seq_len) + "); raise data.max_seq_len or lower bench.text_tokens");
  s.model = VlmModel(cfg.model);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& p : s.model->named_parameters(true)) named.emplace_back(p.key(), p.value());
  s.plan = plan_param_groups(named, cfg.optim);
  for (const auto& [name, p] : s.plan.trainable) s.params.push_back(p), s.trainable.insert(component_of(name));
  for (const auto& p : s.model->mm_projector->parameters())
    if (p.dim() >= 2) s.projector_weights += static_cast<double>(p.numel());
  set_vlm_train_modes(s.model);
  return s;
}

Measured bench_vlm(RunConfig& cfg, const std::optional<Tokenizer>& tok, const std::vector<std::string>& images,
                   bool bf16, const BenchOptions& opt) {
  VlmSetup s = build_vlm(cfg, tok);
  auto loss = lm_losses().create_or_throw(cfg.loss);
  FusedAdamW optimizer(s.plan.groups);
  const int64_t B = cfg.train.batch_size, reply = cfg.bench.loss_tokens, prompt = cfg.bench.text_tokens - reply;
  const int64_t n = std::max<int64_t>(B, static_cast<int64_t>(images.size()));
  std::vector<ConversationSample> samples;
  for (int64_t i = 0; i < n; ++i) {
    ConversationSample c;
    c.where = c.id = "bench " + std::to_string(i);
    c.images = {images[static_cast<size_t>(i) % images.size()]};
    const uint64_t seed = mix_seed({cfg.run.seed, static_cast<uint64_t>(i)});
    c.tokens = synthetic_sequence(random_ids(prompt, 4, s.vocab - 1, seed, s.image_id),
                                  random_ids(reply, 4, s.vocab - 1, seed + 1, s.image_id), s.image_id);
    samples.push_back(std::move(c));
  }
  ConversationDataset data(std::move(samples), cfg.data, true);
  EpochSampler sampler(cfg.run.seed, data.size());
  const int64_t total = cfg.bench.warmup + cfg.bench.steps;
  PrefetchLoader<ConversationBatch> loader([&](int64_t st) { return data.collate(sampler.batch(st, B), cfg.run.seed); },
                                           0, total, cfg.data.workers, cfg.data.prefetch);
  TrainOptions topt;
  StepGuard guard(cfg, topt, [] { return std::string(); });
  MicroBatchThreads micro_threads(cfg.train.micro_batch_threads, at::get_num_threads(), s.params);
  int64_t step = 0;
  Measured m;
  m.timing = time_steps(loader, cfg.bench, opt, [&](const ConversationBatch& batch) {
    set_lr_scaled(optimizer, s.plan.base_lrs, lr_at(cfg.schedule, 1.0, step, total));
    optimizer.release_grads();
    const auto out = vlm_step(s.model, *loss, batch, cfg.train.grad_accum, s.image_id, bf16, 0, &micro_threads);
    if (guard.clip(++step, out.loss, s.params)) optimizer.step();
  });
  for (const auto& p : s.params) m.trainable_params += p.numel();
  m.flops = bench_step_flops(cfg, s.trainable, s.projector_weights, false);
  m.samples = static_cast<double>(B);
  m.tokens = static_cast<double>(B * (visual_tokens_per_image(cfg.model) + cfg.bench.text_tokens));
  record_groups(m, optimizer);
  return m;
}

Measured bench_preference(RunConfig& cfg, const std::optional<Tokenizer>& tok, const std::vector<std::string>& images,
                          bool bf16, const BenchOptions& opt) {
  auto loss = preference_losses().create_or_throw(cfg.loss);
  if (loss->sampling())
    throw ConfigError("bench: loss '" + cfg.loss.type +
                      "' samples its completions (GRPO); the bench times preference losses on pairs (dpo, mdpo, ...)");
  torch::manual_seed(cfg.run.seed);
  VlmSetup s = build_vlm(cfg, tok);
  VlmModel reference{nullptr};
  if (loss->needs_reference()) reference = frozen_copy(s.model, cfg.model);  // as the trainer builds it
  FusedAdamW optimizer(s.plan.groups);
  const int64_t B = cfg.train.batch_size, reply = cfg.bench.loss_tokens, prompt = cfg.bench.text_tokens - reply;
  const int64_t n = std::max<int64_t>(B, static_cast<int64_t>(images.size()));
  std::vector<PreferenceSample> samples;
  for (int64_t i = 0; i < n; ++i) {
    PreferenceSample p;
    p.where = p.id = "bench " + std::to_string(i);
    p.images = {images[static_cast<size_t>(i) % images.size()]};
    const uint64_t seed = mix_seed({cfg.run.seed, static_cast<uint64_t>(i)});
    const auto prompt_ids = random_ids(prompt, 4, s.vocab - 1, seed, s.image_id);
    p.chosen = synthetic_sequence(prompt_ids, random_ids(reply, 4, s.vocab - 1, seed + 1, s.image_id), s.image_id);
    p.rejected = synthetic_sequence(prompt_ids, random_ids(reply, 4, s.vocab - 1, seed + 2, s.image_id), s.image_id);
    p.prompt.assign(p.chosen.ids.begin(), p.chosen.ids.begin() + 1 + prompt);
    samples.push_back(std::move(p));
  }
  PreferenceDataset data(std::move(samples), cfg.data, PreferenceDataset::Kind::Pairs, true);
  EpochSampler sampler(cfg.run.seed, data.size());
  const int64_t total = cfg.bench.warmup + cfg.bench.steps, accum = cfg.train.grad_accum, mb = B / accum;
  PrefetchLoader<PreferenceBatch> loader([&](int64_t st) { return data.collate(sampler.batch(st, B), cfg.run.seed); }, 0,
                                         total, cfg.data.workers, cfg.data.prefetch);
  TrainOptions topt;
  StepGuard guard(cfg, topt, [] { return std::string(); });
  VlmModel* ref = reference.is_empty() ? nullptr : &reference;
  MicroBatchThreads micro_threads(cfg.train.micro_batch_threads, at::get_num_threads(), s.params);
  int64_t step = 0;
  Measured m;
  m.timing = time_steps(loader, cfg.bench, opt, [&](const PreferenceBatch& batch) {
    set_lr_scaled(optimizer, s.plan.base_lrs, lr_at(cfg.schedule, 1.0, step, total));
    optimizer.release_grads();
    double chosen_tokens = 0;
    for (auto i : batch.indices) chosen_tokens += static_cast<double>(response_tokens(data.sample(i).chosen.labels));
    LossOutput total;
    total.loss = torch::zeros({});
    const auto outs = run_micro_batches(&micro_threads, accum, [&](int64_t j) {
      auto in = pair_passes(*loss, s.model, ref, data, batch.slice(j * mb, (j + 1) * mb), s.image_id, bf16,
                            mix_seed({cfg.run.seed, static_cast<uint64_t>(step), static_cast<uint64_t>(j)}));
      in.share = static_cast<double>(mb) / static_cast<double>(B);
      in.step_response_tokens = std::max(1.0, chosen_tokens);
      return loss->forward(in);
    });
    for (const auto& o : outs) add_output(total, o);
    if (guard.clip(++step, total.loss, s.params)) optimizer.step();
  });
  for (const auto& p : s.params) m.trainable_params += p.numel();
  m.flops = bench_step_flops(cfg, s.trainable, s.projector_weights, !reference.is_empty());
  m.samples = static_cast<double>(B);
  m.tokens = static_cast<double>(2 * B * (visual_tokens_per_image(cfg.model) + cfg.bench.text_tokens));
  record_groups(m, optimizer);
  return m;
}

}  // namespace

nlohmann::json run_bench(const RunConfig& cfg_in, const BenchOptions& opt) {
  RunConfig cfg = cfg_in;
  if (world_size() > 1)
    throw ConfigError("bench: runs in one process; start it without --nproc / torchrun");
  if (cfg.train.batch_size % cfg.train.grad_accum != 0)
    throw ConfigError("train.batch_size (" + std::to_string(cfg.train.batch_size) + ") is not divisible by train.grad_accum (" +
                      std::to_string(cfg.train.grad_accum) + ")");
  // Output files are opened before the minutes of stepping, not after.
  for (const auto& [flag, path] : {std::pair<std::string, std::string>{"--json", opt.json_out}, {"--profile", opt.profile}})
    if (!path.empty() && !std::ofstream(path, std::ios::app))
      throw ConfigError("bench " + flag + ": cannot write '" + path + "' (does its folder exist?)");
  const PreparedRun prepared = prepare_run(cfg);  // holds run.out_dir until this returns
  const int threads = prepared.threads;
  const std::string precision = resolve_precision(cfg.run.precision);
  const bool bf16 = precision == "bf16";
  torch::manual_seed(cfg.run.seed);
  std::optional<Tokenizer> tok;
  if (!cfg.data.tokenizer.empty()) tok = Tokenizer::load(cfg.data.tokenizer);

  const auto images = render_images(cfg);
  const double decode = decode_rate(images, cfg.data);
  // The peak is timed before and after the steps and the higher taken: on a shared machine one
  // half-second sample can land in a slow patch.
  double peak = matmul_peak(cfg.bench.matmul_size, bf16);
  spdlog::info("bench {} ({} trainer, loss {}): batch {}, {} warm-up + {} timed steps, {} threads, precision {}{}",
               cfg.run.name, cfg.trainer, cfg.loss.type.empty() ? "default" : cfg.loss.type, cfg.train.batch_size,
               cfg.bench.warmup, cfg.bench.steps, threads, precision,
               cfg.run.precision == "auto" ? std::string(bf16 ? " (auto: CPU has native bf16)" : " (auto: no native bf16 on this CPU)")
                                           : "");
  Measured m;
  try {
    if (!cfg.is_vlm()) m = bench_contrastive(cfg, tok, images, bf16, opt);
    else if (cfg.trainer == "preference") m = bench_preference(cfg, tok, images, bf16, opt);
    else m = bench_vlm(cfg, tok, images, bf16, opt);
  } catch (const BenchStopped&) {
    spdlog::warn("bench stopped by a signal before its last step: no figures written");
    std::error_code ec;  // the --json file opened before the steps, unless it held something already
    if (!opt.json_out.empty() && std::filesystem::file_size(opt.json_out, ec) == 0 && !ec)
      std::filesystem::remove(opt.json_out, ec);
    return nlohmann::json();
  }

  peak = std::max(peak, matmul_peak(cfg.bench.matmul_size, bf16));
  const double rss = peak_rss_mb();  // before the optimizer timing's copies of the weights
  const auto [adamw_fused, adamw_libtorch] = optimizer_step_times(m);
  const double med = median(m.timing.step_s);
  const double step_sum = std::accumulate(m.timing.step_s.begin(), m.timing.step_s.end(), 0.0);
  const double wait_sum = std::accumulate(m.timing.wait_s.begin(), m.timing.wait_s.end(), 0.0);
  nlohmann::json j;
  j["config"] = cfg.source;
  j["name"] = cfg.run.name;
  j["trainer"] = cfg.trainer;
  j["loss"] = cfg.loss.type;
  j["precision"] = precision;
  j["threads"] = threads;
  j["omp_wait_policy"] = std::getenv("OMP_WAIT_POLICY") ? std::getenv("OMP_WAIT_POLICY") : "";
  j["gomp_spincount"] = std::getenv("GOMP_SPINCOUNT") ? std::getenv("GOMP_SPINCOUNT") : "";
  // What setup_threads gave OpenBLAS; one per call while micro-batches run at once.
  j["blas_threads"] = cfg.train.micro_batch_threads > 1 ? 1 : passive_openmp() ? threads : 1;
  j["data_workers"] = cfg.data.workers;
  j["batch_size"] = cfg.train.batch_size;
  j["grad_accum"] = cfg.train.grad_accum;
  j["micro_batch_threads"] = cfg.train.micro_batch_threads;
  j["trainable_parameters"] = m.trainable_params;
  j["warmup_steps"] = cfg.bench.warmup;
  j["timed_steps"] = cfg.bench.steps;
  j["step_s"] = m.timing.step_s;
  j["median_step_s"] = med;
  j["steps_per_s"] = 1.0 / med;
  j["samples_per_s"] = m.samples / med;
  j["tokens_per_step"] = m.tokens;
  j["tokens_per_s"] = m.tokens / med;
  j["model_flops_per_step"] = m.flops;
  j["model_flops_per_s"] = m.flops / med;
  j["matmul_size"] = cfg.bench.matmul_size;
  j["matmul_peak_flops_per_s"] = peak;
  j["fraction_of_matmul_peak"] = m.flops / med / peak;
  j["peak_rss_mb"] = rss;
  j["optimizer_step_s"] = adamw_fused;
  j["optimizer_step_libtorch_s"] = adamw_libtorch;
  j["data_wait_share"] = step_sum > 0 ? wait_sum / step_sum : 0.0;
  j["decode_transform_images_per_s_per_core"] = decode;
  const std::string text = json_text(j, 2) + "\n";
  write_run_text(cfg, "bench.json", text);
  if (!opt.json_out.empty()) {
    std::ofstream f(opt.json_out);
    if (!(f << text)) throw ConfigError("bench: cannot write --json " + opt.json_out);
  }
  return j;
}

std::string bench_table(const nlohmann::json& j) {
  std::ostringstream o;
  auto row = [&](const std::string& k, const std::string& v) { o << "  " << k << std::string(k.size() < 34 ? 34 - k.size() : 1, ' ') << v << "\n"; };
  auto num = [](double v, int digits) {
    std::ostringstream s;
    s.setf(std::ios::fixed);
    s.precision(digits);
    s << v;
    return s.str();
  };
  o << "bench " << j["name"].get<std::string>() << " (" << j["trainer"].get<std::string>() << ", "
    << j["precision"].get<std::string>() << ", " << j["threads"].get<int>() << " threads, OpenBLAS "
    << j["blas_threads"].get<int>() << ", OMP_WAIT_POLICY " << j["omp_wait_policy"].get<std::string>()
    << (j["gomp_spincount"].get<std::string>().empty() ? std::string() : ", GOMP_SPINCOUNT " + j["gomp_spincount"].get<std::string>())
    << (j.value("micro_batch_threads", 1) > 1 ? ", " + std::to_string(j["micro_batch_threads"].get<int>()) + " of " +
                                                    std::to_string(j["grad_accum"].get<int>()) + " micro-batches at once"
                                              : std::string())
    << ")\n";
  row("median step", num(j["median_step_s"].get<double>() * 1e3, 1) + " ms (" + std::to_string(j["timed_steps"].get<int64_t>()) +
                         " timed steps after " + std::to_string(j["warmup_steps"].get<int64_t>()) + " warm-up)");
  row("steps/s", num(j["steps_per_s"].get<double>(), 3));
  row("samples/s", num(j["samples_per_s"].get<double>(), 1));
  row("tokens/s", num(j["tokens_per_s"].get<double>(), 0));
  row("model FLOP/s", num(j["model_flops_per_s"].get<double>() / 1e9, 1) + " GFLOP/s (" +
                          num(j["model_flops_per_step"].get<double>() / 1e9, 2) + " GFLOP per step)");
  row("matmul peak (n=" + std::to_string(j["matmul_size"].get<int64_t>()) + ")",
      num(j["matmul_peak_flops_per_s"].get<double>() / 1e9, 1) + " GFLOP/s");
  row("fraction of matmul peak", num(j["fraction_of_matmul_peak"].get<double>() * 100, 1) + " %");
  row("AdamW update: fused / LibTorch's", num(j["optimizer_step_s"].get<double>() * 1e3, 1) + " / " +
                                              num(j["optimizer_step_libtorch_s"].get<double>() * 1e3, 1) + " ms (" +
                                              std::to_string(j["trainable_parameters"].get<int64_t>()) + " weights)");
  row("peak resident memory", num(j["peak_rss_mb"].get<double>(), 0) + " MiB");
  row("waiting for data", num(j["data_wait_share"].get<double>() * 100, 2) + " % of step time");
  row("decode + transform", num(j["decode_transform_images_per_s_per_core"].get<double>(), 0) + " images/s on one core");
  return o.str();
}

}  // namespace trialign
