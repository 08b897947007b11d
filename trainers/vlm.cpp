#include "trainers/vlm.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>
#include <set>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/errors.h"
#include "core/logging.h"
#include "core/safetensors.h"
#include "data/prefetch_loader.h"
#include "eval/answers.h"
#include "eval/caption_objects.h"
#include "eval/pope.h"
#include "eval/representation.h"
#include "models/hf_interop.h"
#include "tools/data_check.h"
#include "trainers/fused_adamw.h"
#include "trainers/memory_estimate.h"
#include "trainers/preflight.h"
#include "trainers/resume_state.h"

namespace fs = std::filesystem;

namespace trialign {

VlmModel build_vlm_model(RunConfig& cfg, const Tokenizer& tok) {
  auto& llm = cfg.model.llm;
  if (llm.vocab_size == 0) llm.vocab_size = tok.vocab_size();
  if (llm.vocab_size < tok.vocab_size())
    throw ConfigError("model.llm.vocab_size (" + std::to_string(llm.vocab_size) + ") is smaller than the tokenizer's " +
                      std::to_string(tok.vocab_size()) + " pieces (" + tok.path() + "); set it to 0 to follow the tokenizer");
  if (tok.image_id() < 0 && !cfg.data.drop_images)
    throw ConfigError("data.tokenizer '" + tok.path() +
                      "' has no <image> piece, so images cannot be placed in the text; retrain it with `trialign "
                      "tokenizer train` (which adds one)");
  return VlmModel(cfg.model);
}


LabelledStates labelled_states(VlmModel& model, const VlmInputs& in) {
  LabelledStates out;
  const auto next = in.labels.slice(1, 1);  // [B, L-1]
  out.keep = next.ne(kIgnoreIndex);
  out.hidden = model->llm->forward_hidden_at(in.embeds, in.attention_mask, out.keep, in.segment_ids);  // [n, H]
  out.targets = next.index({out.keep});                                                              // [n]
  return out;
}

LossOutput vlm_step(VlmModel& model, LmLossImpl& loss, const ConversationBatch& b, int accum, int64_t image_id, bool bf16,
                    double step_tokens, MicroBatchThreads* threads) {
  const double normaliser = std::max(1.0, step_tokens > 0 ? step_tokens : static_cast<double>(b.target_tokens()));
  const int64_t m = b.size() / accum;
  const auto outs = run_micro_batches(threads, accum, [&](int64_t j) {
    const auto micro = b.slice(j * m, j + 1 == accum ? b.size() : (j + 1) * m);
    torch::Tensor logits, targets;
    {
      AutocastGuard autocast(bf16);
      auto in = model->build_inputs(micro.pixels, micro.ids, micro.labels, image_id, micro.segments);
      auto states = labelled_states(model, in);
      targets = states.targets;                    // [n]
      logits = model->llm->logits(states.hidden);  // [n, V]
    }
    return loss.forward({logits.to(torch::kFloat32), targets, normaliser});
  });
  LossOutput total;
  total.loss = torch::zeros({});
  for (const auto& out : outs) add_output(total, out);
  total.metrics["tokens"] = torch::tensor(static_cast<double>(b.target_tokens()));  // this rank's; summed when logged
  return total;
}

std::vector<std::vector<int64_t>> generate_tokens(VlmModel& model, const Tokenizer& tok,
                                                  const std::vector<std::vector<int64_t>>& prompts,
                                                  const torch::Tensor& pixels, const SamplingOptions& opt_in, bool bf16) {
  torch::NoGradGuard ng;
  std::vector<std::vector<int64_t>> no_labels;
  for (const auto& p : prompts) no_labels.emplace_back(p.size(), kIgnoreIndex);
  AutocastGuard autocast(bf16);
  auto in = model->build_inputs(pixels, prompts, no_labels, tok.image_id());  // right padded
  // Generation continues from the last position, so prompts are left padded instead.
  const int64_t B = in.embeds.size(0), L = in.embeds.size(1);
  auto embeds = torch::zeros_like(in.embeds);
  auto mask = torch::zeros_like(in.attention_mask);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = in.attention_mask[b].sum().item<int64_t>();
    embeds[b].slice(0, L - n, L).copy_(in.embeds[b].slice(0, 0, n));
    mask[b].slice(0, L - n, L).fill_(1);
  }
  SamplingOptions opt = opt_in;
  opt.eos_id = reply_end_id(tok);
  if (tok.image_id() >= 0) opt.banned_ids.push_back(tok.image_id());
  if (tok.bos_id() >= 0 && tok.bos_id() != opt.eos_id) opt.banned_ids.push_back(tok.bos_id());
  return generate(model->llm, embeds, mask, opt).tokens;
}

