#include "trainers/preference.h"

#include <spdlog/spdlog.h>

#include <cmath>
#include <filesystem>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/errors.h"
#include "core/logging.h"
#include "core/rng.h"
#include "core/safetensors.h"
#include "data/prefetch_loader.h"
#include "losses/cross_entropy.h"
#include "trainers/vlm.h"
#include "trainers/fused_adamw.h"
#include "models/hf_interop.h"
#include "tools/data_check.h"
#include "trainers/memory_estimate.h"
#include "trainers/preflight.h"
#include "core/json_text.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

// Held-out pairs: the loss and its metrics (means over pairs), and per hallucination level the
// share of pairs whose implicit reward prefers the chosen reply:
// (p(y+) - r(y+)) > (p(y-) - r(y-)), reference terms 0 for a reference-free loss.
nlohmann::json evaluate_pairs(PreferenceLossImpl& loss, VlmModel& policy, VlmModel* reference,
                              const PreferenceDataset& data, int batch, int64_t image_id, bool bf16, uint64_t seed,
                              const ReferenceCache* cache) {
  torch::NoGradGuard ng;
  const bool was_training = policy->is_training();
  policy->eval();
  LossOutput total;
  total.loss = torch::zeros({});
  std::map<std::string, std::pair<int64_t, int64_t>> right;  // level -> (preferred chosen, pairs)
  std::map<std::string, int64_t> likelier;                   // level -> pairs with p(y+) > p(y-)
  ProgressLog progress("evaluation", "pairs", data.size());
  for (int64_t start = 0; start < data.size(); start += batch) {
    progress.update(start);
    stop_point();  // a stop signal abandons the evaluation
    const int64_t end = std::min<int64_t>(data.size(), start + batch);
    const auto b = data.range(start, end);
    auto in = pair_passes(loss, policy, reference, data, b, image_id, bf16, mix_seed({seed, static_cast<uint64_t>(start)}),
                          cache);
    in.share = static_cast<double>(end - start) / static_cast<double>(data.size());
    in.step_response_tokens = 0;
    for (auto i : b.indices) in.step_response_tokens += static_cast<double>(response_tokens(data.sample(i).chosen.labels));
    in.step_response_tokens = std::max(1.0, in.step_response_tokens * data.size() / static_cast<double>(end - start));
    add_output(total, loss.forward(in));
    const auto policy_margin = (in.at("policy/chosen").sum() - in.at("policy/rejected").sum()).contiguous();
    auto margin = policy_margin;
    if (in.logps.count("reference/chosen") && in.logps.count("reference/rejected"))
      margin = margin - (in.at("reference/chosen").sum() - in.at("reference/rejected").sum());
    const auto m = margin.contiguous();
    for (int64_t k = 0; k < m.size(0); ++k) {
      const bool ok = m[k].item<double>() > 0, likely = policy_margin[k].item<double>() > 0;
      const auto& level = data.sample(b.indices[static_cast<size_t>(k)]).level;
      right[""].first += ok, right[""].second += 1, likelier[""] += likely;
      if (!level.empty()) right[level].first += ok, right[level].second += 1, likelier[level] += likely;
    }
  }
  nlohmann::json j;
  j["pairs"] = data.size();
  j["loss"] = total.loss.item<double>();
  for (const auto& [k, v] : total.metrics) j[k] = v.item<double>();
  for (const auto& [level, c] : right) {
    const double n = static_cast<double>(std::max<int64_t>(1, c.second));
    const std::string suffix = level.empty() ? "" : "/" + level;
    j["preference_accuracy" + suffix] = static_cast<double>(c.first) / n;
    j["likelihood_accuracy" + suffix] = static_cast<double>(likelier[level]) / n;
  }
  if (was_training) set_vlm_train_modes(policy);
  return j;
}

