// LLaVA-format conversations -> token ids and labels for the language model.
//
// Record: {"id": .., "image": "a.png" | ["a.png", "b.png"] (optional), "conversations":
//          [{"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "red"}]}
// Roles: human / user, gpt / assistant, system.
//
// Chat template ("chat"), each segment tokenised on its own so boundaries never merge:
//   [bos] {system}\n USER: {human}\n ASSISTANT: {gpt}[eos] USER: ... ASSISTANT: ...[eos]
// Labels are -100 everywhere except the assistant replies and their eos: the loss falls only on
// what the model should say. Template "plain" (LLaVA stage-1 "feature alignment"):
//   [bos] <image> {caption}[eos]     loss on the caption and eos only.
// Each `<image>` in the text becomes one image placeholder id; the VLM expands it into the
// projector's N visual tokens (models/vlm_inputs.h), whose labels are -100.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/manifest.h"
#include "data/tokenizer.h"

namespace trialign {

constexpr int64_t kIgnoreIndex = -100;

struct Turn {
  std::string role;  // "system", "user" or "assistant"
  std::string text;
};

struct Conversation {
  std::vector<std::string> images;  // paths as written in the record
  std::vector<Turn> turns;
};

// Validates and normalises a record; throws DataError naming the record (file:line, id) and the
// problem: missing / mistyped fields, unknown role, empty conversation or reply, a number of
// `<image>` placeholders different from the number of images (a text-only record has neither).
Conversation parse_llava_record(const ManifestRecord& r);

struct TokenizedConversation {
  std::vector<int64_t> ids;     // with one placeholder id per image
  std::vector<int64_t> labels;  // same length; kIgnoreIndex where no loss
  int64_t num_images = 0;
  // Length once every placeholder becomes `tokens_per_image` visual tokens.
  int64_t expanded_length(int64_t tokens_per_image) const {
    return static_cast<int64_t>(ids.size()) + num_images * (tokens_per_image - 1);
  }
};

// template_name: "chat" or "plain" (plain takes the last assistant reply as the caption).
// Throws DataError when the tokenizer has no `<image>` piece but the conversation has images.
TokenizedConversation tokenize_conversation(const Conversation& c, const Tokenizer& tok,
                                            const std::string& template_name = "chat");

}  // namespace trialign
