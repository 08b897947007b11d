#include "data/preference_dataset.h"

#include <filesystem>

#include "core/errors.h"
#include "core/rng.h"
#include "data/conversation_dataset.h"
#include "data/image.h"
#include "data/manifest.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

// The prompt of a record as a conversation without its final reply. For prompt records whose
// conversation ends with the assistant, that reply is returned in *final_reply.
Conversation prompt_of(const ManifestRecord& r, PreferenceDataset::Kind kind, std::string* final_reply) {
  nlohmann::json j = r.json;
  if (j.contains("prompt")) {
    if (j.contains("conversations"))
      throw DataError(r.where + " (id " + r.id + "): give either 'prompt' or 'conversations', not both");
    j["conversations"] = nlohmann::json::array({{{"from", "human"}, {"value", require_string(r, "prompt")}}});
  } else if (!j.contains("conversations")) {
    throw DataError(r.where + " (id " + r.id + "): missing field 'prompt' (or a LLaVA 'conversations' list)");
  } else if (!j["conversations"].is_array() || j["conversations"].empty()) {
    throw DataError(r.where + " (id " + r.id + "): 'conversations' must be a non-empty list of turns");
  }
  // Validate with the LLaVA parser (roles, placeholders vs images), which wants a final reply.
  bool ends_with_reply = false;
  if (j["conversations"].is_array() && !j["conversations"].empty()) {
    const auto& last = j["conversations"].back();
    ends_with_reply = last.is_object() && last.contains("from") && (last["from"] == "gpt" || last["from"] == "assistant");
  }
  if (ends_with_reply && kind == PreferenceDataset::Kind::Pairs)
    throw DataError(r.where + " (id " + r.id +
                    "): 'conversations' must end with the user's turn; 'chosen' and 'rejected' are the reply");
  if (!ends_with_reply) j["conversations"].push_back({{"from", "gpt"}, {"value", "-"}});
  Conversation c = parse_llava_record(ManifestRecord{j, r.where, r.id});
  if (ends_with_reply) *final_reply = c.turns.back().text;
  c.turns.pop_back();
  if (c.turns.empty() || c.turns.back().role != "user")
    throw DataError(r.where + " (id " + r.id + "): the prompt must end with the user's turn");
  return c;
}

std::string response_field(const ManifestRecord& r, const char* field) {
  const std::string s = require_string(r, field);
  if (s.find_first_not_of(" \t\r\n") == std::string::npos)
    throw DataError(r.where + " (id " + r.id + "): empty '" + field + "'" + (s.empty() ? "" : " (only whitespace)"));
  if (s.find("<image>") != std::string::npos) throw DataError(r.where + " (id " + r.id + "): <image> inside '" + field + "'");
  return s;
}

// prompt + reply through the chat template; labels on the reply (and its eos) only.
TokenizedConversation with_reply(Conversation c, const std::string& reply, const Tokenizer& tok) {
  c.turns.push_back({"assistant", reply});
  auto t = tokenize_conversation(c, tok, "chat");
  const size_t prompt_len = prompt_ids(t).size();
  for (size_t i = 0; i < prompt_len; ++i) t.labels[i] = kIgnoreIndex;  // earlier assistant turns too
  return t;
}

std::string optional_string(const ManifestRecord& r, const char* field) {
  auto it = r.json.find(field);
  if (it == r.json.end() || it->is_null()) return "";
  if (!it->is_string()) throw DataError(r.where + " (id " + r.id + "): '" + field + "' must be a string");
  return it->get<std::string>();
}

}  // namespace

int64_t response_tokens(const std::vector<int64_t>& labels) {
  int64_t n = 0;
  for (size_t t = 1; t < labels.size(); ++t) n += labels[t] != kIgnoreIndex;
  return n;
}

PreferenceBatch PreferenceBatch::slice(int64_t from, int64_t to) const {
  PreferenceBatch out;
  int64_t first = 0, n = 0;
  for (int64_t i = 0; i < from; ++i) first += images_per_sample[static_cast<size_t>(i)];
  for (int64_t i = from; i < to; ++i) {
    out.images_per_sample.push_back(images_per_sample[static_cast<size_t>(i)]);
    out.indices.push_back(indices[static_cast<size_t>(i)]);
    n += images_per_sample[static_cast<size_t>(i)];
  }
  if (n > 0) out.pixels = pixels.slice(0, first, first + n);
  return out;
}

