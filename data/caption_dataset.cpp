#include "data/caption_dataset.h"

#include <opencv2/imgcodecs.hpp>

#include <filesystem>

#include "core/errors.h"
#include "core/rng.h"
#include "data/image.h"
#include "data/manifest.h"

namespace fs = std::filesystem;

namespace trialign {

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
    const std::string path = (root / image).string();
    std::error_code ec;
    if (!fs::is_regular_file(path, ec)) {
      problems.add(r, "image '" + path + "' does not exist (check data.image_root)");
      continue;
    }
    if (fs::file_size(path, ec) == 0 || !cv::haveImageReader(path)) {  // reads the header only
      problems.add(r, "image '" + path + "' is empty or not an image format OpenCV can decode");
      continue;
    }
    images_.push_back(path);
    captions_.push_back(caption);
    where_.push_back(r.where);
    tokens_.push_back(encode_for_text_encoder(tok, caption, cfg.max_text_len));
  }
  problems.finish(manifest, cfg.on_bad_record);
  skipped_ = static_cast<int64_t>(problems.messages.size());
  if (images_.empty()) throw DataError(manifest + ": no usable records");
}

CaptionBatch CaptionDataset::collate(const std::vector<SampleRef>& refs, uint64_t seed) const {
  return build(refs, seed, train_);
}

CaptionBatch CaptionDataset::build(const std::vector<SampleRef>& refs, uint64_t seed, bool augment) const {
  const int64_t B = static_cast<int64_t>(refs.size());
  int64_t T = 0;
  for (const auto& r : refs) T = std::max<int64_t>(T, static_cast<int64_t>(tokens_[r.index].size()));
  CaptionBatch b;
  b.pixels = torch::empty({B, 3, cfg_.image_size, cfg_.image_size});
  b.ids = torch::full({B, T}, pad_id_, torch::kLong);
  b.lengths = torch::empty({B}, torch::kLong);
  auto ids = b.ids.accessor<int64_t, 2>();
  auto lens = b.lengths.accessor<int64_t, 1>();
  for (int64_t i = 0; i < B; ++i) {
    const auto& ref = refs[static_cast<size_t>(i)];
    const auto& path = images_[static_cast<size_t>(ref.index)];
    cv::Mat rgb;
    try {
      rgb = load_image_rgb(path);
    } catch (const DataError& e) {
      throw DataError(where_[static_cast<size_t>(ref.index)] + ": " + e.what());
    }
    const uint64_t aug_seed = mix_seed({seed, static_cast<uint64_t>(ref.epoch), static_cast<uint64_t>(ref.index)});
    b.pixels[i].copy_(image_transform(rgb, cfg_, augment, aug_seed));
    const auto& tok = tokens_[static_cast<size_t>(ref.index)];
    for (size_t t = 0; t < tok.size(); ++t) ids[i][static_cast<int64_t>(t)] = tok[t];
    lens[i] = static_cast<int64_t>(tok.size());
    b.indices.push_back(ref.index);
  }
  return b;
}

CaptionBatch CaptionDataset::range(int64_t begin, int64_t end) const {
  std::vector<SampleRef> refs;
  for (int64_t i = begin; i < end; ++i) refs.push_back({0, i});
  return build(refs, 0, /*augment=*/false);
}

}  // namespace trialign
