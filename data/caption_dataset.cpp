#include "data/caption_dataset.h"

#include <opencv2/imgcodecs.hpp>

#include <filesystem>
#include <numeric>
#include <tuple>

#include "core/errors.h"
#include "core/rng.h"
#include "data/image.h"
#include "data/manifest.h"

namespace fs = std::filesystem;

namespace trialign {

CaptionDataset::CaptionDataset(std::vector<std::string> images, std::vector<std::vector<int64_t>> tokens,
                               const DataConfig& cfg, int pad_id, bool train)
    : cfg_(cfg), train_(train), pad_id_(pad_id), images_(std::move(images)), tokens_(std::move(tokens)) {
  if (images_.size() != tokens_.size())
    throw std::invalid_argument("CaptionDataset: " + std::to_string(images_.size()) + " images but " +
                                std::to_string(tokens_.size()) + " token lists");
  for (size_t i = 0; i < images_.size(); ++i) where_.push_back("pair " + std::to_string(i));
  captions_.resize(images_.size());
  negatives_.resize(images_.size());
}

CaptionDataset::CaptionDataset(const std::string& manifest, const DataConfig& cfg, const Tokenizer& tok,
                               bool train, int64_t limit)
    : cfg_(cfg), train_(train), pad_id_(tok.pad_id()) {
  const auto records = read_manifest(manifest);
  const fs::path root = cfg.image_root.empty() ? fs::path(manifest).parent_path() : fs::path(cfg.image_root);
  RecordProblems problems;
  for (const auto& r : records) {
    if (limit > 0 && size() >= limit) break;
    std::string image, caption;
    try {
      image = require_string(r, "image");
      caption = require_string(r, "caption");
    } catch (const DataError& e) {
      problems.messages.push_back(e.what());
      continue;
    }
    if (caption.empty()) {
      problems.add(r, "empty caption");
      continue;
    }
    std::string path;
    try {
      path = checked_image_path(root.string(), image, r.where + " (id " + r.id + "): ");
    } catch (const DataError& e) {
      problems.messages.push_back(e.what());
      continue;
    }
    std::vector<CaptionNegative> negatives;
    if (auto it = r.json.find("negatives"); it != r.json.end()) {
      std::string bad;
      if (!it->is_array()) bad = "'negatives' must be a list of captions";
      for (size_t k = 0; bad.empty() && k < it->size(); ++k) {
        const auto& n = (*it)[k];
        CaptionNegative neg;
        std::string text;
        if (n.is_string()) {
          text = n.get<std::string>();
        } else if (n.is_object() && n.contains("caption") && n["caption"].is_string() &&
                   (!n.contains("kind") || n["kind"].is_string())) {
          text = n["caption"].get<std::string>();
          neg.kind = n.value("kind", std::string());
        } else {
          bad = "negatives[" + std::to_string(k) + "] must be a caption or {\"caption\": ..., \"kind\": ...}";
        }
        if (bad.empty() && (text.empty() || text == caption))
          bad = "negatives[" + std::to_string(k) + "] is empty or equals the caption";
        neg.tokens = encode_for_text_encoder(tok, text, cfg.max_text_len);
        negatives.push_back(std::move(neg));
      }
      if (!bad.empty()) {
        problems.add(r, bad);
        continue;
      }
    }
    images_.push_back(path);
    captions_.push_back(caption);
    where_.push_back(r.where);
    tokens_.push_back(encode_for_text_encoder(tok, caption, cfg.max_text_len));
    negatives_.push_back(std::move(negatives));
  }
  problems.none_usable = images_.empty();
  problems.finish(manifest, cfg.on_bad_record);
  skipped_ = static_cast<int64_t>(problems.messages.size());
  if (images_.empty()) throw DataError(manifest + ": no usable records");
}

CaptionBatch CaptionDataset::collate(const std::vector<SampleRef>& refs, uint64_t seed) const {
  return build(refs, seed, train_);
}

std::pair<int64_t, int64_t> CaptionBatch::neg_rows(int64_t from, int64_t to) const {
  int64_t first = 0, count = 0;
  for (int64_t i = 0; i < to && i < static_cast<int64_t>(neg_counts.size()); ++i)
    (i < from ? first : count) += neg_counts[static_cast<size_t>(i)];
  return {first, count};
}

std::pair<torch::Tensor, torch::Tensor> CaptionDataset::pad(const std::vector<const std::vector<int64_t>*>& texts) const {
  const auto n = static_cast<int64_t>(texts.size());
  int64_t T = 0;
  for (const auto* t : texts) T = std::max<int64_t>(T, static_cast<int64_t>(t->size()));
  auto ids = torch::full({n, T}, pad_id_, torch::kLong);
  auto lengths = torch::empty({n}, torch::kLong);
  auto a = ids.accessor<int64_t, 2>();
  auto l = lengths.accessor<int64_t, 1>();
  for (int64_t i = 0; i < n; ++i) {
    const auto& t = *texts[static_cast<size_t>(i)];
    for (size_t k = 0; k < t.size(); ++k) a[i][static_cast<int64_t>(k)] = t[k];
    l[i] = static_cast<int64_t>(t.size());
  }
  return {ids, lengths};
}

CaptionBatch CaptionDataset::build(const std::vector<SampleRef>& refs, uint64_t seed, bool augment) const {
  const int64_t B = static_cast<int64_t>(refs.size());
  CaptionBatch b;
  b.pixels = torch::empty({B, 3, cfg_.image_size, cfg_.image_size});
  std::vector<const std::vector<int64_t>*> texts, negs;
  for (int64_t i = 0; i < B; ++i) {
    const auto& ref = refs[static_cast<size_t>(i)];
    const auto idx = static_cast<size_t>(ref.index);
    const uint64_t aug_seed = mix_seed({seed, static_cast<uint64_t>(ref.epoch), static_cast<uint64_t>(ref.index)});
    b.pixels[i].copy_(load_sample_image(images_[idx], cfg_, augment, aug_seed, where_[idx] + ": "));
    texts.push_back(&tokens_[idx]);
    b.indices.push_back(ref.index);
    if (train_ && cfg_.hard_negatives > 0) {
      // Up to k of the record's negatives: all of them, or k drawn without replacement.
      const auto& all = negatives_[idx];
      std::vector<size_t> pick(all.size());
      std::iota(pick.begin(), pick.end(), size_t{0});
      const auto k = std::min(pick.size(), static_cast<size_t>(cfg_.hard_negatives));
      Rng rng(mix_seed({seed, static_cast<uint64_t>(ref.epoch), static_cast<uint64_t>(ref.index), 0x4E4547ull}));
      for (size_t j = 0; j < k && k < pick.size(); ++j) std::swap(pick[j], pick[j + rng.below(pick.size() - j)]);
      for (size_t j = 0; j < k; ++j) negs.push_back(&all[pick[j]].tokens);
      b.neg_counts.push_back(static_cast<int64_t>(k));
    }
  }
  std::tie(b.ids, b.lengths) = pad(texts);
  if (!negs.empty()) std::tie(b.neg_ids, b.neg_lengths) = pad(negs);
  return b;
}

CaptionBatch CaptionDataset::range(int64_t begin, int64_t end) const {
  std::vector<SampleRef> refs;
  for (int64_t i = begin; i < end; ++i) refs.push_back({0, i});
  return build(refs, 0, /*augment=*/false);
}

}  // namespace trialign
