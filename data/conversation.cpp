#include "data/conversation.h"

#include <algorithm>

#include "core/errors.h"

namespace trialign {

namespace {

const std::string kImageTag = "<image>";

size_t count_tags(const std::string& s) {
  size_t n = 0;
  for (size_t p = s.find(kImageTag); p != std::string::npos; p = s.find(kImageTag, p + kImageTag.size())) ++n;
  return n;
}

std::string normalise_role(const std::string& from) {
  if (from == "human" || from == "user") return "user";
  if (from == "gpt" || from == "assistant") return "assistant";
  if (from == "system") return "system";
  return "";
}

}  // namespace

Conversation parse_llava_record(const ManifestRecord& r) {
  const std::string at = r.where + " (id " + r.id + "): ";
  Conversation c;
  if (auto it = r.json.find("image"); it != r.json.end()) {
    if (it->is_string()) c.images.push_back(it->get<std::string>());
    else if (it->is_array()) {
      for (const auto& x : *it) {
        if (!x.is_string()) throw DataError(at + "'image' must be a path or a list of paths");
        c.images.push_back(x.get<std::string>());
      }
    } else throw DataError(at + "'image' must be a path or a list of paths, got " + it->type_name());
  }
  auto conv = r.json.find("conversations");
  if (conv == r.json.end()) throw DataError(at + "missing field 'conversations'");
  if (!conv->is_array() || conv->empty()) throw DataError(at + "'conversations' must be a non-empty list of turns");
  size_t tags = 0;
  bool has_reply = false;
  for (size_t i = 0; i < conv->size(); ++i) {
    const auto& t = (*conv)[i];
    const std::string where = at + "conversations[" + std::to_string(i) + "]: ";
    if (!t.is_object() || !t.contains("from") || !t.contains("value") || !t["from"].is_string() || !t["value"].is_string())
      throw DataError(where + "each turn needs string fields 'from' and 'value'");
    const std::string role = normalise_role(t["from"].get<std::string>());
    if (role.empty())
      throw DataError(where + "unknown role '" + t["from"].get<std::string>() + "' (use human, gpt or system)");
    const std::string text = t["value"].get<std::string>();
    if (role == "assistant") {
      if (text.empty()) throw DataError(where + "empty assistant reply");
      if (count_tags(text)) throw DataError(where + "<image> inside an assistant reply");
      has_reply = true;
    }
    tags += count_tags(text);
    c.turns.push_back({role, text});
  }
  if (!has_reply) throw DataError(at + "no assistant ('gpt') turn: nothing to learn from");
  if (tags != c.images.size())
    throw DataError(at + std::to_string(tags) + " <image> placeholder" + (tags == 1 ? "" : "s") + " but " +
                    std::to_string(c.images.size()) + " image" + (c.images.size() == 1 ? "" : "s"));
  return c;
}

TokenizedConversation tokenize_conversation(const Conversation& c, const Tokenizer& tok, const std::string& template_name) {
  TokenizedConversation out;
  auto push = [&](int64_t id, bool train) {
    out.ids.push_back(id);
    out.labels.push_back(train ? id : kIgnoreIndex);
  };
  // Text with <image> tags: tags become placeholder ids, the rest is tokenised piecewise.
  auto push_text = [&](const std::string& text, bool train) {
    size_t pos = 0;
    for (;;) {
      const size_t tag = text.find(kImageTag, pos);
      const std::string piece = text.substr(pos, tag == std::string::npos ? std::string::npos : tag - pos);
      if (!piece.empty())
        for (int id : tok.encode(piece)) push(id, train);
      if (tag == std::string::npos) break;
      if (tok.image_id() < 0)
        throw DataError("tokenizer '" + tok.path() + "' has no <image> piece; retrain it with `trialign tokenizer train`");
      push(tok.image_id(), false);
      ++out.num_images;
      pos = tag + kImageTag.size();
    }
  };
  if (tok.bos_id() >= 0) push(tok.bos_id(), false);
  const int64_t eos = tok.eos_id() >= 0 ? tok.eos_id() : tok.pad_id();

  if (template_name == "plain") {
    if (!c.images.empty() && tok.image_id() < 0)
      throw DataError("tokenizer '" + tok.path() + "' has no <image> piece; retrain it with `trialign tokenizer train`");
    for (size_t i = 0; i < c.images.size(); ++i) {
      push(tok.image_id(), false);
      ++out.num_images;
    }
    std::string caption;
    for (const auto& t : c.turns)
      if (t.role == "assistant") caption = t.text;
    push_text(caption, true);
    push(eos, true);
    return out;
  }
  if (template_name != "chat") throw ConfigError("unknown chat template '" + template_name + "'; use chat or plain");
  for (const auto& t : c.turns) {
    if (t.role == "system") {
      push_text(t.text + "\n", false);
    } else if (t.role == "user") {
      push_text("USER: ", false);
      push_text(t.text + "\n", false);
    } else {
      push_text("ASSISTANT: ", false);
      push_text(t.text, true);
      push(eos, true);
    }
  }
  return out;
}

TokenizedConversation tokenize_independent_turns(const Conversation& c, const Tokenizer& tok, const std::string& where) {
  const std::string at = where + ": data.turns: independent: ";
  std::vector<Turn> system;
  size_t i = 0;
  for (; i < c.turns.size() && c.turns[i].role == "system"; ++i) system.push_back(c.turns[i]);
  std::vector<std::pair<std::string, std::string>> exchanges;  // (question, reply)
  for (; i < c.turns.size(); i += 2) {
    if (c.turns[i].role != "user" || i + 1 >= c.turns.size() || c.turns[i + 1].role != "assistant")
      throw DataError(at + "conversations[" + std::to_string(i) +
                      "]: expected a user turn followed by its assistant reply (system turns only at the start); "
                      "use data.turns: sequential for this data");
    exchanges.emplace_back(c.turns[i].text, c.turns[i + 1].text);
  }
  if (exchanges.empty()) throw DataError(at + "no user / assistant exchange");

  // The first user turn opens with its images: "<image>\n<image>\nWhat ..." -> tags "<image>\n<image>",
  // separator "\n", question "What ...". Later questions get the same tags and separator.
  const std::string& first = exchanges[0].first;
  size_t pos = 0, tags_end = 0;
  while (pos < first.size()) {
    if (first.compare(pos, kImageTag.size(), kImageTag) == 0) tags_end = pos = pos + kImageTag.size();
    else if (first[pos] == '\n' || first[pos] == ' ') ++pos;
    else break;
  }
  const std::string tags = first.substr(0, tags_end);
  size_t q = tags_end;
  while (q < first.size() && (first[q] == '\n' || first[q] == ' ')) ++q;
  const std::string sep = first.substr(tags_end, q - tags_end);
  if (count_tags(first.substr(tags_end)))
    throw DataError(at + "every <image> must open the first user turn, before its question");
  for (size_t k = 1; k < exchanges.size(); ++k)
    if (count_tags(exchanges[k].first))
      throw DataError(at + "exchange " + std::to_string(k + 1) +
                      "'s user turn has an <image>; only the first user turn may carry images");

  std::vector<TokenizedConversation> single;  // each exchange asked alone
  for (size_t k = 0; k < exchanges.size(); ++k) {
    Conversation one{c.images, system};
    one.turns.push_back({"user", k == 0 ? first : tags + sep + exchanges[k].first});
    one.turns.push_back({"assistant", exchanges[k].second});
    single.push_back(tokenize_conversation(one, tok, "chat"));
  }
  if (single.size() == 1) return single[0];  // one exchange: an ordinary sequence

  size_t prefix = 0;
  if (!c.images.empty()) {
    for (size_t t = 0; t < single[0].ids.size(); ++t)
      if (single[0].ids[t] == tok.image_id()) prefix = t + 1;
  } else {
    prefix = tokenize_conversation(Conversation{{}, system}, tok, "chat").ids.size();  // bos + system prompt
  }
  TokenizedConversation out = single[0];
  out.segments.assign(prefix, 0);
  out.segments.resize(out.ids.size(), 1);
  for (size_t k = 1; k < single.size(); ++k) {
    const auto& s = single[k];
    // The shared prefix is built from the same turns, so this only guards the construction.
    if (s.ids.size() <= prefix || !std::equal(s.ids.begin(), s.ids.begin() + static_cast<std::ptrdiff_t>(prefix), out.ids.begin()))
      throw DataError(at + "exchange " + std::to_string(k + 1) + " does not tokenise with the shared prefix");
    out.ids.insert(out.ids.end(), s.ids.begin() + static_cast<std::ptrdiff_t>(prefix), s.ids.end());
    out.labels.insert(out.labels.end(), s.labels.begin() + static_cast<std::ptrdiff_t>(prefix), s.labels.end());
    out.segments.resize(out.ids.size(), static_cast<int64_t>(k + 1));
  }
  return out;
}

}  // namespace trialign
