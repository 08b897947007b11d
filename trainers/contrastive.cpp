#include "trainers/contrastive.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/logging.h"
#include "core/safetensors.h"
#include "data/prefetch_loader.h"
#include "data/sampler.h"
#include "eval/representation.h"
#include "eval/retrieval.h"
#include "losses/loss.h"
#include "models/hf_interop.h"
#include "tools/data_check.h"
#include "trainers/fused_adamw.h"
#include "trainers/memory_estimate.h"
#include "trainers/preflight.h"
#include "trainers/resume_state.h"

namespace fs = std::filesystem;

namespace trialign {

std::vector<std::pair<std::string, torch::Tensor>> trainable_params(ClipModel& model, ContrastiveLossImpl& loss) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model->named_parameters(true))
    if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
  for (const auto& p : loss.named_parameters(true))
    if (p.value().requires_grad()) out.emplace_back("loss." + p.key(), p.value());
  return out;
}

LossOutput contrastive_step(ClipModel& model, ContrastiveLossImpl& loss, const CaptionBatch& b, int accum, bool bf16) {
  const bool negatives = b.neg_ids.defined() && b.neg_ids.size(0) > 0;
  // Embeddings of rows [from, to) and of the hard negatives those rows own; each [m, E] fp32.
  auto encode = [&](int64_t from, int64_t to) {
    AutocastGuard autocast(bf16);
    ContrastiveInputs in;
    in.image_embeds = model->encode_image(b.pixels.slice(0, from, to));
    in.text_embeds = model->encode_text(b.ids.slice(0, from, to), b.lengths.slice(0, from, to));
    if (negatives) {
      const auto [first, count] = b.neg_rows(from, to);
      if (count > 0)
        in.negative_text_embeds = model->encode_text(b.neg_ids.slice(0, first, first + count),
                                                     b.neg_lengths.slice(0, first, first + count));
    }
    return in;
  };
  // Data parallel: this rank's rows against every rank's (gathered with gradients), its loss and
  // metrics a 1/W share, so that the ranks' gradients and logged values sum to the global batch's.
  const double share = 1.0 / dist::world_size();
  auto score = [&](ContrastiveInputs& in) {
    if (dist::active()) {
      in.all_image_embeds = dist::gather_rows(in.image_embeds, &in.row_offset);
      in.all_text_embeds = dist::gather_rows(in.text_embeds);
      // Collective: a rank whose batch drew no hard negative still takes part in the gather.
      if (dist::any(in.negative_text_embeds.defined() && in.negative_text_embeds.size(0) > 0)) {
        if (!in.negative_text_embeds.defined()) in.negative_text_embeds = torch::zeros({0, in.text_embeds.size(1)});
        in.all_negative_text_embeds = dist::gather_rows(in.negative_text_embeds);
      }
    }
    auto out = loss.forward(in);
    if (share != 1.0) {
      out.loss = out.loss * share;
      for (auto& [k, v] : out.metrics) v = v * share;
    }
    return out;
  };
  if (accum == 1) {
    auto in = encode(0, b.pixels.size(0));
    auto out = score(in);
    out.loss.backward();
    return out;
  }
  // Gradient cache (Gao et al. 2021): embeddings of every micro-batch without a graph, the loss
  // over the whole batch differentiated with respect to them, then each micro-batch re-encoded
  // with a graph and back-propagated with its slice of that gradient.
  const int64_t B = b.pixels.size(0), m = B / accum;
  std::vector<torch::Tensor> imgs, txts, negs;
  {
    torch::NoGradGuard ng;
    for (int j = 0; j < accum; ++j) {
      auto in = encode(j * m, (j + 1) * m);
      imgs.push_back(in.image_embeds);
      txts.push_back(in.text_embeds);
      if (in.has_negatives()) negs.push_back(in.negative_text_embeds);
    }
  }
  ContrastiveInputs all;  // leaves
  all.image_embeds = torch::cat(imgs).requires_grad_(true);
  all.text_embeds = torch::cat(txts).requires_grad_(true);
  if (!negs.empty()) all.negative_text_embeds = torch::cat(negs).requires_grad_(true);
  auto out = score(all);
  out.loss.backward();  // also the loss's own parameters' gradients, exactly once
  const auto g_img = all.image_embeds.grad(), g_txt = all.text_embeds.grad();
  for (int j = 0; j < accum; ++j) {
    auto in = encode(j * m, (j + 1) * m);
    std::vector<torch::Tensor> outputs = {in.image_embeds, in.text_embeds};
    std::vector<torch::Tensor> grads = {g_img.slice(0, j * m, (j + 1) * m), g_txt.slice(0, j * m, (j + 1) * m)};
    if (in.has_negatives()) {
      const auto [first, count] = b.neg_rows(j * m, (j + 1) * m);
      outputs.push_back(in.negative_text_embeds);
      grads.push_back(all.negative_text_embeds.grad().slice(0, first, first + count));
    }
    // A tower frozen by optim.param_groups gives embeddings without a graph: nothing to carry back.
    std::vector<torch::Tensor> live, live_grads;
    for (size_t k = 0; k < outputs.size(); ++k)
      if (outputs[k].requires_grad()) live.push_back(outputs[k]), live_grads.push_back(grads[k]);
    if (!live.empty()) torch::autograd::backward(live, live_grads);
  }
  out.loss = out.loss.detach();
  return out;
}