PreferenceDataset::PreferenceDataset(const std::string& manifest, const DataConfig& cfg, const Tokenizer& tok,
                                     int64_t tokens_per_image, Kind kind, bool train, int64_t limit, int64_t reserve)
    : cfg_(cfg), kind_(kind), train_(train) {
  const auto records = read_manifest(manifest);
  const std::string root = cfg.image_root.empty() ? fs::path(manifest).parent_path().string() : cfg.image_root;
  RecordProblems problems, length_problems;
  int64_t too_long = 0;
  for (const auto& r : records) {
    if (limit > 0 && size() >= limit) break;
    PreferenceSample s;
    s.where = r.where;
    s.id = r.id;
    int64_t length = 0;
    try {
      std::string final_reply;
      Conversation c = prompt_of(r, kind, &final_reply);
      for (const auto& image : c.images) s.images.push_back(checked_image_path(root, image, r.where + " (id " + r.id + "): "));
      s.prompt_text = c.turns.back().text;
      for (const std::string tag : {"<image>\n", "<image>"})
        for (size_t p = s.prompt_text.find(tag); p != std::string::npos; p = s.prompt_text.find(tag))
          s.prompt_text.erase(p, tag.size());
      s.question_type = optional_string(r, "question_type");
      s.level = optional_string(r, "level");
      if (auto it = r.json.find("image_conditional"); it != r.json.end() && !it->is_null()) {
        if (!it->is_boolean())
          throw DataError(r.where + " (id " + r.id + "): 'image_conditional' must be true or false");
        s.image_conditional = it->get<bool>();
      }
      if (kind == Kind::Pairs) {
        const std::string chosen = response_field(r, "chosen"), rejected = response_field(r, "rejected");
        if (chosen == rejected)
          throw DataError(r.where + " (id " + r.id + "): 'chosen' and 'rejected' are the same reply: nothing to prefer");
        s.chosen = with_reply(c, chosen, tok);
        s.rejected = with_reply(c, rejected, tok);
        // Replies that differ only in spacing or in characters the tokenizer maps to <unk> are one
        // sequence to the model: log 2 of loss and no gradient, whatever the text says.
        if (s.chosen.ids == s.rejected.ids)
          throw DataError(r.where + " (id " + r.id + "): 'chosen' and 'rejected' are the same reply once tokenized (they " +
                          "differ only in spacing or in characters the tokenizer does not know): nothing to prefer");
        s.prompt = prompt_ids(s.chosen);
        length = std::max(s.chosen.expanded_length(tokens_per_image), s.rejected.expanded_length(tokens_per_image));
      } else {
        s.answer = r.json.contains("answer") ? response_field(r, "answer") : final_reply;
        if (s.answer.empty())
          throw DataError(r.where + " (id " + r.id + "): missing 'answer' (or a final assistant turn holding it)");
        const auto t = with_reply(c, s.answer, tok);
        s.prompt = prompt_ids(t);
        length = static_cast<int64_t>(s.prompt.size()) + t.num_images * (tokens_per_image - 1) + reserve;
      }
    } catch (const DataError& e) {
      problems.messages.push_back(e.what());
      continue;
    }
    if (length > cfg.max_seq_len) {
      const std::string what = std::to_string(length) + " tokens after image expansion" +
                               (kind == Kind::Prompts ? " (prompt + " + std::to_string(reserve) + " sampled)" : std::string()) +
                               " exceed data.max_seq_len " + std::to_string(cfg.max_seq_len);
      if (cfg.on_too_long == "fail") length_problems.add(r, what);
      else ++too_long;
      continue;
    }
    samples_.push_back(std::move(s));
  }
  length_problems.finish(manifest, "fail",
                         kind == Kind::Prompts
                             ? "lower loss.max_new_tokens (the room kept for each sampled answer), raise data.max_seq_len, "
                               "or set data.on_too_long: skip"
                             : "raise data.max_seq_len, or set data.on_too_long: skip");
  problems.none_usable = samples_.empty();
  problems.finish(manifest, cfg.on_bad_record);
  skipped_ = static_cast<int64_t>(problems.messages.size()) + too_long;
  if (samples_.empty()) throw DataError(manifest + ": no usable " + (kind == Kind::Pairs ? "preference pairs" : "prompts"));
}

PreferenceBatch PreferenceDataset::collate(const std::vector<SampleRef>& refs, uint64_t seed) const {
  return build(refs, seed, train_);
}

PreferenceBatch PreferenceDataset::range(int64_t begin, int64_t end) const {
  std::vector<int64_t> indices;
  for (int64_t i = begin; i < end; ++i) indices.push_back(i);
  return rows(indices);
}

PreferenceBatch PreferenceDataset::rows(const std::vector<int64_t>& indices) const {
  std::vector<SampleRef> refs;
  for (const auto i : indices) refs.push_back({0, i});
  return build(refs, 0, false);
}

PreferenceBatch PreferenceDataset::build(const std::vector<SampleRef>& refs, uint64_t seed, bool augment) const {
  PreferenceBatch b;
  std::vector<torch::Tensor> pixels;
  for (const auto& ref : refs) {
    const auto& s = samples_[static_cast<size_t>(ref.index)];
    b.indices.push_back(ref.index);
    b.images_per_sample.push_back(static_cast<int64_t>(s.images.size()));
    for (size_t k = 0; k < s.images.size(); ++k) {
      const uint64_t aug = mix_seed({seed, static_cast<uint64_t>(ref.epoch), static_cast<uint64_t>(ref.index), k});
      pixels.push_back(load_sample_image(s.images[k], cfg_, augment, aug, s.where + " (id " + s.id + "): "));
    }
  }
  if (!pixels.empty()) b.pixels = torch::stack(pixels);
  return b;
}

}  // namespace trialign
