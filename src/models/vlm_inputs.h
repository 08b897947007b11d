// Splices projected image tokens into a batch of token sequences for the language model.
// Each image placeholder id in a sequence is replaced by the next image's N visual tokens
// (images are consumed in batch order: sample 0's images first); their labels are -100, so no
// loss falls on them. Sequences are right-padded (embedding 0, label -100, mask 0). Text-only
// samples and several images per sample work the same way.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace trialign {

struct VlmInputs {
  torch::Tensor embeds;          // [B, L, H]
  torch::Tensor labels;          // [B, L] int64, -100 where no loss
  torch::Tensor attention_mask;  // [B, L] int64, 1 real / 0 padding
  // [B, L] int64 when any sample has segments (data.turns: independent), else undefined: each
  // token's segment, an image's visual tokens taking their placeholder's (0 for padding and for
  // samples without segments, which are then ordinary causal sequences).
  torch::Tensor segment_ids;
};

// ids, labels: per sample, unpadded, same lengths. image_tokens: [num_images, N, H] (undefined
// when the batch has no images). embed: token ids [T] -> [T, H] (the LLM's embedding table).
// segments: per sample, empty or one segment id per id. Throws std::invalid_argument when the
// placeholders and the images do not match in number, or a sample's segments and ids differ in length.
VlmInputs splice_image_tokens(const std::vector<std::vector<int64_t>>& ids,
                              const std::vector<std::vector<int64_t>>& labels, const torch::Tensor& image_tokens,
                              int64_t image_id, const std::function<torch::Tensor(const torch::Tensor&)>& embed,
                              const std::vector<std::vector<int64_t>>& segments = {});

}  // namespace trialign