namespace {

std::string save_checkpoint(const RunConfig& cfg, ClipModel& model, ContrastiveLossImpl& loss,
                            torch::optim::Optimizer& optim, int64_t step, const nlohmann::json& tokenizer,
                            const nlohmann::json& data) {
  CheckpointWriter w(cfg.run.out_dir, step, "contrastive");
  save_safetensors(w.path("model.safetensors"), named_state(*model), {{"format", "pt"}, {"component", "clip"}});
  save_safetensors(w.path("loss.safetensors"), named_state(loss), {{"type", cfg.loss.type}});
  save_optimizer_state(optim, w.path("optimizer.safetensors"));
  save_safetensors(w.path("rng.safetensors"), {{"torch_cpu", get_rng_state()}});
  w.add_json("trainer_state.json", {{"trainer", "contrastive"},
                                    {"step", step},
                                    {"samples_seen", step * global_batch(cfg)},
                                    {"world_size", world_size()},
                                    {"tokenizer", tokenizer},
                                    {"data", data}});
  w.add_text("config.yaml", resolved_yaml(cfg));
  return w.commit(cfg.train.keep_last, cfg.train.keep_every);
}

int64_t load_checkpoint(const std::string& dir, const RunConfig& cfg, ClipModel& model, ContrastiveLossImpl& loss,
                        torch::optim::Optimizer& optim) {
  const int64_t step = check_resume_checkpoint(dir, cfg);
  load_state(*model, load_safetensors(dir + "/model.safetensors"), "", true, dir + "/model.safetensors");
  load_state(loss, load_safetensors(dir + "/loss.safetensors"), "", true, dir + "/loss.safetensors");
  load_resume_state(dir, optim);
  return step;
}

}  // namespace

ClipModel build_clip_model(RunConfig& cfg, const Tokenizer& tok) {
  auto& text = cfg.model.text;
  if (text.vocab_size == 0) text.vocab_size = tok.vocab_size();
  if (text.vocab_size < tok.vocab_size())
    throw ConfigError("model.text.vocab_size (" + std::to_string(text.vocab_size) + ") is smaller than the tokenizer's " +
                      std::to_string(tok.vocab_size()) + " pieces (" + tok.path() + "); set it to 0 to follow the tokenizer");
  return ClipModel(cfg.model);
}

nlohmann::json evaluate_retrieval(ClipModel& model, const CaptionDataset& data, const EvalSection& eval, bool bf16) {
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> imgs, txts;
  std::vector<std::string> captions;
  ProgressLog progress("evaluation: encoding", "pairs", data.size());
  for (int64_t b = 0; b < data.size(); b += eval.batch_size) {
    progress.update(b);
    stop_point();  // a stop signal abandons the evaluation
    auto batch = data.range(b, std::min<int64_t>(data.size(), b + eval.batch_size));
    AutocastGuard autocast(bf16);  // the encoders only; similarities below stay fp32
    imgs.push_back(model->encode_image(batch.pixels));
    txts.push_back(model->encode_text(batch.ids, batch.lengths));
  }
  for (int64_t i = 0; i < data.size(); ++i) captions.push_back(data.caption(i));
  auto I = torch::cat(imgs), T = torch::cat(txts);  // [N, E]
  nlohmann::json j;
  for (const auto& [k, v] : retrieval_recall(I, T, captions, eval.recall_at)) j[k] = v;
  // Representation-level agreement of the two spaces beyond the matched pairs.
  if (I.size(0) > 10) j["alignment/mutual_knn@10"] = mutual_knn_alignment(I, T, 10);
  if (I.size(0) > 1) j["alignment/cka"] = linear_cka(I, T);
  // Records with hard-negative captions: is the true caption ranked above each of them?
  std::vector<const std::vector<int64_t>*> neg_tokens;
  std::vector<int64_t> owner;
  std::vector<std::string> kinds;
  for (int64_t i = 0; i < data.size(); ++i)
    for (const auto& n : data.negatives(i)) neg_tokens.push_back(&n.tokens), owner.push_back(i), kinds.push_back(n.kind);
  if (!neg_tokens.empty()) {
    std::vector<torch::Tensor> negs;
    for (size_t b = 0; b < neg_tokens.size(); b += static_cast<size_t>(eval.batch_size)) {
      const auto end = std::min(neg_tokens.size(), b + static_cast<size_t>(eval.batch_size));
      const auto [ids, lengths] = data.pad({neg_tokens.begin() + b, neg_tokens.begin() + end});
      AutocastGuard autocast(bf16);
      negs.push_back(model->encode_text(ids, lengths));
    }
    for (const auto& [k, v] : hard_negative_accuracy(I, T, torch::cat(negs), owner, kinds)) j[k] = v;
  }
  j["pairs"] = I.size(0);
  if (was_training) model->train();
  return j;
}

