#include "models/vlm_inputs.h"

#include <stdexcept>

#include "data/conversation.h"

namespace trialign {

VlmInputs splice_image_tokens(const std::vector<std::vector<int64_t>>& ids,
                              const std::vector<std::vector<int64_t>>& labels, const torch::Tensor& image_tokens,
                              int64_t image_id, const std::function<torch::Tensor(const torch::Tensor&)>& embed,
                              const std::vector<std::vector<int64_t>>& segments) {
  const int64_t B = static_cast<int64_t>(ids.size());
  bool any_segments = false;
  for (int64_t b = 0; b < static_cast<int64_t>(segments.size()); ++b) {
    if (segments[b].empty()) continue;
    if (b >= B || segments[b].size() != ids[b].size())
      throw std::invalid_argument("splice_image_tokens: sample " + std::to_string(b) + "'s segments and ids differ in length");
    any_segments = true;
  }
  std::vector<torch::Tensor> segments_per_sample;
  const int64_t available = image_tokens.defined() ? image_tokens.size(0) : 0;
  std::vector<torch::Tensor> rows_per_sample, labels_per_sample;
  int64_t next_image = 0, max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    const auto& seq = ids[b];
    if (labels[b].size() != seq.size()) throw std::invalid_argument("splice_image_tokens: ids and labels differ in length");
    auto text = embed(torch::tensor(seq, torch::kLong));  // [T, H]
    std::vector<torch::Tensor> parts, part_labels, part_segments;
    const bool has_segments = b < static_cast<int64_t>(segments.size()) && !segments[b].empty();
    auto segment_of = [&](size_t t) { return has_segments ? segments[b][t] : int64_t{0}; };
    size_t start = 0;
    auto flush_text = [&](size_t end) {  // text positions [start, end)
      if (end <= start) return;
      parts.push_back(text.slice(0, static_cast<int64_t>(start), static_cast<int64_t>(end)));
      part_labels.push_back(torch::tensor(std::vector<int64_t>(labels[b].begin() + start, labels[b].begin() + end)));
      if (any_segments) {
        std::vector<int64_t> seg(end - start);
        for (size_t t = start; t < end; ++t) seg[t - start] = segment_of(t);
        part_segments.push_back(torch::tensor(seg));
      }
    };
    for (size_t t = 0; t < seq.size(); ++t) {
      if (seq[t] != image_id) continue;
      flush_text(t);
      if (next_image >= available)
        throw std::invalid_argument("splice_image_tokens: sample " + std::to_string(b) + " has more <image> placeholders than the " +
                                    std::to_string(available) + " images given");
      auto img = image_tokens[next_image++].to(text.scalar_type());  // [N, H]
      parts.push_back(img);
      part_labels.push_back(torch::full({img.size(0)}, kIgnoreIndex, torch::kLong));
      if (any_segments) part_segments.push_back(torch::full({img.size(0)}, segment_of(t), torch::kLong));
      start = t + 1;
    }
    flush_text(seq.size());
    rows_per_sample.push_back(torch::cat(parts));
    labels_per_sample.push_back(torch::cat(part_labels));
    if (any_segments) segments_per_sample.push_back(torch::cat(part_segments));
    max_len = std::max(max_len, rows_per_sample.back().size(0));
  }
  if (next_image != available)
    throw std::invalid_argument("splice_image_tokens: " + std::to_string(available) + " images given but " +
                                std::to_string(next_image) + " <image> placeholders in the batch");
  const int64_t H = rows_per_sample.at(0).size(1);
  std::vector<torch::Tensor> embeds, labs, masks, segs;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = rows_per_sample[b].size(0), pad = max_len - L;
    if (any_segments) segs.push_back(torch::cat({segments_per_sample[b], torch::zeros({pad}, torch::kLong)}));
    embeds.push_back(torch::cat({rows_per_sample[b], torch::zeros({pad, H}, rows_per_sample[b].options())}));
    labs.push_back(torch::cat({labels_per_sample[b], torch::full({pad}, kIgnoreIndex, torch::kLong)}));
    masks.push_back(torch::cat({torch::ones({L}, torch::kLong), torch::zeros({pad}, torch::kLong)}));
  }
  VlmInputs out;
  out.embeds = torch::stack(embeds);           // [B, L, H]; gradients reach the image tokens
  out.labels = torch::stack(labs);             // [B, L]
  out.attention_mask = torch::stack(masks);    // [B, L]
  if (any_segments) out.segment_ids = torch::stack(segs);  // [B, L]
  return out;
}

}  // namespace trialign
