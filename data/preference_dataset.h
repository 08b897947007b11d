// Data of the preference trainer, both kinds on one pipeline:
//
// Pairs (DPO, mDPO):
//   {"id": .., "image": "a.png", "prompt": "<image>\nDescribe the image.", "chosen": "...",
//    "rejected": "...", "level": "object" | "attribute" | "relation" (optional, for per-level eval)}
//   or the LLaVA form: "conversations" ending with the user's turn, plus "chosen" and "rejected"
//   (the final assistant turn, split in two).
// Prompts (GRPO, verifiable answers):
//   {"id", "image", "prompt": "<image>\nHow many stars are there?", "answer": "2",
//    "question_type": "count" (optional)}
//   or a LLaVA conversation whose final assistant turn is the answer (a VQA record as it is).
//
// The chat template (data/conversation.h) renders the prompt and the response; only the response
// and its end-of-sequence token are labelled, never the prompt (earlier assistant turns of a
// multi-turn prompt included). Everything is checked when the dataset is built: fields, image
// files, placeholder counts, chosen == rejected, and length after image expansion against
// data.max_seq_len (for prompts: prompt + the sampler's max_new_tokens). data.on_bad_record and
// data.on_too_long (fail | skip; truncate counts as skip, a cut response cannot be compared).
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/run_config.h"
#include "data/conversation.h"
#include "data/sampler.h"
#include "data/tokenizer.h"

namespace trialign {

struct PreferenceSample {
  std::string where, id;
  std::vector<std::string> images;  // resolved paths
  std::vector<int64_t> prompt;      // prompt ids (ending with the assistant tag), one placeholder per image
  TokenizedConversation chosen, rejected;  // pairs: prompt + response, labels on the response only
  std::string answer;               // prompts: the verifiable answer
  std::string question_type, level; // optional tags ("" when absent)
  // Pairs: false when the chosen reply stays right on a corrupted image (a "no" to a question about
  // something absent), so mDPO's conditional image preference must not push it down there.
  // Record field "image_conditional" (bool, default true).
  bool image_conditional = true;
  std::string prompt_text;          // the last user turn, for reward functions
};

struct PreferenceBatch {
  torch::Tensor pixels;                  // [I, 3, S, S] every sample's images in order; undefined if none
  std::vector<int64_t> images_per_sample, indices;
  int64_t size() const { return static_cast<int64_t>(indices.size()); }
  PreferenceBatch slice(int64_t from, int64_t to) const;
};

class PreferenceDataset {
 public:
  enum class Kind { Pairs, Prompts };
  // reserve: tokens each prompt must leave free for sampling (GRPO max_new_tokens).
  PreferenceDataset(const std::string& manifest, const DataConfig& cfg, const Tokenizer& tok, int64_t tokens_per_image,
                    Kind kind, bool train, int64_t limit = 0, int64_t reserve = 0);
  // Samples already tokenised; `trialign bench` builds its synthetic pairs through this.
  PreferenceDataset(std::vector<PreferenceSample> samples, const DataConfig& cfg, Kind kind, bool train)
      : cfg_(cfg), kind_(kind), train_(train), samples_(std::move(samples)) {}

  int64_t size() const { return static_cast<int64_t>(samples_.size()); }
  int64_t skipped() const { return skipped_; }
  Kind kind() const { return kind_; }
  const PreferenceSample& sample(int64_t i) const { return samples_[static_cast<size_t>(i)]; }

  PreferenceBatch collate(const std::vector<SampleRef>& refs, uint64_t seed) const;
  PreferenceBatch range(int64_t begin, int64_t end) const;
  // The given records in that order, never augmented.
  PreferenceBatch rows(const std::vector<int64_t>& indices) const;

 private:
  PreferenceBatch build(const std::vector<SampleRef>& refs, uint64_t seed, bool augment) const;
  DataConfig cfg_;
  Kind kind_;
  bool train_;
  std::vector<PreferenceSample> samples_;
  int64_t skipped_ = 0;
};

// Labelled positions after the one-token shift (what a sequence log-prob sums over).
int64_t response_tokens(const std::vector<int64_t>& labels);

}  // namespace trialign
