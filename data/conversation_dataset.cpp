#include "data/conversation_dataset.h"

#include <algorithm>
#include <filesystem>

#include "core/errors.h"
#include "core/rng.h"
#include "data/image.h"
#include "data/manifest.h"
#include "data/shapes_world.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

// {"image", "caption"} -> the LLaVA form; conversations as they are otherwise.
Conversation parse_record(const ManifestRecord& r, const std::string& caption_prompt, bool* is_caption) {
  *is_caption = false;
  if (!r.json.contains("conversations") && r.json.contains("caption")) {
    Conversation c;
    *is_caption = true;
    c.images.push_back(require_string(r, "image"));
    const std::string caption = require_string(r, "caption");
    if (caption.empty()) throw DataError(r.where + " (id " + r.id + "): empty caption");
    if (caption.find("<image>") != std::string::npos)
      throw DataError(r.where + " (id " + r.id + "): <image> inside a caption");
    c.turns.push_back({"user", "<image>\n" + caption_prompt});
    c.turns.push_back({"assistant", caption});
    return c;
  }
  return parse_llava_record(r);
}

// Text-only view of a conversation: images and their placeholders removed.
void drop_images(Conversation& c) {
  c.images.clear();
  for (auto& t : c.turns) {
    for (const std::string tag : {"<image>\n", "\n<image>", "<image>"})
      for (size_t p = t.text.find(tag); p != std::string::npos; p = t.text.find(tag)) t.text.erase(p, tag.size());
  }
}

}  // namespace

int64_t ConversationBatch::target_tokens() const {
  int64_t n = 0;
  for (const auto& l : labels)
    for (size_t t = 1; t < l.size(); ++t) n += l[t] != kIgnoreIndex;
  return n;
}

ConversationBatch ConversationBatch::slice(int64_t from, int64_t to) const {
  ConversationBatch out;
  int64_t first_image = 0, n_images = 0;
  for (int64_t i = 0; i < from; ++i) first_image += images_per_sample[static_cast<size_t>(i)];
  for (int64_t i = from; i < to; ++i) {
    const auto k = static_cast<size_t>(i);
    out.ids.push_back(ids[k]);
    out.labels.push_back(labels[k]);
    out.segments.push_back(k < segments.size() ? segments[k] : std::vector<int64_t>{});  // hand-built batches may have none
    out.images_per_sample.push_back(images_per_sample[k]);
    out.indices.push_back(indices[k]);
    n_images += images_per_sample[k];
  }
  if (n_images > 0) out.pixels = pixels.slice(0, first_image, first_image + n_images);
  return out;
}

std::vector<int64_t> prompt_ids(const TokenizedConversation& t) {
  size_t start = t.labels.size();
  while (start > 0 && t.labels[start - 1] == kIgnoreIndex) --start;  // trailing unlabelled tokens
  while (start > 0 && t.labels[start - 1] != kIgnoreIndex) --start;  // the last labelled run
  return std::vector<int64_t>(t.ids.begin(), t.ids.begin() + static_cast<std::ptrdiff_t>(start));
}