ContrastiveResult train_contrastive(const RunConfig& cfg_in, const TrainOptions& opt) {
  RunConfig cfg = cfg_in;
  check_before_training(cfg, opt.resume);
  const PreparedRun prepared = prepare_run(cfg);  // holds run.out_dir until this returns
  const int threads = prepared.threads;
  const std::string precision = resolve_precision(cfg.run.precision);
  const bool bf16 = precision == "bf16";
  torch::manual_seed(cfg.run.seed);

  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  const nlohmann::json tokenizer = tokenizer_record(cfg.data.tokenizer);  // as loaded, for the checkpoints
  ClipModel model = build_clip_model(cfg, tok);
  auto loss = contrastive_losses().create_or_throw(cfg.loss);
  // optim.param_groups as in stages 2-3: a rule freezes a tower or gives it its own lr.
  ParamPlan plan = plan_param_groups(trainable_params(model, *loss), cfg.optim);
  if (rank() == 0 && !cfg.optim.param_groups.empty()) spdlog::info("learning rates: {}", plan.lr_summary);
  std::vector<torch::Tensor> params;
  int64_t n_params = 0, n_frozen = 0;
  for (const auto& [n, p] : plan.trainable) params.push_back(p), n_params += p.numel();
  for (const auto& p : model->parameters())
    if (!p.requires_grad()) n_frozen += p.numel();
  FusedAdamW optimizer(plan.groups);

  const auto encoded_before = tok.coverage();
  CaptionDataset train(cfg.data.train, cfg.data, tok, /*train=*/true);
  warn_unknown_tokens(tok, encoded_before, cfg);
  std::unique_ptr<CaptionDataset> val;
  if (!cfg.data.val.empty()) val = std::make_unique<CaptionDataset>(cfg.data.val, cfg.data, tok, false, cfg.data.val_limit);
  spdlog::info("stage 1 (contrastive, loss {}): {} train pairs{}, {} val pairs, {:.2f}M trainable parameters{}, {} threads, "
               "precision {}{}",
               cfg.loss.type, train.size(),
               train.skipped() ? " (" + std::to_string(train.skipped()) + " bad records skipped)" : std::string(),
               val ? val->size() : 0, n_params / 1e6,
               n_frozen ? fmt::format(" ({:.2f}M frozen)", n_frozen / 1e6) : std::string(), threads, precision,
               cfg.run.precision == "auto" ? " (auto: " + std::string(bf16 ? "CPU has native bf16" : "no native bf16 on this CPU") + ")" : "");
  report_memory(cfg, estimate_memory(cfg, n_params + n_frozen, n_params), available_memory_bytes());
  // A batch wider than the dataset holds some pairs twice: each copy is then a negative of its
  // own image, and the loss pushes a matched pair apart.
  if (rank() == 0 && global_batch(cfg) > static_cast<int64_t>(train.size()))
    spdlog::warn("the global batch ({} = train.batch_size {} x {} ranks) exceeds the {} train pairs, so batches repeat "
                 "pairs, and a repeated pair's copies count as negatives of each other; lower train.batch_size to {} "
                 "or fewer, or add data",
                 global_batch(cfg), cfg.train.batch_size, world_size(), train.size(), train.size() / world_size());
  std::vector<int64_t> left_out;  // records whose images do not decode (train.on_bad_batch: skip)
  if (rank() == 0) left_out = records_reading(train, check_images_before_training(cfg, image_refs(train), stop_requested));
  stop_before_training_if_requested("the check of the training images (data.check_images)");
  left_out = share_left_out_records(left_out, static_cast<int64_t>(train.size()));

  int64_t start = 0;
  const std::string resumed_from = select_resume_checkpoint(cfg.run.out_dir, opt.resume);
  if (!resumed_from.empty()) {
    start = load_checkpoint(resumed_from, cfg, model, *loss, optimizer);
    spdlog::info("resumed from {} at step {}", resumed_from, start);
    forget_after_step(cfg.run.out_dir, start);
  } else {
    for (const auto& init : cfg.init_from) init_components(*model, init, cfg.model, cfg.data.tokenizer);
  }
  {  // every rank starts from rank 0's weights
    auto all = model->parameters();
    for (const auto& p : loss->parameters()) all.push_back(p);
    sync_across_ranks(all);
  }
  write_run_text(cfg, "config.yaml", resolved_yaml(cfg));

  MetricsLog metrics = open_metrics_log(cfg);
  const int64_t steps = cfg.train.steps, B = global_batch(cfg);
  EpochSampler sampler(cfg.run.seed, train.size(), left_out);
  const nlohmann::json data_record = train_data_record(cfg, sampler.size());  // for the checkpoints
  if (!resumed_from.empty()) warn_if_train_records_changed(resumed_from, cfg, data_record);
  PrefetchLoader<CaptionBatch> loader(
      [&](int64_t step) { return train.collate(sampler.batch(step, B, rank(), world_size()), cfg.run.seed); },
                                      start, steps, cfg.data.workers, cfg.data.prefetch);
  Progress progress(start, steps);
  ContrastiveResult result;
  auto run_eval = [&](int64_t step) {
    const auto paused = progress.pause();
    if (!val) return nlohmann::json();
    auto j = evaluate_retrieval(model, *val, cfg.eval, bf16);
    spdlog::info("eval step {}: i2t R@1 {:.3f} R@5 {:.3f} | t2i R@1 {:.3f} R@5 {:.3f} | cos matched {:.3f} mismatched {:.3f} "
                 "| mutual kNN@10 {:.3f} CKA {:.3f}",
                 step, j.value("i2t/R@1", 0.0), j.value("i2t/R@5", 0.0), j.value("t2i/R@1", 0.0),
                 j.value("t2i/R@5", 0.0), j["cosine/matched"].get<double>(), j["cosine/mismatched"].get<double>(),
                 j.value("alignment/mutual_knn@10", 0.0), j.value("alignment/cka", 0.0));
    if (j.contains("negatives/all")) {
      std::string line;
      for (const auto& [k, v] : j.items())
        if (k.rfind("negatives/", 0) == 0) line += fmt::format(" {} {:.3f}", k.substr(10), v.get<double>());
      spdlog::info("eval step {}: true caption above its hard negative:{}", step, line);
    }
    if (eval_record_due(cfg, step, start)) metrics.write({{"step", step}, {"split", "val"}, {"eval", j}});  // not again for a finished run
    return j;
  };

  if (cfg.eval.at_start && start == 0 && rank() == 0) {  // the starting point of the held-out curves
    const auto before = evaluate_unless_stopped([&] { return run_eval(0); }, 0).value_or(nlohmann::json());
    if (!before.is_null()) metrics.write({{"step", 0}, {"split", "val"}, {"eval", before}});
    result.start_eval = before;
  }
  stop_before_training_if_requested("the evaluation before the first step (eval.at_start)");
  model->train();
  int64_t step = start;
  auto save = [&] { return save_checkpoint(cfg, model, *loss, optimizer, step, tokenizer, data_record); };
  StepGuard guard(cfg, opt, save);
  while (step < steps) {
    set_lr_scaled(optimizer, plan.base_lrs, lr_at(cfg.schedule, 1.0, step, steps));
    const double lr = lr_at(cfg.schedule, plan.logged_lr, step, steps);
    CaptionBatch batch;
    if (!guard.next_batch(loader, step + 1, batch)) {  // skipped (train.on_bad_batch: skip)
      ++step;
      if (after_step(cfg, opt, step, result, save, [&] { run_eval(step); })) return result;
      continue;
    }
    optimizer.release_grads();
    LossOutput out = contrastive_step(model, *loss, batch, cfg.train.grad_accum, bf16);
    reduce_gradients(cfg, params);
    const auto gnorm = guard.clip(step + 1, out.loss, params);
    if (gnorm) {
      optimizer.step();
      loss->post_step();
    }
    ++step;

    // ---- diagnostics: log, eval, save ----
    if (step % cfg.train.log_every == 0 || step == steps) {
      const auto rec = record_train_step(metrics, result, step, out.loss, out.metrics, lr, gnorm.value_or(NAN),
                                         loader.wait_seconds(), guard.skipped());
      if (!opt.quiet)
        spdlog::info("{} | loss {:.4f} | lr {:.2e} | acc i2t {:.2f}", progress.line(step, B), rec["loss"].get<double>(), lr,
                     rec["metrics"].value("acc/i2t", 0.0));
    }
    if (after_step(cfg, opt, step, result, save, [&] { run_eval(step); })) return result;
  }
  finish_run(cfg, start, step, resumed_from, progress.elapsed(), result, save, [&] { return run_eval(step); });
  return result;
}

}  // namespace trialign