// Held-out prompts: greedy completions scored by the reward functions, and exact match overall
// and per question type. With `samples` > 0, also `samples` completions per prompt drawn as
// training draws them (the loss's temperature / top-k / top-p): their mean exact match is the
// reward the policy itself earns, pass@1 averaged over samples (DeepSeek-R1's reporting), keyed
// sampled/... . Greedy decoding hides what GRPO changes most, how often a sample is right.
nlohmann::json evaluate_prompts(VlmModel& policy, const Tokenizer& tok, const PreferenceDataset& data,
                                const std::vector<std::pair<std::string, std::shared_ptr<RewardFnImpl>>>& rewards,
                                int batch, const CompletionSampling& training, int64_t samples, uint64_t seed,
                                bool bf16) {
  ExactMatchRewardImpl exact;
  nlohmann::json j;
  j["records"] = data.size();
  // prefix "" = greedy (one completion per prompt), "sampled/" = `samples` draws per prompt.
  auto score = [&](const CompletionSampling& how, const std::string& prefix) {
    const int64_t G = how.group_size;
    const int64_t prompts_per_call = std::max<int64_t>(1, batch / G);
    double reward_sum = 0;
    std::map<std::string, std::pair<int64_t, int64_t>> right;  // type -> (right, asked); "" = all
    ProgressLog progress(prefix.empty() ? "evaluation (greedy)" : "evaluation (sampled)", "prompts", data.size());
    for (int64_t start = 0; start < data.size(); start += prompts_per_call) {
      progress.update(start);
      stop_point();  // a stop signal abandons the evaluation
      const int64_t end = std::min<int64_t>(data.size(), start + prompts_per_call);
      const auto b = data.range(start, end);
      const auto c = sample_completions(policy, tok, data, b, how, rewards, seed + static_cast<uint64_t>(start), bf16);
      for (int64_t k = 0; k < b.size() * G; ++k) {
        const auto& s = data.sample(b.indices[static_cast<size_t>(k / G)]);
        reward_sum += c.rewards[k].item<double>();
        const bool ok = exact.score({{s.prompt_text, c.texts[static_cast<size_t>(k)], true, s.answer, s.question_type}})[0] > 0;
        right[""].first += ok, right[""].second += 1;
        if (!s.question_type.empty()) right[s.question_type].first += ok, right[s.question_type].second += 1;
      }
    }
    j[prefix + "reward"] = reward_sum / static_cast<double>(data.size() * G);
    for (const auto& [type, c] : right)
      j[prefix + (type.empty() ? "exact_match" : "exact_match/" + type)] =
          static_cast<double>(c.first) / static_cast<double>(c.second);
  };
  CompletionSampling greedy;
  greedy.group_size = 1;
  greedy.temperature = 0.0;
  greedy.max_new_tokens = training.max_new_tokens;
  score(greedy, "");
  if (samples > 0) {
    CompletionSampling drawn = training;
    drawn.group_size = samples;
    score(drawn, "sampled/");
  }
  return j;
}

}  // namespace

