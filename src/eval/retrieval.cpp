#include "eval/retrieval.h"

#include <algorithm>
#include <numeric>
#include <unordered_map>

namespace trialign {

std::map<std::string, double> retrieval_recall(const torch::Tensor& image_embeds, const torch::Tensor& text_embeds,
                                               const std::vector<std::string>& captions,
                                               const std::vector<int64_t>& ks) {
  const int64_t N = image_embeds.size(0);
  TORCH_CHECK(!ks.empty(), "retrieval_recall: no k given");
  TORCH_CHECK(text_embeds.size(0) == N && static_cast<int64_t>(captions.size()) == N,
              "retrieval_recall: ", N, " images, ", text_embeds.size(0), " texts, ", captions.size(), " captions");
  // Caption text -> class id, so "same text" is an integer compare.
  std::unordered_map<std::string, int64_t> ids;
  std::vector<int64_t> cls(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) cls[i] = ids.emplace(captions[i], static_cast<int64_t>(ids.size())).first->second;

  auto sim = torch::matmul(image_embeds.to(torch::kFloat32), text_embeds.to(torch::kFloat32).t()).contiguous();  // [N, N]
  auto acc = sim.accessor<float, 2>();
  const int64_t kmax = std::min<int64_t>(N, *std::max_element(ks.begin(), ks.end()));

  // First rank (0-based) at which a query finds a correct item; stable order breaks ties by index.
  auto first_hit = [&](int64_t q, bool image_query) {
    std::vector<int64_t> order(static_cast<size_t>(N));
    std::iota(order.begin(), order.end(), 0);
    auto score = [&](int64_t j) { return image_query ? acc[q][j] : acc[j][q]; };
    std::partial_sort(order.begin(), order.begin() + kmax, order.end(), [&](int64_t a, int64_t b) {
      const float sa = score(a), sb = score(b);
      return sa != sb ? sa > sb : a < b;
    });
    for (int64_t r = 0; r < kmax; ++r)
      if (cls[order[r]] == cls[q]) return r;
    return N;
  };

  std::map<std::string, double> out;
  const double matched = sim.diagonal().mean().item<double>();
  out["cosine/matched"] = matched;
  out["cosine/mismatched"] = N > 1 ? (sim.sum().item<double>() - matched * N) / (N * (N - 1)) : 0.0;
  for (bool image_query : {true, false}) {
    std::vector<int64_t> ranks;
    for (int64_t q = 0; q < N; ++q) ranks.push_back(first_hit(q, image_query));
    for (int64_t k : ks) {
      int64_t hits = 0;
      for (auto r : ranks) hits += r < k;
      out[std::string(image_query ? "i2t" : "t2i") + "/R@" + std::to_string(k)] = static_cast<double>(hits) / N;
    }
  }
  return out;
}

std::map<std::string, double> hard_negative_accuracy(const torch::Tensor& image_embeds, const torch::Tensor& text_embeds,
                                                     const torch::Tensor& negative_embeds,
                                                     const std::vector<int64_t>& owner,
                                                     const std::vector<std::string>& kinds) {
  TORCH_CHECK(negative_embeds.size(0) == static_cast<int64_t>(owner.size()) && owner.size() == kinds.size(),
              "hard_negative_accuracy: ", negative_embeds.size(0), " negatives, ", owner.size(), " owners, ",
              kinds.size(), " kinds");
  std::map<std::string, double> out;
  if (owner.empty()) return out;
  auto idx = torch::tensor(owner, torch::kLong);
  auto img = image_embeds.index_select(0, idx).to(torch::kFloat32);                         // [M, E]
  auto pos = (img * text_embeds.index_select(0, idx).to(torch::kFloat32)).sum(1);          // [M]
  auto neg = (img * negative_embeds.to(torch::kFloat32)).sum(1);                          // [M]
  const auto wins = (pos > neg).to(torch::kLong);
  const auto w = wins.accessor<int64_t, 1>();
  std::map<std::string, std::pair<int64_t, int64_t>> counts;  // kind -> (wins, total)
  for (size_t m = 0; m < owner.size(); ++m) {
    for (const std::string& key : {std::string("all"), kinds[m]}) {
      if (key.empty()) continue;
      counts[key].first += w[static_cast<int64_t>(m)];
      counts[key].second += 1;
    }
  }
  for (const auto& [kind, c] : counts) out["negatives/" + kind] = static_cast<double>(c.first) / c.second;
  return out;
}

}  // namespace trialign

