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

}  // namespace trialign
