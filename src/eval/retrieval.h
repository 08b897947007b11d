// Image <-> text retrieval recall. A hit for image i at k: one of the k captions ranked highest
// for it has the same text as i's own caption (duplicate captions count as correct, since the
// text cannot tell them apart). Text -> image likewise: one of the top-k images has the query's
// caption text. Ties in similarity rank by index, so results are deterministic.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

namespace trialign {

// image_embeds, text_embeds: [N, E] (row i of each belongs to pair i); captions: N texts.
// Returns {"i2t/R@1": .., "t2i/R@1": .., ...} for every k, plus "cosine/matched" (mean similarity
// of the true pairs) and "cosine/mismatched" (mean over all other pairs), from the one [N, N]
// similarity matrix.
std::map<std::string, double> retrieval_recall(const torch::Tensor& image_embeds, const torch::Tensor& text_embeds,
                                               const std::vector<std::string>& captions,
                                               const std::vector<int64_t>& ks);

// Hard-negative accuracy: for each negative caption m of image owner[m], whether the image's
// own caption scores strictly higher than the negative (cosine similarity). Returns
// "negatives/all" and "negatives/{kind}" for every kind present (kinds[m], "" counted in all
// only): the share of negatives ranked below the true caption. Chance is 0.5.
// image_embeds, text_embeds: [N, E]; negative_embeds: [M, E]; owner, kinds: M entries.
std::map<std::string, double> hard_negative_accuracy(const torch::Tensor& image_embeds, const torch::Tensor& text_embeds,
                                                     const torch::Tensor& negative_embeds,
                                                     const std::vector<int64_t>& owner,
                                                     const std::vector<std::string>& kinds);

}  // namespace trialign
