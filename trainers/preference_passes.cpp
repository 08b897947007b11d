#include "trainers/preference_passes.h"

#include <algorithm>

#include "core/logging.h"
#include "core/safetensors.h"
#include "data/sampler.h"
#include "trainers/vlm.h"

namespace trialign {

VlmModel frozen_copy(VlmModel& policy, const ModelConfig& mc) {
  VlmModel copy(mc);
  std::map<std::string, torch::Tensor> weights;
  for (const auto& [name, t] : named_state(*policy)) weights[name] = t.detach().clone();
  load_state(*copy, weights, "", true, "the policy");
  for (auto& p : copy->parameters()) p.requires_grad_(false);
  copy->eval();
  return copy;
}

SequenceLogps response_logps(VlmModel& model, const std::vector<std::vector<int64_t>>& ids,
                             const std::vector<std::vector<int64_t>>& labels, const torch::Tensor& pixels,
                             int64_t image_id, bool bf16, double temperature) {
  LabelledStates states;
  torch::Tensor logits;
  {
    AutocastGuard autocast(bf16);
    states = labelled_states(model, model->build_inputs(pixels, ids, labels, image_id));
    logits = model->llm->logits(states.hidden);  // [n, V]
  }
  const auto& keep = states.keep;  // [N, L-1]
  const int64_t N = keep.size(0);
  logits = logits.to(torch::kFloat32);
  if (temperature != 1.0) logits = logits / temperature;
  const auto lp = torch::log_softmax(logits, -1).gather(1, states.targets.unsqueeze(1)).squeeze(1);  // [n]
  // Left-align each sequence's response tokens: column = rank of the position among its row's.
  const auto rows = keep.nonzero().select(1, 0);
  const auto cols = (keep.to(torch::kLong).cumsum(1) - 1).index({keep});
  const int64_t T = std::max<int64_t>(1, N > 0 ? keep.sum(1).max().item<int64_t>() : 1);
  SequenceLogps out;
  out.token_logps = torch::zeros({N, T}, torch::kFloat32).index_put({rows, cols}, lp);
  out.mask = torch::zeros({N, T}, torch::kFloat32).index_put_({rows, cols}, torch::ones_like(lp.detach()));
  return out;
}

SequenceLogps slice_rows(const SequenceLogps& s, int64_t from, int64_t to) {
  return {s.token_logps.slice(0, from, to), s.mask.slice(0, from, to)};
}

SequenceLogps trim_columns(const SequenceLogps& s) {
  const int64_t T = s.mask.size(0) > 0 ? std::max<int64_t>(1, static_cast<int64_t>(s.mask.sum(1).max().item<float>())) : 1;
  return {s.token_logps.slice(1, 0, T), s.mask.slice(1, 0, T)};
}

namespace {

// Images of rows `rows` of a batch whose sample i owns images_per_sample[i] consecutive images.
torch::Tensor gather_images(const torch::Tensor& pixels, const std::vector<int64_t>& images_per_sample,
                            const std::vector<int64_t>& rows) {
  if (!pixels.defined()) return {};
  std::vector<int64_t> first(images_per_sample.size(), 0);
  for (size_t i = 1; i < first.size(); ++i) first[i] = first[i - 1] + images_per_sample[i - 1];
  std::vector<int64_t> index;
  for (auto r : rows)
    for (int64_t k = 0; k < images_per_sample[static_cast<size_t>(r)]; ++k) index.push_back(first[static_cast<size_t>(r)] + k);
  if (index.empty()) return {};
  return pixels.index_select(0, torch::tensor(index, torch::kLong));
}

// One forward of `model` over the given passes' sequences; fills in.logps.
void run_passes(VlmModel& model, bool with_grad, const std::vector<ResponsePass>& passes,
                const std::function<void(const ResponsePass&, std::vector<std::vector<int64_t>>&,
                                         std::vector<std::vector<int64_t>>&, std::vector<torch::Tensor>&)>& sequences,
                int64_t image_id, bool bf16, double temperature, PreferenceInputs& in) {
  if (passes.empty()) return;
  std::vector<std::vector<int64_t>> ids, labels;
  std::vector<torch::Tensor> pixels;
  std::vector<int64_t> bounds = {0};
  for (const auto& p : passes) {
    sequences(p, ids, labels, pixels);
    bounds.push_back(static_cast<int64_t>(ids.size()));
  }
  torch::Tensor all_pixels;
  std::vector<torch::Tensor> defined;
  for (const auto& t : pixels)
    if (t.defined() && t.size(0) > 0) defined.push_back(t);
  if (!defined.empty()) all_pixels = torch::cat(defined);
  torch::AutoGradMode grad(with_grad && torch::GradMode::is_enabled());
  const auto lp = response_logps(model, ids, labels, all_pixels, image_id, bf16, temperature);
  for (size_t k = 0; k < passes.size(); ++k) {
    auto s = trim_columns(slice_rows(lp, bounds[k], bounds[k + 1]));
    if (!with_grad) s.token_logps = s.token_logps.detach();
    in.logps[passes[k].key()] = s;
  }
}

void split_by_model(const std::vector<ResponsePass>& passes, std::vector<ResponsePass>& policy,
                    std::vector<ResponsePass>& reference) {
  for (const auto& p : passes) (p.model == "reference" ? reference : policy).push_back(p);
}

}  // namespace

namespace {

using SequenceFn = std::function<void(const ResponsePass&, std::vector<std::vector<int64_t>>&,
                                      std::vector<std::vector<int64_t>>&, std::vector<torch::Tensor>&)>;

// Chosen or rejected sequences of `batch`, with its images or the loss's corruption of them
// (drawn once per call, so the policy and reference passes see the same corrupted images).
SequenceFn pair_sequences(PreferenceLossImpl& loss, const PreferenceDataset& data, const PreferenceBatch& batch,
                          uint64_t corrupt_seed) {
  auto corrupted = std::make_shared<torch::Tensor>();
  return [&loss, &data, &batch, corrupt_seed, corrupted](const ResponsePass& p, std::vector<std::vector<int64_t>>& ids,
                                                       std::vector<std::vector<int64_t>>& labels,
                                                       std::vector<torch::Tensor>& pixels) {
    if (p.response != "chosen" && p.response != "rejected")
      throw std::invalid_argument("preference loss asks for '" + p.key() +
                                  "' but the data are chosen/rejected pairs (responses: chosen, rejected)");
    for (auto i : batch.indices) {
      const auto& s = data.sample(i);
      const auto& t = p.response == "chosen" ? s.chosen : s.rejected;
      ids.push_back(t.ids);
      labels.push_back(t.labels);
    }
    if (p.corrupted_image && batch.pixels.defined() && !corrupted->defined())
      *corrupted = loss.corrupt_images(batch.pixels, corrupt_seed);
    pixels.push_back(p.corrupted_image ? *corrupted : batch.pixels);
  };
}

}  // namespace

SequenceLogps ReferenceCache::rows(const std::string& key, const std::vector<int64_t>& indices) const {
  const auto& all = logps.at(key);
  size_t T = 1;
  for (auto i : indices) T = std::max(T, all.at(static_cast<size_t>(i)).size());
  auto lp = torch::zeros({static_cast<int64_t>(indices.size()), static_cast<int64_t>(T)});
  auto mask = torch::zeros_like(lp);
  for (size_t k = 0; k < indices.size(); ++k) {
    const auto& v = all.at(static_cast<size_t>(indices[k]));
    const auto n = static_cast<int64_t>(v.size());
    if (n == 0) continue;
    lp[static_cast<int64_t>(k)].slice(0, 0, n).copy_(torch::tensor(v));
    mask[static_cast<int64_t>(k)].slice(0, 0, n).fill_(1);
  }
  return {lp, mask};
}

ReferenceCache build_reference_cache(PreferenceLossImpl& loss, VlmModel& reference, const PreferenceDataset& data,
                                     int batch, int64_t image_id, bool bf16, const std::vector<int64_t>& left_out) {
  std::vector<ResponsePass> cacheable;
  for (const auto& p : loss.passes())
    if (p.model == "reference" && !p.corrupted_image) cacheable.push_back(p);
  ReferenceCache cache;
  for (const auto& p : cacheable) cache.logps[p.key()].resize(static_cast<size_t>(data.size()));
  torch::NoGradGuard ng;
  const std::vector<int64_t> kept = indices_without(data.size(), left_out);
  const auto n = static_cast<int64_t>(kept.size());
  ProgressLog progress("caching reference log-probs", "pairs", n);
  for (int64_t start = 0; start < n; start += batch) {
    if (stop_requested()) break;  // the caller stops the run before its first step
    progress.update(start);
    const int64_t end = std::min<int64_t>(n, start + batch);
    const auto b = data.rows(std::vector<int64_t>(kept.begin() + start, kept.begin() + end));
    PreferenceInputs in;
    run_passes(reference, false, cacheable, pair_sequences(loss, data, b, 0), image_id, bf16, 1.0, in);
    for (const auto& p : cacheable) {
      const auto& s = in.logps.at(p.key());
      const auto counts = s.count();
      for (int64_t k = 0; k < b.size(); ++k) {
        const auto n = static_cast<int64_t>(counts[k].item<float>());
        auto row = s.token_logps[k].slice(0, 0, n).contiguous();
        cache.logps[p.key()][static_cast<size_t>(b.indices[static_cast<size_t>(k)])] =
            std::vector<float>(row.data_ptr<float>(), row.data_ptr<float>() + n);
      }
    }
  }
  return cache;
}

PreferenceInputs pair_passes(PreferenceLossImpl& loss, VlmModel& policy, VlmModel* reference,
                             const PreferenceDataset& data, const PreferenceBatch& batch, int64_t image_id, bool bf16,
                             uint64_t corrupt_seed, const ReferenceCache* cache) {
  std::vector<ResponsePass> pol, ref_all, ref;
  split_by_model(loss.passes(), pol, ref_all);
  PreferenceInputs in;
  std::vector<float> conditional;
  for (const auto i : batch.indices) conditional.push_back(data.sample(i).image_conditional ? 1.0f : 0.0f);
  in.image_conditional = torch::tensor(conditional, torch::kFloat32);
  for (const auto& p : ref_all) {
    if (cache && cache->covers(p)) in.logps[p.key()] = cache->rows(p.key(), batch.indices);
    else ref.push_back(p);
  }
  const auto sequences = pair_sequences(loss, data, batch, corrupt_seed);
  run_passes(policy, true, pol, sequences, image_id, bf16, 1.0, in);
  if (!ref.empty()) {
    if (!reference) throw std::logic_error("preference: the loss needs the reference model but none was built");
    torch::NoGradGuard ng;
    run_passes(*reference, false, ref, sequences, image_id, bf16, 1.0, in);
  }
  return in;
}

CompletionBatch sample_completions(VlmModel& policy, const Tokenizer& tok, const PreferenceDataset& data,
                                   const PreferenceBatch& batch, const CompletionSampling& sampling,
                                   const std::vector<std::pair<std::string, std::shared_ptr<RewardFnImpl>>>& rewards,
                                   uint64_t seed, bool bf16) {
  const int64_t G = sampling.group_size;
  std::vector<std::vector<int64_t>> prompts;
  std::vector<int64_t> rows;
  for (int64_t i = 0; i < batch.size(); ++i)
    for (int64_t g = 0; g < G; ++g) {
      prompts.push_back(data.sample(batch.indices[static_cast<size_t>(i)]).prompt);
      rows.push_back(i);
    }
  CompletionBatch c;
  c.pixels = gather_images(batch.pixels, batch.images_per_sample, rows);
  for (auto r : rows) c.images_per_sequence.push_back(batch.images_per_sample[static_cast<size_t>(r)]);
  SamplingOptions opt;
  opt.max_new_tokens = sampling.max_new_tokens;
  opt.temperature = sampling.temperature;
  opt.top_k = sampling.top_k;
  opt.top_p = sampling.top_p;
  opt.seed = seed;
  const bool was_training = policy->is_training();
  policy->eval();
  const auto completions = generate_tokens(policy, tok, prompts, c.pixels, opt, bf16);
  if (was_training) set_vlm_train_modes(policy);
  const int64_t eos = reply_end_id(tok);
  std::vector<RewardInput> inputs;
  for (size_t k = 0; k < completions.size(); ++k) {
    const auto& s = data.sample(batch.indices[static_cast<size_t>(rows[k])]);
    std::vector<int64_t> body = completions[k];
    const bool finished = !body.empty() && body.back() == eos;
    if (finished) body.pop_back();
    const std::string text = tok.decode(std::vector<int>(body.begin(), body.end()));
    inputs.push_back({s.prompt_text, text, finished, s.answer, s.question_type});
    c.texts.push_back(text);
    auto ids = s.prompt;
    ids.insert(ids.end(), completions[k].begin(), completions[k].end());
    std::vector<int64_t> labels(s.prompt.size(), kIgnoreIndex);
    labels.insert(labels.end(), completions[k].begin(), completions[k].end());
    c.ids.push_back(std::move(ids));
    c.labels.push_back(std::move(labels));
  }
  const auto total = total_rewards(rewards, inputs, &c.reward_means);
  c.rewards = torch::tensor(std::vector<float>(total.begin(), total.end()), torch::kFloat32);
  return c;
}

PreferenceInputs completion_passes(PreferenceLossImpl& loss, VlmModel& policy, VlmModel* reference,
                                   const CompletionBatch& c, int64_t from, int64_t to, int64_t image_id, bool bf16) {
  std::vector<ResponsePass> pol, ref;
  split_by_model(loss.passes(), pol, ref);
  std::vector<int64_t> rows;
  for (int64_t i = from; i < to; ++i) rows.push_back(i);
  const auto pixels = gather_images(c.pixels, c.images_per_sequence, rows);
  auto sequences = [&](const ResponsePass& p, std::vector<std::vector<int64_t>>& ids,
                       std::vector<std::vector<int64_t>>& labels, std::vector<torch::Tensor>& px) {
    if (p.response != "completion" || p.corrupted_image)
      throw std::invalid_argument("preference loss asks for '" + p.key() +
                                  "' but it samples completions (responses: completion, clean images)");
    ids.insert(ids.end(), c.ids.begin() + from, c.ids.begin() + to);
    labels.insert(labels.end(), c.labels.begin() + from, c.labels.begin() + to);
    px.push_back(pixels);
  };
  const double temperature = loss.sampling()->temperature;
  PreferenceInputs in;
  run_passes(policy, true, pol, sequences, image_id, bf16, temperature, in);
  if (!ref.empty()) {
    if (!reference) throw std::logic_error("preference: the loss needs the reference model but none was built");
    torch::NoGradGuard ng;
    run_passes(*reference, false, ref, sequences, image_id, bf16, temperature, in);
  }
  return in;
}

}  // namespace trialign
