// Conversation data for stages 2-3. Records are LLaVA conversations (data/conversation.h) or
// image-caption pairs {"image", "caption"}, which become one exchange: the user turn
// "<image>\n{data.caption_prompt}" and the caption as the reply. Everything that can be checked
// is checked when the dataset is built, never mid-run: fields, roles, image files, placeholder
// counts, and the length after each <image> expands into the projector's visual tokens
// (data.max_seq_len; data.on_too_long: fail | skip | truncate, skips and truncations counted).
#pragma once
#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/run_config.h"
#include "data/conversation.h"
#include "data/sampler.h"
#include "data/tokenizer.h"

namespace trialign {

struct ConversationSample {
  std::string where, id;            // "file:line", record id
  std::vector<std::string> images;  // resolved paths
  TokenizedConversation tokens;
  std::string reference;            // the final assistant reply (what generation is scored against)
  std::string question_type;        // the record's "question_type", "" when absent
  nlohmann::json scene;             // shapes-world scene graph when the record has one
  std::vector<std::string> reference_objects;  // the record's "objects": what a caption may name
  bool is_caption = false;          // an {"image","caption"} record or question_type "caption"
  bool truncated = false;           // cut to data.max_seq_len (its final reply is incomplete)
};

struct ConversationBatch {
  torch::Tensor pixels;                            // [I, 3, S, S], images in sample order; undefined if none
  std::vector<std::vector<int64_t>> ids, labels;   // per sample, unpadded
  // Per sample: empty (one causal sequence) or one segment id per token (data.turns: independent,
  // see tokenize_independent_turns).
  std::vector<std::vector<int64_t>> segments;
  std::vector<int64_t> images_per_sample;
  std::vector<int64_t> indices;                    // dataset indices
  int64_t size() const { return static_cast<int64_t>(ids.size()); }
  // Positions that carry a loss: labels != -100 after the one-token shift (the first label
  // never counts, it has no preceding token).
  int64_t target_tokens() const;
  // Samples [from, to) with their images.
  ConversationBatch slice(int64_t from, int64_t to) const;
};

class ConversationDataset {
 public:
  // tokens_per_image: visual tokens each <image> expands to (the length check needs it).
  ConversationDataset(const std::string& manifest, const DataConfig& cfg, const Tokenizer& tok,
                      int64_t tokens_per_image, bool train, int64_t limit = 0);
  // Samples already tokenised (ids with their placeholders, labels, resolved image paths);
  // `trialign bench` builds its synthetic batches through this.
  ConversationDataset(std::vector<ConversationSample> samples, const DataConfig& cfg, bool train)
      : cfg_(cfg), train_(train), samples_(std::move(samples)) {}

  int64_t size() const { return static_cast<int64_t>(samples_.size()); }
  int64_t skipped() const { return skipped_; }
  int64_t truncated() const { return truncated_; }
  const ConversationSample& sample(int64_t i) const { return samples_[static_cast<size_t>(i)]; }

  // Rows in the given order; augmentation (when data.augment enables it and train) seeded by
  // (seed, epoch, index).
  ConversationBatch collate(const std::vector<SampleRef>& refs, uint64_t seed) const;
  // Rows [begin, end) in dataset order, never augmented.
  ConversationBatch range(int64_t begin, int64_t end) const;
  // Pixels of one sample's images [n, 3, S, S] (undefined when it has none), never augmented.
  torch::Tensor pixels_of(int64_t i) const;
  // Drops every sample the predicate rejects (an evaluation restricted to some record kinds).
  template <class Pred> void keep_only(Pred keep) {
    std::vector<ConversationSample> kept;
    for (auto& s : samples_)
      if (keep(s)) kept.push_back(std::move(s));
    samples_ = std::move(kept);
  }

 private:
  ConversationBatch build(const std::vector<SampleRef>& refs, uint64_t seed, bool augment) const;
  DataConfig cfg_;
  bool train_;
  std::vector<ConversationSample> samples_;
  int64_t skipped_ = 0, truncated_ = 0;
};

// Which evaluation suite scores a record: "pope" (question_type pope/...), "chair" (a caption of
// a shapes-world scene, or any record with an "objects" list), else "vqa".
std::string eval_suite_of(const ConversationSample& s);

// The ids a model is prompted with to produce the sample's final reply: everything before the
// last run of labelled tokens (for "chat" this ends with "ASSISTANT: ").
std::vector<int64_t> prompt_ids(const TokenizedConversation& t);

}  // namespace trialign