TrainResult train_preference(const RunConfig& cfg_in, const TrainOptions& opt) {
  RunConfig cfg = cfg_in;
  check_before_training(cfg, opt.resume);
  const PreparedRun prepared = prepare_run(cfg);  // holds run.out_dir until this returns
  const int threads = prepared.threads;
  const bool bf16 = resolve_precision(cfg.run.precision) == "bf16";

  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  const nlohmann::json tokenizer = tokenizer_record(cfg.data.tokenizer);  // as loaded, for the checkpoints
  auto loss = preference_losses().create_or_throw(cfg.loss);
  const CompletionSampling* sampling = loss->sampling();
  std::vector<std::pair<std::string, std::shared_ptr<RewardFnImpl>>> rewards;
  if (sampling) {
    auto specs = cfg.rewards;
    if (specs.empty()) {
      TypedSpec exact{"exact_match", {}, "rewards[0]"};
      exact.options.kind = ConfigNode::Kind::Map;
      specs.push_back(exact);
    }
    for (size_t k = 0; k < specs.size(); ++k) {
      std::string name = specs[k].type;  // logged as reward/<name>; a second one of a type gets its index
      for (const auto& [n, f] : rewards)
        if (n == name) name = specs[k].type + "_" + std::to_string(k);
      rewards.emplace_back(name, reward_functions().create_or_throw(specs[k]));
    }
  }

  // The policy and (when a pass needs it) the reference, a separate frozen model, both start from
  // the seeded initialisation plus init_from. After a resume the reference must be the same
  // model even if init_from names a run folder whose newest checkpoint has changed since: a fresh
  // run records the checkpoints it resolved, a resumed one reads them back.
  const std::string resumed_from = select_resume_checkpoint(cfg.run.out_dir, opt.resume);
  const std::string init_record = (fs::path(cfg.run.out_dir) / "init_from.json").string();
  std::vector<InitFrom> inits = cfg.init_from;
  // A trialign checkpoint's weights, as its manifest records them (other weight files: none).
  auto weights_crc = [](const std::string& checkpoint) {
    std::error_code ec;
    if (!fs::exists(fs::path(checkpoint) / "MANIFEST.json", ec)) return nlohmann::json();
    try {
      return nlohmann::json(model_weights_crc(checkpoint));
    } catch (const DataError&) {  // a manifest without the weights' checksum: nothing to compare
      return nlohmann::json();
    }
  };
  if (!resumed_from.empty() && fs::exists(init_record)) {
    inits.clear();
    try {
      for (const auto& e : nlohmann::json::parse(read_text_file(init_record))) {
        inits.push_back({e.at("checkpoint").get<std::string>(), e.at("components").get<std::vector<std::string>>()});
        // The reference model is rebuilt from these on every resume: from the very same weights.
        // (A checkpoint gone since is left to init_components, which names the missing path.)
        const auto recorded = e.value("model_crc32", nlohmann::json()), now = weights_crc(inits.back().checkpoint);
        if (!recorded.is_null() && !now.is_null() && recorded != now)
          throw DataError(init_record + ": " + inits.back().checkpoint +
                          " holds other weights than when this run started (model.safetensors CRC-32 " +
                          std::to_string(recorded.get<uint32_t>()) + " then), so the reference model would differ; "
                          "restore that checkpoint, or start a new run (another run.out_dir)");
      }
    } catch (const nlohmann::json::exception& e) {
      throw DataError(init_record + ": unreadable (" + e.what() + "); it names the checkpoints the run started from");
    }
  }
  if (cfg.init_from.empty())
    spdlog::warn("{}: no init_from: preference training starts from random weights (usually it starts from stage 3)",
                 cfg.run.name);
  torch::manual_seed(cfg.run.seed);
  VlmModel model = build_vlm_model(cfg, tok);
  nlohmann::json resolved_inits = nlohmann::json::array();
  for (const auto& init : inits) {
    const std::string resolved = init_components(*model, init, cfg.model, cfg.data.tokenizer);
    resolved_inits.push_back({{"checkpoint", resolved}, {"components", init.components}, {"model_crc32", weights_crc(resolved)}});
  }
  if (resumed_from.empty()) write_run_text(cfg, "init_from.json", json_text(resolved_inits, 2) + "\n");
  VlmModel reference{nullptr};
  if (loss->needs_reference()) {  // a copy of the initial policy (a resume loads the policy later)
    reference = frozen_copy(model, cfg.model);  // cfg.model's vocab was resolved by build_vlm_model
  }
  torch::manual_seed(cfg.run.seed);

  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& p : model->named_parameters(true)) named.emplace_back(p.key(), p.value());
  ParamPlan plan = plan_param_groups(named, cfg.optim);
  if (rank() == 0) spdlog::info("learning rates: {}", plan.lr_summary);
  std::vector<torch::Tensor> params;
  int64_t n_trainable = 0;
  for (const auto& [n, p] : plan.trainable) params.push_back(p), n_trainable += p.numel();
  FusedAdamW optimizer(plan.groups);
  MicroBatchThreads micro_threads(cfg.train.micro_batch_threads, threads, params);
  log_micro_batch_threads(cfg, threads);

  const int64_t tpi = model->tokens_per_image();
  const auto kind = sampling ? PreferenceDataset::Kind::Prompts : PreferenceDataset::Kind::Pairs;
  const int64_t reserve = sampling ? sampling->max_new_tokens : 0;
  const auto encoded_before = tok.coverage();
  PreferenceDataset train(cfg.data.train, cfg.data, tok, tpi, kind, /*train=*/true, 0, reserve);
  warn_unknown_tokens(tok, encoded_before, cfg);
  std::unique_ptr<PreferenceDataset> val;
  if (!cfg.data.val.empty())
    val = std::make_unique<PreferenceDataset>(cfg.data.val, cfg.data, tok, tpi, kind, false, cfg.data.val_limit, reserve);
  std::vector<std::pair<std::string, std::unique_ptr<ConversationDataset>>> sets;
  for (const auto& s : cfg.eval.sets)
    sets.emplace_back(s.name, std::make_unique<ConversationDataset>(s.data, cfg.data, tok, tpi, false, s.limit));
  const ObjectVocabulary vocabulary = load_eval_vocabulary(cfg.eval);
  CrossEntropyLossImpl token_loss{CrossEntropyOptions{}};

  // Before the reference cache, which would otherwise be first to decode a broken image.
  std::vector<int64_t> left_out;  // records whose images do not decode (train.on_bad_batch: skip)
  if (rank() == 0) left_out = records_reading(train, check_images_before_training(cfg, image_refs(train), stop_requested));
  stop_before_training_if_requested("the check of the training images (data.check_images)");
  left_out = share_left_out_records(left_out, train.size());
  EpochSampler sampler(cfg.run.seed, train.size(), left_out);
  const nlohmann::json data_record = train_data_record(cfg, sampler.size());  // for the checkpoints
  if (!resumed_from.empty()) warn_if_train_records_changed(resumed_from, cfg, data_record);

  std::unique_ptr<ReferenceCache> cache, val_cache;
  if (cfg.preference.cache_reference && !reference)
    spdlog::info("preference.cache_reference: loss '{}' builds no reference model; nothing to cache", cfg.loss.type);
  if (cfg.preference.cache_reference && reference) {  // preflight refused the combinations it cannot serve
    Progress timer(0, 1);
    const int b = std::max(1, cfg.train.batch_size / cfg.train.grad_accum);
    cache = std::make_unique<ReferenceCache>(build_reference_cache(*loss, reference, train, b, tok.image_id(), bf16, left_out));
    if (val) val_cache = std::make_unique<ReferenceCache>(build_reference_cache(*loss, reference, *val, b, tok.image_id(), bf16));
    stop_before_training_if_requested("the caching of reference log-probs (preference.cache_reference)");
    bool still_needed = false;
    for (const auto& p : loss->passes()) still_needed = still_needed || (p.model == "reference" && !cache->covers(p));
    spdlog::info("reference log-probs of {} pairs cached in {}{}", sampler.size(), format_duration(timer.elapsed()),
                 still_needed ? "" : "; the reference model is released");
    if (!still_needed) reference = VlmModel{nullptr};
  }

  std::string passes;
  for (const auto& p : loss->passes()) passes += (passes.empty() ? "" : ", ") + p.key();
  spdlog::info("{} (preference, loss {}): {} train {}{}, passes [{}]{}, {:.2f}M trainable parameters, {} threads, precision {}",
               cfg.run.name, cfg.loss.type, train.size(), sampling ? "prompts" : "pairs",
               train.skipped() ? " (" + std::to_string(train.skipped()) + " skipped)" : std::string(), passes,
               sampling ? fmt::format(", {} completions per prompt", sampling->group_size) : std::string(),
               n_trainable / 1e6, threads, bf16 ? "bf16" : "fp32");
  {
    int64_t held = 0;  // the policy, and the reference while it is kept
    for (const auto& p : model->parameters()) held += p.numel();
    if (reference) held *= 2;
    report_memory(cfg, estimate_memory(cfg, held, n_trainable), available_memory_bytes());
  }

  int64_t start = 0;
  if (!resumed_from.empty()) {
    start = load_vlm_checkpoint(resumed_from, cfg, model, optimizer);
    spdlog::info("resumed from {} at step {}", resumed_from, start);
    forget_after_step(cfg.run.out_dir, start);
  }
  sync_across_ranks(model->parameters());  // every rank starts from rank 0's weights
  write_run_text(cfg, "config.yaml", resolved_yaml(cfg));

  MetricsLog metrics = open_metrics_log(cfg);
  // B: this rank's samples per step; W: ranks. Shares and token counts are of the global batch.
  const int64_t steps = cfg.train.steps, B = cfg.train.batch_size, accum = cfg.train.grad_accum, W = world_size();
  PrefetchLoader<PreferenceBatch> loader(
      [&](int64_t step) { return train.collate(sampler.batch(step, B * W, rank(), W), cfg.run.seed); }, start, steps,
      cfg.data.workers, cfg.data.prefetch);
  Progress progress(start, steps);
  TrainResult result;
  const int eval_batch = cfg.eval.vlm_batch(cfg.train.batch_size / cfg.train.grad_accum);
  VlmModel* ref = reference ? &reference : nullptr;
  auto run_eval = [&](int64_t step) {
    const auto paused = progress.pause();
    nlohmann::json all;
    if (val)
      all["val"] = sampling ? evaluate_prompts(model, tok, *val, rewards, eval_batch, *sampling, cfg.eval.samples,
                                               cfg.run.seed ^ 0x5eedULL, bf16)
                            : evaluate_pairs(*loss, model, ref, *val, eval_batch, tok.image_id(), bf16, cfg.run.seed,
                                             val_cache.get());
    for (auto& [name, ds] : sets)
      all[name] = evaluate_vlm(model, token_loss, *ds, tok, eval_batch, cfg.eval.max_new_tokens, bf16, vocabulary);
    for (const auto& [name, j] : all.items()) {
      std::string line;
      for (const auto& [k, v] : j.items())
        if (v.is_number_float()) line += fmt::format(" {} {:.3f}", k, v.get<double>());
      spdlog::info("eval step {} [{}]:{}", step, name, line);
    }
    if (!all.is_null() && eval_record_due(cfg, step, start)) metrics.write({{"step", step}, {"split", "val"}, {"eval", all}});
    set_vlm_train_modes(model);
    return all;
  };

  if (cfg.eval.at_start && start == 0 && rank() == 0) {
    const auto before = evaluate_unless_stopped([&] { return run_eval(0); }, 0).value_or(nlohmann::json());
    if (!before.is_null()) metrics.write({{"step", 0}, {"split", "val"}, {"eval", before}});
    result.start_eval = before;
  }
  stop_before_training_if_requested("the evaluation before the first step (eval.at_start)");
  set_vlm_train_modes(model);
  int64_t step = start;
  auto save = [&] { return save_vlm_checkpoint(cfg, model, optimizer, step, tokenizer, data_record); };
  StepGuard guard(cfg, opt, save);
  while (step < steps) {
    set_lr_scaled(optimizer, plan.base_lrs, lr_at(cfg.schedule, 1.0, step, steps));
    const double lr = lr_at(cfg.schedule, plan.logged_lr, step, steps);
    PreferenceBatch batch;
    if (!guard.next_batch(loader, step + 1, batch)) {  // skipped (train.on_bad_batch: skip)
      ++step;
      if (after_step(cfg, opt, step, result, save, [&] { run_eval(step); })) return result;
      continue;
    }
    optimizer.release_grads();
    LossOutput out;
    out.loss = torch::zeros({});
    // Ranks draw their own corrupted images and completions (one process: rank 0, unchanged).
    const uint64_t step_seed = W == 1 ? mix_seed({cfg.run.seed, fnv1a64("preference-step"), static_cast<uint64_t>(step)})
                                      : mix_seed({cfg.run.seed, fnv1a64("preference-step"), static_cast<uint64_t>(step),
                                                  static_cast<uint64_t>(rank())});
    const int64_t m = B / accum;
    // A failing loss (a plugin's included) is named with the step it failed at.
    auto run_loss = [&](const PreferenceInputs& in) {
      const std::string origin = preference_losses().origin(cfg.loss.type);
      const std::string where = "step " + std::to_string(step + 1) + " (loss '" + cfg.loss.type + "'" +
                                (origin.empty() ? "" : ", plugin " + origin) + "): ";
      try {
        return loss->forward(in);
      } catch (const std::invalid_argument& e) {
        throw ConfigError(where + e.what());
      } catch (const ConfigError&) {
        throw;
      } catch (const std::exception& e) {
        throw std::runtime_error(where + e.what());
      }
    };
    try {
      if (!sampling) {
        double chosen_tokens = 0;
        for (auto i : batch.indices) chosen_tokens += static_cast<double>(response_tokens(train.sample(i).chosen.labels));
        chosen_tokens = sum_across_ranks(chosen_tokens, "all-reduce of token counts");
        const auto outs = run_micro_batches(&micro_threads, accum, [&](int64_t j) {
          const auto micro = batch.slice(j * m, (j + 1) * m);
          auto in = pair_passes(*loss, model, ref, train, micro, tok.image_id(), bf16,
                                mix_seed({step_seed, static_cast<uint64_t>(j)}), cache.get());
          in.share = static_cast<double>(m) / static_cast<double>(B * W);
          in.step_response_tokens = std::max(1.0, chosen_tokens);
          return run_loss(in);
        });
        for (const auto& o : outs) add_output(out, o);
      } else {
        const auto c = sample_completions(model, tok, train, batch, *sampling, rewards, step_seed, bf16);
        const int64_t G = sampling->group_size, S = B * G;
        double tokens = 0;
        for (const auto& l : c.labels) tokens += static_cast<double>(response_tokens(l));
        tokens = sum_across_ranks(tokens, "all-reduce of token counts");
        const auto outs = run_micro_batches(&micro_threads, accum, [&](int64_t j) {
          auto in = completion_passes(*loss, model, ref, c, j * m * G, (j + 1) * m * G, tok.image_id(), bf16);
          in.share = static_cast<double>(m * G) / static_cast<double>(S * W);
          in.step_response_tokens = std::max(1.0, tokens);
          in.rewards = c.rewards;
          in.group_size = G;
          in.row_begin = j * m * G;
          return run_loss(in);
        });
        for (const auto& o : outs) add_output(out, o);
        for (const auto& [name, v] : c.reward_means) out.metrics["reward/" + name] = torch::tensor(v / W);
      }
    } catch (const std::invalid_argument& e) {
      throw ConfigError("step " + std::to_string(step + 1) + " (loss '" + cfg.loss.type + "'): " + e.what());
    }
    reduce_gradients(cfg, params);
    const auto gnorm = guard.clip(step + 1, out.loss, params);
    if (gnorm) optimizer.step();
    ++step;

    if (step % cfg.train.log_every == 0 || step == steps) {
      const auto rec = record_train_step(metrics, result, step, out.loss, out.metrics, lr, gnorm.value_or(NAN),
                                         loader.wait_seconds(), guard.skipped());
      if (!opt.quiet) {
        const auto& mj = rec["metrics"];
        const std::string extra =
            sampling ? fmt::format("reward {:.3f} | length {:.1f}", mj.value("reward/mean", 0.0), mj.value("completion_length", 0.0))
                     : fmt::format("reward acc {:.3f} | margin {:.3f}", mj.value("rewards/accuracies", 0.0),
                                   mj.value("rewards/margins", 0.0));
        spdlog::info("{} | loss {:.4f} | lr {:.2e} | {}", progress.line(step, B * W), rec["loss"].get<double>(), lr, extra);
      }
    }
    if (after_step(cfg, opt, step, result, save, [&] { run_eval(step); })) return result;
  }
  finish_run(cfg, start, step, resumed_from, progress.elapsed(), result, save, [&] { return run_eval(step); });
  return result;
}

}  // namespace trialign