ConversationDataset::ConversationDataset(const std::string& manifest, const DataConfig& cfg, const Tokenizer& tok,
                                         int64_t tokens_per_image, bool train, int64_t limit)
    : cfg_(cfg), train_(train) {
  const auto records = read_manifest(manifest);
  const fs::path root = cfg.image_root.empty() ? fs::path(manifest).parent_path() : fs::path(cfg.image_root);
  RecordProblems problems, length_problems;  // length failures always fail: they have their own switch
  int64_t too_long = 0;
  for (const auto& r : records) {
    if (limit > 0 && size() >= limit) break;
    ConversationSample s;
    s.where = r.where;
    s.id = r.id;
    try {
      Conversation c = parse_record(r, cfg.caption_prompt, &s.is_caption);
      if (c.turns.back().role != "assistant")
        throw DataError(r.where + " (id " + r.id + "): the conversation must end with the assistant's reply");
      if (cfg.drop_images) drop_images(c);
      for (const auto& image : c.images) s.images.push_back(checked_image_path(root.string(), image, r.where + " (id " + r.id + "): "));
      // Independent turns pack training records only: evaluation scores each record as written.
      s.tokens = train && cfg.turns == "independent"
                     ? tokenize_independent_turns(c, tok, r.where + " (id " + r.id + ")")
                     : tokenize_conversation(c, tok, cfg.chat_template);
      if (s.tokens.num_images != static_cast<int64_t>(s.images.size()))
        throw DataError(r.where + " (id " + r.id + "): " + std::to_string(s.tokens.num_images) +
                        " <image> placeholders after templating but " + std::to_string(s.images.size()) + " images");
      for (const auto& t : c.turns)
        if (t.role == "assistant") s.reference = t.text;
    } catch (const DataError& e) {
      problems.messages.push_back(e.what());
      continue;
    }
    if (auto it = r.json.find("question_type"); it != r.json.end()) {
      // Scores are split by this name (exact_match/<type>); a number or list would vanish from them.
      if (!it->is_string() || it->get<std::string>().empty()) {
        problems.add(r, "'question_type' must be a non-empty string naming the question's kind (e.g. \"count\"), got " +
                            it->dump().substr(0, 80));
        continue;
      }
      s.question_type = *it;
      if (s.question_type == "caption") s.is_caption = true;
    }
    if (auto it = r.json.find("scene"); it != r.json.end()) {
      try {
        shapes::scene_from_json(*it);  // validates: caption scoring reads it later
        s.scene = *it;
      } catch (const std::exception& e) {
        problems.add(r, std::string("bad 'scene': ") + e.what());
        continue;
      }
    }
    if (auto it = r.json.find("objects"); it != r.json.end()) {
      // A reference object list for CHAIR on a user's own captions (eval/caption_objects.h).
      const bool ok = it->is_array() && std::all_of(it->begin(), it->end(), [](const nlohmann::json& o) {
                        return o.is_string() && !o.get<std::string>().empty();
                      });
      if (!ok) {
        problems.add(r, "'objects' must be a list of object names (non-empty strings), got " + it->dump().substr(0, 80));
        continue;
      }
      s.reference_objects = it->get<std::vector<std::string>>();
    }

    const int64_t len = s.tokens.expanded_length(tokens_per_image);
    if (len > cfg.max_seq_len) {
      const std::string what = std::to_string(len) + " tokens after image expansion (" +
                               std::to_string(s.tokens.num_images) + " image(s) x " + std::to_string(tokens_per_image) +
                               " visual tokens) exceed data.max_seq_len " + std::to_string(cfg.max_seq_len);
      if (cfg.on_too_long == "fail") {
        length_problems.add(r, what);
        continue;
      }
      // Truncation keeps every image and cuts text at the end; it needs a labelled token left.
      size_t keep = 0;
      int64_t expanded = 0;
      for (size_t t = 0; t < s.tokens.ids.size(); ++t) {
        const int64_t w = s.tokens.ids[t] == tok.image_id() && s.tokens.num_images > 0 ? tokens_per_image : 1;
        if (expanded + w > cfg.max_seq_len) break;
        expanded += w;
        keep = t + 1;
      }
      bool kept_labels = false;
      for (size_t t = 1; t < keep; ++t) kept_labels = kept_labels || s.tokens.labels[t] != kIgnoreIndex;
      int64_t images_kept = 0;
      for (size_t t = 0; t < keep; ++t) images_kept += s.tokens.ids[t] == tok.image_id();
      if (cfg.on_too_long == "skip" || !kept_labels || images_kept != s.tokens.num_images) {
        ++too_long;
        continue;
      }
      s.tokens.ids.resize(keep);
      s.tokens.labels.resize(keep);
      if (!s.tokens.segments.empty()) s.tokens.segments.resize(keep);
      s.truncated = true;  // its final reply is gone: not scored by generation
      ++truncated_;
    }
    samples_.push_back(std::move(s));
  }
  length_problems.finish(manifest, "fail", "raise data.max_seq_len, or set data.on_too_long: skip | truncate");
  problems.none_usable = samples_.empty();
  problems.finish(manifest, cfg.on_bad_record);
  skipped_ = static_cast<int64_t>(problems.messages.size()) + too_long;
  if (samples_.empty())
    throw DataError(manifest + ": no usable records" +
                    (too_long ? " (" + std::to_string(too_long) + " longer than data.max_seq_len)" : std::string()));
}

ConversationBatch ConversationDataset::collate(const std::vector<SampleRef>& refs, uint64_t seed) const {
  return build(refs, seed, train_);
}

ConversationBatch ConversationDataset::range(int64_t begin, int64_t end) const {
  std::vector<SampleRef> refs;
  for (int64_t i = begin; i < end; ++i) refs.push_back({0, i});
  return build(refs, 0, false);
}

torch::Tensor ConversationDataset::pixels_of(int64_t i) const { return range(i, i + 1).pixels; }

ConversationBatch ConversationDataset::build(const std::vector<SampleRef>& refs, uint64_t seed, bool augment) const {
  ConversationBatch b;
  std::vector<torch::Tensor> pixels;
  for (const auto& ref : refs) {
    const auto& s = samples_[static_cast<size_t>(ref.index)];
    b.ids.push_back(s.tokens.ids);
    b.labels.push_back(s.tokens.labels);
    b.segments.push_back(s.tokens.segments);
    b.images_per_sample.push_back(static_cast<int64_t>(s.images.size()));
    b.indices.push_back(ref.index);
    for (size_t k = 0; k < s.images.size(); ++k) {
      const uint64_t aug_seed = mix_seed({seed, static_cast<uint64_t>(ref.epoch), static_cast<uint64_t>(ref.index), k});
      pixels.push_back(load_sample_image(s.images[k], cfg_, augment, aug_seed, s.where + " (id " + s.id + "): "));
    }
  }
  if (!pixels.empty()) b.pixels = torch::stack(pixels);
  return b;
}

std::string eval_suite_of(const ConversationSample& s) {
  if (s.question_type.rfind("pope/", 0) == 0) return "pope";
  if (!s.reference_objects.empty() || (!s.scene.is_null() && s.is_caption)) return "chair";
  return "vqa";
}

}  // namespace trialign
