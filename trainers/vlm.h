// Stages 2-3 (and text-only LM pretraining): the vision-language model trained on conversation
// data with a token-level loss (losses/cross_entropy.h). One loop serves both trainers:
//   adapter   stage 2, LLaVA "feature alignment": the config freezes vision_model and
//             language_model, the projector trains (the trainer checks this)
//   finetune  stage 3: whatever optim.param_groups leaves trainable (projector + LLM, the vision
//             tower optionally); with data.drop_images it pretrains the LLM on text alone
// A fresh run may take components from an earlier stage's checkpoint (init_from).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "core/run_config.h"
#include "data/conversation_dataset.h"
#include "data/tokenizer.h"
#include "eval/answers.h"
#include "eval/caption_objects.h"
#include "losses/loss.h"
#include "models/generate.h"
#include "models/vlm.h"
#include "trainers/common.h"
#include "trainers/micro_batches.h"

namespace trialign {

// The model for a config whose llm.vocab_size may come from the tokenizer (cfg is updated).
VlmModel build_vlm_model(RunConfig& cfg, const Tokenizer& tok);


// The LLM's final states where a label follows (position t predicts label t + 1), computed with
// the last layer on those rows only: hidden [n, H], the labels they predict [n], and keep
// [B, L-1] marking the positions, row-major in the order of hidden's rows.
struct LabelledStates {
  torch::Tensor hidden, targets, keep;
};
LabelledStates labelled_states(VlmModel& model, const VlmInputs& in);

// One optimizer step's forward and backward over a batch split into `accum` micro-batches of
// equal sample count. The loss is normalised by the target tokens of the whole batch, so the
// accumulated gradient equals the one-big-batch gradient. Under data parallel `step_tokens` is
// the global batch's target tokens (all ranks); 0 = this batch's. threads (when given) runs
// micro-batches at once (trainers/micro_batches.h). Returns the loss and metrics.
LossOutput vlm_step(VlmModel& model, LmLossImpl& loss, const ConversationBatch& batch, int accum, int64_t image_id,
                    bool bf16, double step_tokens = 0, MicroBatchThreads* threads = nullptr);

// The token that ends a reply in the chat template: eos, or pad for a tokenizer without eos.
int64_t reply_end_id(const Tokenizer& tok);

// Sampled (or greedy) continuations of each prompt with the KV cache; each ends with
// reply_end_id(tok) unless cut at opt.max_new_tokens. opt.eos_id is set here, and the image
// placeholder and bos are never emitted.
std::vector<std::vector<int64_t>> generate_tokens(VlmModel& model, const Tokenizer& tok,
                                                  const std::vector<std::vector<int64_t>>& prompts,
                                                  const torch::Tensor& pixels, const SamplingOptions& opt, bool bf16);

// Greedy replies to each sample's prompt (prompt_ids), decoded and trimmed.
std::vector<std::string> generate_replies(VlmModel& model, const Tokenizer& tok,
                                          const std::vector<std::vector<int64_t>>& prompts, const torch::Tensor& pixels,
                                          const SamplingOptions& opt, bool bf16);

// Scores a held-out set: "loss" (token CE), "exact_match" of the generated final reply overall
// and "exact_match/<question_type>", yes/no probe counts for "pope/..." records, and caption
// objects and CHAIR ("caption/...") for caption records with a scene and for any record with an
// "objects" list. `batch` samples per forward. vocabulary: what counts as naming an object for
// "objects" records; empty = every object listed anywhere in the set names itself.
// predictions (when given) gets one object per scored record, in data order: id, where
// (file:line), question_type, reference, reply, right (exact match) -- what `trialign eval
// --predictions` writes, so a user can read which records the model gets wrong.
nlohmann::json evaluate_vlm(VlmModel& model, LmLossImpl& loss, const ConversationDataset& data, const Tokenizer& tok,
                            int batch, int max_new_tokens, bool bf16, const ObjectVocabulary& vocabulary = {},
                            std::vector<nlohmann::json>* predictions = nullptr);

// eval.object_vocabulary loaded (empty when unset); load it before the first step so a bad file
// stops the run before it starts.
ObjectVocabulary load_eval_vocabulary(const EvalSection& eval);

TrainResult train_vlm(const RunConfig& cfg, const TrainOptions& opt);

// Checkpoint of a VLM trainer (adapter, finetune, preference): model.safetensors (every
// parameter, Hugging Face names), optimizer.safetensors, rng.safetensors, trainer_state.json, config.yaml.
// tokenizer: tokenizer_record of the file the run loaded at its start (core/checkpoint_tokenizer.h);
// data: train_data_record of its training manifest (trainers/common.h).
std::string save_vlm_checkpoint(const RunConfig& cfg, VlmModel& model, torch::optim::Optimizer& optim, int64_t step,
                                const nlohmann::json& tokenizer, const nlohmann::json& data);
// Restores what save_vlm_checkpoint wrote after check_resume_checkpoint; returns the step.
int64_t load_vlm_checkpoint(const std::string& dir, const RunConfig& cfg, VlmModel& model, torch::optim::Optimizer& optim);
// Train mode, except components with no trainable parameter (eval mode: no dropout or batch
// statistics, should a layer have them).
void set_vlm_train_modes(VlmModel& model);

}  // namespace trialign