int64_t reply_end_id(const Tokenizer& tok) { return tok.eos_id() >= 0 ? tok.eos_id() : tok.pad_id(); }

std::vector<std::string> generate_replies(VlmModel& model, const Tokenizer& tok,
                                          const std::vector<std::vector<int64_t>>& prompts, const torch::Tensor& pixels,
                                          const SamplingOptions& opt, bool bf16) {
  std::vector<std::string> out;
  const int64_t eos = reply_end_id(tok);
  for (auto& t : generate_tokens(model, tok, prompts, pixels, opt, bf16)) {
    if (!t.empty() && t.back() == eos) t.pop_back();
    out.push_back(tok.decode(std::vector<int>(t.begin(), t.end())));
  }
  return out;
}

ObjectVocabulary load_eval_vocabulary(const EvalSection& eval) {
  return eval.object_vocabulary.empty() ? ObjectVocabulary{} : ObjectVocabulary::load(eval.object_vocabulary);
}

nlohmann::json evaluate_vlm(VlmModel& model, LmLossImpl& loss, const ConversationDataset& data, const Tokenizer& tok,
                            int batch, int max_new_tokens, bool bf16, const ObjectVocabulary& vocabulary,
                            std::vector<nlohmann::json>* predictions) {
  const bool was_training = model->is_training();
  model->eval();
  torch::NoGradGuard ng;
  double loss_sum = 0, tokens = 0, shuffled_sum = 0, shuffled_tokens = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> exact;  // type -> (right, total)
  std::map<std::string, YesNoCounts> pope;                    // yes/no probes (eval/pope.h)
  ChairCounts chair;  // caption objects: precision, recall, CHAIR
  std::vector<torch::Tensor> pooled_visual, pooled_text;  // [H] each, caption records
  int64_t captions = 0, caption_exact = 0;
  SamplingOptions sampling;
  sampling.max_new_tokens = max_new_tokens;
  ObjectVocabulary own_vocabulary;  // without a vocabulary file: every listed object names itself
  if (vocabulary.empty()) {
    std::set<std::string> categories;
    for (int64_t i = 0; i < data.size(); ++i)
      categories.insert(data.sample(i).reference_objects.begin(), data.sample(i).reference_objects.end());
    own_vocabulary = ObjectVocabulary::from_categories({categories.begin(), categories.end()});
  }
  const ObjectVocabulary& objects_vocabulary = vocabulary.empty() ? own_vocabulary : vocabulary;
  ProgressLog progress("evaluation", "records", data.size());
  for (int64_t start = 0; start < data.size(); start += batch) {
    progress.update(start);
    stop_point();  // a stop signal abandons the evaluation
    const int64_t end = std::min<int64_t>(data.size(), start + batch);
    const auto b = data.range(start, end);
    // Token loss with the right images, and with every image moved to the next sample: the gap
    // says how much the model reads the image (no gap = it answers from the text alone).
    auto token_loss = [&](const torch::Tensor& pixels) -> std::pair<double, double> {
      AutocastGuard autocast(bf16);
      auto in = model->build_inputs(pixels, b.ids, b.labels, tok.image_id(), b.segments);
      const auto states = labelled_states(model, in);
      const double n = static_cast<double>(states.targets.size(0));
      if (n == 0) return {0.0, 0.0};
      auto logits = model->llm->logits(states.hidden).to(torch::kFloat32);
      return {loss.forward({logits, states.targets, 1.0}).loss.item<double>(), n};
    };
    const auto [l, n] = token_loss(b.pixels);
    loss_sum += l, tokens += n;
    if (b.pixels.defined() && b.pixels.size(0) >= 2) {
      // Half a batch away: consecutive records may ask about the same image.
      const auto [ls, ns] = token_loss(b.pixels.roll(std::max<int64_t>(1, b.pixels.size(0) / 2), 0));
      shuffled_sum += ls, shuffled_tokens += ns;
    }
    std::vector<std::vector<int64_t>> prompts;
    for (int64_t i = start; i < end; ++i) {
      prompts.push_back(prompt_ids(data.sample(i).tokens));
      if (prompts.back().empty()) prompts.back().push_back(tok.pad_id());  // a tokenizer without bos
    }
    const auto replies = generate_replies(model, tok, prompts, b.pixels, sampling, bf16);
    // Representation level: for caption records with one image, the image's projected visual
    // tokens and the caption's LLM input embeddings, each mean-pooled to [H].
    if (b.pixels.defined()) {
      torch::Tensor visual;  // [I, N, H]
      int64_t cursor = 0;
      for (int64_t i = start; i < end; ++i) {
        const auto& s = data.sample(i);
        const int64_t n_img = b.images_per_sample[static_cast<size_t>(i - start)];
        if (s.is_caption && n_img == 1 && !s.reference.empty()) {
          if (!visual.defined()) {
            AutocastGuard autocast(bf16);
            visual = model->image_tokens(b.pixels).to(torch::kFloat32);
          }
          std::vector<int64_t> ids;
          for (int id : tok.encode(s.reference)) ids.push_back(id);
          if (!ids.empty()) {
            pooled_visual.push_back(visual[cursor].mean(0));
            pooled_text.push_back(model->llm->embed(torch::tensor(ids, torch::kInt64).unsqueeze(0))[0].mean(0).to(torch::kFloat32));
          }
        }
        cursor += n_img;
      }
    }
    for (int64_t i = start; i < end; ++i) {
      const auto& s = data.sample(i);
      if (s.truncated) continue;  // its reference reply was cut off
      const std::string& reply = replies[static_cast<size_t>(i - start)];
      const bool right = normalise_reply(reply) == normalise_reply(s.reference);
      const std::string suite = eval_suite_of(s);  // the one place that sorts records (--suite too)
      if (predictions) {
        predictions->push_back({{"id", s.id}, {"where", s.where}, {"question_type", s.question_type},
                                {"reference", s.reference}, {"reply", reply}, {"right", right}});
        if (suite == "pope") predictions->back().update(yes_no_prediction(reply, s.reference));
      }
      auto add = [&](const std::string& key) {
        exact[key].first += right;
        exact[key].second += 1;
      };
      add("");
      if (suite == "pope") {
        // "pope/{level}/{sampling}": yes/no counts per level and sampling, per level, overall.
        const auto level_end = s.question_type.find('/', 5);
        const std::string level = s.question_type.substr(5, level_end - 5);
        for (const auto& key : {s.question_type, "pope/" + level, std::string("pope")})
          pope[key].add(reply, s.reference);
      } else if (!s.question_type.empty()) {
        add(s.question_type);
      }
      if (suite == "chair") {  // against the record's object list, else its shapes-world scene
        chair.add(s.reference_objects.empty() ? score_caption_objects(reply, s.scene)
                                              : score_caption_references(reply, s.reference_objects, objects_vocabulary));
        ++captions;
        caption_exact += right;
      }
    }
  }
  nlohmann::json j;
  j["records"] = data.size();
  if (tokens > 0) j["loss"] = loss_sum / tokens;
  if (shuffled_tokens > 0) j["loss_shuffled_images"] = shuffled_sum / shuffled_tokens;
  for (const auto& [type, e] : exact)
    j[type.empty() ? "exact_match" : "exact_match/" + type] = static_cast<double>(e.first) / std::max<int64_t>(1, e.second);
  if (pooled_visual.size() > 10) {  // do projected images and the LLM's text embeddings agree?
    const auto v = torch::stack(pooled_visual), t = torch::stack(pooled_text);
    j["alignment/mutual_knn@10"] = mutual_knn_alignment(v, t, 10);
    j["alignment/cka"] = linear_cka(v, t);
  }
  for (const auto& [key, counts] : pope) {
    // Per level and sampling the headline numbers; per level and overall all of them.
    const bool detailed = std::count(key.begin(), key.end(), '/') < 2;
    const nlohmann::json m = counts.metrics();  // named: items() would outlive a temporary
    for (const auto& [metric, value] : m.items())
      if (detailed || metric == "accuracy" || metric == "f1" || metric == "yes_ratio" || metric == "hallucination_rate")
        j[key + "/" + metric] = value;
  }
  if (captions > 0) {
    const auto& c = chair.total;
    j["caption/object_precision"] = c.mentions ? static_cast<double>(c.correct_mentions) / c.mentions : 0.0;
    j["caption/object_recall"] = c.objects ? static_cast<double>(c.recalled) / c.objects : 0.0;
    const nlohmann::json ch = chair.metrics();
    for (const auto& [k, v] : ch.items()) j["caption/" + k] = v;
    j["caption/exact"] = static_cast<double>(caption_exact) / captions;
  }
  if (was_training) model->train();
  return j;
}

