// Image-caption pairs for contrastive pretraining: records {"image": path, "caption": text},
// optionally "negatives": hard-negative captions of the same image, each a string or
// {"caption": text, "kind": name} (shapes world writes one per kind: shape, colour, size,
// relation). Other fields are ignored. Records are validated once at load (missing fields,
// missing image files, mistyped negatives); bad ones fail the run with file:line, or are
// skipped and counted when data.on_bad_record is "skip".
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "core/run_config.h"
#include "data/sampler.h"
#include "data/tokenizer.h"

namespace trialign {

struct CaptionBatch {
  torch::Tensor pixels;   // [B, 3, S, S] float
  torch::Tensor ids;      // [B, T] int64, padded with pad_id
  torch::Tensor lengths;  // [B] int64, tokens incl. bos/eos
  std::vector<int64_t> indices;  // dataset indices of the rows
  // Hard negatives of the training rows (data.hard_negatives > 0), row by row: row i owns
  // neg_counts[i] consecutive rows of neg_ids. Undefined when the batch has none.
  torch::Tensor neg_ids;          // [M, Tn] int64, padded with pad_id
  torch::Tensor neg_lengths;      // [M] int64
  std::vector<int64_t> neg_counts;
  // Rows of neg_ids owned by rows [from, to): [first, first + count).
  std::pair<int64_t, int64_t> neg_rows(int64_t from, int64_t to) const;
};

struct CaptionNegative {
  std::string kind;  // "" when the record gave a plain string
  std::vector<int64_t> tokens;
};

class CaptionDataset {
 public:
  CaptionDataset(const std::string& manifest, const DataConfig& cfg, const Tokenizer& tok, bool train,
                 int64_t limit = 0);
  // Pairs already in memory: image paths and their token ids ([bos] ... [eos], as the text
  // encoder expects); `trialign bench` builds its synthetic batches through this.
  CaptionDataset(std::vector<std::string> images, std::vector<std::vector<int64_t>> tokens, const DataConfig& cfg,
                 int pad_id, bool train);

  int64_t size() const { return static_cast<int64_t>(images_.size()); }
  int64_t skipped() const { return skipped_; }
  const std::string& caption(int64_t i) const { return captions_[static_cast<size_t>(i)]; }
  const std::string& image_path(int64_t i) const { return images_[static_cast<size_t>(i)]; }
  const std::string& where(int64_t i) const { return where_[static_cast<size_t>(i)]; }
  const std::vector<CaptionNegative>& negatives(int64_t i) const { return negatives_[static_cast<size_t>(i)]; }
  // Token ids of a list of tokenised texts as one padded batch: ([n, T] ids, [n] lengths).
  std::pair<torch::Tensor, torch::Tensor> pad(const std::vector<const std::vector<int64_t>*>& texts) const;

  // Rows in the given order; augmentation seeded by (seed, epoch, index).
  CaptionBatch collate(const std::vector<SampleRef>& refs, uint64_t seed) const;
  // Rows [begin, end) in dataset order, never augmented (evaluation).
  CaptionBatch range(int64_t begin, int64_t end) const;

 private:
  CaptionBatch build(const std::vector<SampleRef>& refs, uint64_t seed, bool augment) const;
  DataConfig cfg_;
  bool train_;
  int pad_id_;
  std::vector<std::string> images_, captions_, where_;
  std::vector<std::vector<int64_t>> tokens_;  // tokenised once at load
  std::vector<std::vector<CaptionNegative>> negatives_;
  int64_t skipped_ = 0;
};

}  // namespace trialign
