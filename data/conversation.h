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
  // Empty: one causal sequence. Otherwise one entry per id (tokenize_independent_turns):
  // 0 = the shared prefix every token sees, k >= 1 = exchange k, which sees the prefix and
  // itself only (models/llama.h, segment_ids).
  std::vector<int64_t> segments;
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

// data.turns: independent. Every (user, assistant) exchange of a multi-turn record becomes its
// own segment, trained exactly as if it were asked alone after the image:
//   [bos] {system}\n USER: <image> | \n{q1}\n ASSISTANT: {a1}[eos] | \n{q2}\n ASSISTANT: {a2}[eos] | ...
//   prefix (segment 0)              | segment 1                      | segment 2
// where segment k holds the tokens of the single-turn record {system, user: <image>\n{qk},
// assistant: ak} after the prefix. So one sequence carries N single-turn samples for the cost of
// one image, and no answer can be read off an earlier turn (a multi-turn record's questions
// often name what another turn asks for). The prefix ends after the last image placeholder, or
// after the system prompt in a text-only record. Requires the chat template, alternating user /
// assistant turns after optional system turns, and every `<image>` at the start of the first
// user turn; throws DataError naming the record otherwise.
TokenizedConversation tokenize_independent_turns(const Conversation& c, const Tokenizer& tok,
                                                 const std::string& where);

}  // namespace trialign