std::string save_vlm_checkpoint(const RunConfig& cfg, VlmModel& model, torch::optim::Optimizer& optim, int64_t step,
                                const nlohmann::json& tokenizer, const nlohmann::json& data) {
  CheckpointWriter w(cfg.run.out_dir, step, cfg.trainer);
  save_safetensors(w.path("model.safetensors"), named_state(*model), {{"format", "pt"}, {"component", "vlm"}});
  save_optimizer_state(optim, w.path("optimizer.safetensors"));
  save_safetensors(w.path("rng.safetensors"), {{"torch_cpu", get_rng_state()}});
  w.add_json("trainer_state.json", {{"trainer", cfg.trainer},
                                    {"step", step},
                                    {"samples_seen", step * global_batch(cfg)},
                                    {"world_size", world_size()},
                                    {"tokenizer", tokenizer},
                                    {"data", data}});
  w.add_text("config.yaml", resolved_yaml(cfg));
  return w.commit(cfg.train.keep_last, cfg.train.keep_every);
}

int64_t load_vlm_checkpoint(const std::string& dir, const RunConfig& cfg, VlmModel& model, torch::optim::Optimizer& optim) {
  const int64_t step = check_resume_checkpoint(dir, cfg);
  load_state(*model, load_safetensors(dir + "/model.safetensors"), "", true, dir + "/model.safetensors");
  load_resume_state(dir, optim);
  return step;
}

void set_vlm_train_modes(VlmModel& model) {
  model->train();
  auto frozen = [](const torch::nn::Module& m) {
    for (const auto& p : m.parameters())
      if (p.requires_grad()) return false;
    return true;
  };
  if (frozen(*model->vision_model)) model->vision_model->eval();
  if (frozen(*model->mm_projector)) model->mm_projector->eval();
  if (frozen(*model->llm)) model->llm->model->eval();
}

TrainResult train_vlm(const RunConfig& cfg_in, const TrainOptions& opt) {
  RunConfig cfg = cfg_in;
  check_before_training(cfg, opt.resume);
  const PreparedRun prepared = prepare_run(cfg);  // holds run.out_dir until this returns
  const int threads = prepared.threads;
  const std::string precision = resolve_precision(cfg.run.precision);
  const bool bf16 = precision == "bf16";
  torch::manual_seed(cfg.run.seed);

  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  // What the checkpoints record: the file as loaded now, not as it may be at a later save.
  const nlohmann::json tokenizer = tokenizer_record(cfg.data.tokenizer);
  VlmModel model = build_vlm_model(cfg, tok);
  auto loss = lm_losses().create_or_throw(cfg.loss);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& p : model->named_parameters(true)) named.emplace_back(p.key(), p.value());
  ParamPlan plan = plan_param_groups(named, cfg.optim);
  if (rank() == 0) spdlog::info("learning rates: {}", plan.lr_summary);
  if (cfg.trainer == "adapter")
    for (const auto& [name, p] : plan.trainable)
      if (component_of(name) != "mm_projector")
        throw ConfigError("trainer adapter trains the projector alone, but '" + name +
                          "' is trainable; freeze vision_model and language_model in optim.param_groups, or use "
                          "trainer: finetune");
  std::vector<torch::Tensor> params;
  int64_t n_trainable = 0, n_frozen = 0;
  for (const auto& [n, p] : plan.trainable) params.push_back(p), n_trainable += p.numel();
  for (const auto& p : model->parameters())
    if (!p.requires_grad()) n_frozen += p.numel();
  FusedAdamW optimizer(plan.groups);
  MicroBatchThreads micro_threads(cfg.train.micro_batch_threads, threads, params);
  log_micro_batch_threads(cfg, threads);

  const int64_t tpi = model->tokens_per_image();
  const auto encoded_before = tok.coverage();
  ConversationDataset train(cfg.data.train, cfg.data, tok, tpi, /*train=*/true);
  warn_unknown_tokens(tok, encoded_before, cfg);
  std::vector<std::pair<std::string, std::unique_ptr<ConversationDataset>>> evals;
  if (!cfg.eval.sets.empty()) {
    for (const auto& s : cfg.eval.sets)
      evals.emplace_back(s.name, std::make_unique<ConversationDataset>(s.data, cfg.data, tok, tpi, false, s.limit));
  } else if (!cfg.data.val.empty()) {
    evals.emplace_back("val", std::make_unique<ConversationDataset>(cfg.data.val, cfg.data, tok, tpi, false, cfg.data.val_limit));
  }
  const ObjectVocabulary vocabulary = load_eval_vocabulary(cfg.eval);
  spdlog::info("{} ({}, template {}{}): {} train records{}{}, {:.2f}M trainable / {:.2f}M frozen parameters, {} visual "
               "tokens per image, {} threads, precision {}",
               cfg.run.name, cfg.trainer, cfg.data.chat_template, cfg.data.drop_images ? ", text only" : "", train.size(),
               train.skipped() ? " (" + std::to_string(train.skipped()) + " skipped)" : std::string(),
               train.truncated() ? " (" + std::to_string(train.truncated()) + " truncated)" : std::string(),
               n_trainable / 1e6, n_frozen / 1e6, tpi, threads, precision);
  report_memory(cfg, estimate_memory(cfg, n_trainable + n_frozen, n_trainable), available_memory_bytes());
  std::vector<int64_t> left_out;  // records whose images do not decode (train.on_bad_batch: skip)
  if (rank() == 0) left_out = records_reading(train, check_images_before_training(cfg, image_refs(train), stop_requested));
  stop_before_training_if_requested("the check of the training images (data.check_images)");
  left_out = share_left_out_records(left_out, static_cast<int64_t>(train.size()));

  int64_t start = 0;
  const std::string resumed_from = select_resume_checkpoint(cfg.run.out_dir, opt.resume);
  if (!resumed_from.empty()) {
    start = load_vlm_checkpoint(resumed_from, cfg, model, optimizer);
    spdlog::info("resumed from {} at step {}", resumed_from, start);
    forget_after_step(cfg.run.out_dir, start);
  } else {
    for (const auto& init : cfg.init_from) init_components(*model, init, cfg.model, cfg.data.tokenizer);
  }
  sync_across_ranks(model->parameters());  // every rank starts from rank 0's weights
  write_run_text(cfg, "config.yaml", resolved_yaml(cfg));

  MetricsLog metrics = open_metrics_log(cfg);
  const int64_t steps = cfg.train.steps, B = global_batch(cfg);
  EpochSampler sampler(cfg.run.seed, train.size(), left_out);
  const nlohmann::json data_record = train_data_record(cfg, sampler.size());  // for the checkpoints
  if (!resumed_from.empty()) warn_if_train_records_changed(resumed_from, cfg, data_record);
  PrefetchLoader<ConversationBatch> loader(
      [&](int64_t step) { return train.collate(sampler.batch(step, B, rank(), world_size()), cfg.run.seed); }, start, steps,
      cfg.data.workers, cfg.data.prefetch);
  Progress progress(start, steps);
  TrainResult result;
  const int eval_batch = cfg.eval.vlm_batch(cfg.train.batch_size / cfg.train.grad_accum);
  auto run_eval = [&](int64_t step) {
    const auto paused = progress.pause();
    nlohmann::json all;
    for (auto& [name, ds] : evals) {
      auto j = evaluate_vlm(model, *loss, *ds, tok, eval_batch, cfg.eval.max_new_tokens, bf16, vocabulary);
      std::string line;
      for (const auto& [k, v] : j.items())  // per-sampling probe figures stay in the JSON
        if (v.is_number_float() && std::count(k.begin(), k.end(), '/') < 3)
          line += fmt::format(" {} {:.3f}", k, v.get<double>());
      spdlog::info("eval step {} [{}]:{}", step, name, line);
      all[name] = j;
    }
    if (!all.is_null() && eval_record_due(cfg, step, start)) metrics.write({{"step", step}, {"split", "val"}, {"eval", all}});
    return all;
  };

  if (cfg.eval.at_start && start == 0 && rank() == 0) {  // the starting point of the held-out curves
    const auto before = evaluate_unless_stopped([&] { return run_eval(0); }, 0).value_or(nlohmann::json());
    if (!before.is_null()) metrics.write({{"step", 0}, {"split", "val"}, {"eval", before}});
    result.start_eval = before;
  }
  stop_before_training_if_requested("the evaluation before the first step (eval.at_start)");
  set_vlm_train_modes(model);
  int64_t step = start;
  auto save = [&] { return save_vlm_checkpoint(cfg, model, optimizer, step, tokenizer, data_record); };
  StepGuard guard(cfg, opt, save);
  auto eval_and_resume = [&] {
    run_eval(step);
    set_vlm_train_modes(model);  // evaluation left every module in train mode
  };
  while (step < steps) {
    set_lr_scaled(optimizer, plan.base_lrs, lr_at(cfg.schedule, 1.0, step, steps));
    const double lr = lr_at(cfg.schedule, plan.logged_lr, step, steps);
    ConversationBatch batch;
    if (!guard.next_batch(loader, step + 1, batch)) {  // skipped (train.on_bad_batch: skip)
      ++step;
      if (after_step(cfg, opt, step, result, save, eval_and_resume)) return result;
      continue;
    }
    optimizer.release_grads();
    // The loss is normalised by the target tokens of the global batch (every rank's).
    const double step_tokens = sum_across_ranks(static_cast<double>(batch.target_tokens()), "all-reduce of token counts");
    LossOutput out =
        vlm_step(model, *loss, batch, cfg.train.grad_accum, tok.image_id(), bf16, step_tokens, &micro_threads);
    reduce_gradients(cfg, params);
    const auto gnorm = guard.clip(step + 1, out.loss, params);
    if (gnorm) optimizer.step();
    ++step;

    if (step % cfg.train.log_every == 0 || step == steps) {
      const auto rec = record_train_step(metrics, result, step, out.loss, out.metrics, lr, gnorm.value_or(NAN),
                                         loader.wait_seconds(), guard.skipped());
      if (!opt.quiet)
        spdlog::info("{} | loss {:.4f} | lr {:.2e} | token acc {:.3f}", progress.line(step, B), rec["loss"].get<double>(),
                     lr, rec["metrics"].value("acc/token", 0.0));
    }
    if (after_step(cfg, opt, step, result, save, eval_and_resume)) return result;
  }
  finish_run(cfg, start, step, resumed_from, progress.elapsed(), result, save, [&] { return run_eval(step); });
  return result;
}

}  // namespace trialign
