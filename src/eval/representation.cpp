#include "eval/representation.h"

#include <set>
#include <stdexcept>
#include <string>

namespace trialign {

namespace {

// Indices of the k nearest other rows by cosine similarity, ties by index. [N, k]
torch::Tensor knn(const torch::Tensor& x, int64_t k) {
  auto u = torch::nn::functional::normalize(x.to(torch::kFloat64), torch::nn::functional::NormalizeFuncOptions().dim(1));
  auto sim = u.matmul(u.t());
  sim.fill_diagonal_(-std::numeric_limits<double>::infinity());
  // A stable descending sort keeps equal similarities in index order.
  return std::get<1>(sim.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true)).slice(1, 0, k);
}

}  // namespace

double mutual_knn_alignment(const torch::Tensor& a, const torch::Tensor& b, int64_t k) {
  const int64_t n = a.size(0);
  if (b.size(0) != n) throw std::invalid_argument("mutual_knn_alignment: " + std::to_string(n) + " vs " +
                                                  std::to_string(b.size(0)) + " rows");
  if (k < 1 || k >= n) throw std::invalid_argument("mutual_knn_alignment: k must be in [1, N - 1]");
  const auto na = knn(a, k).contiguous(), nb = knn(b, k).contiguous();
  const auto* pa = na.data_ptr<int64_t>();
  const auto* pb = nb.data_ptr<int64_t>();
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    std::set<int64_t> s(pa + i * k, pa + (i + 1) * k);
    int64_t shared = 0;
    for (int64_t j = 0; j < k; ++j) shared += s.count(pb[i * k + j]);
    total += static_cast<double>(shared) / static_cast<double>(k);
  }
  return total / static_cast<double>(n);
}

double linear_cka(const torch::Tensor& x0, const torch::Tensor& y0) {
  if (x0.size(0) != y0.size(0)) throw std::invalid_argument("linear_cka: row counts differ");
  auto x = x0.to(torch::kFloat64), y = y0.to(torch::kFloat64);
  x = x - x.mean(0, true);
  y = y - y.mean(0, true);
  const double cross = y.t().matmul(x).pow(2).sum().item<double>();
  const double nx = x.t().matmul(x).norm().item<double>(), ny = y.t().matmul(y).norm().item<double>();
  return nx > 0 && ny > 0 ? cross / (nx * ny) : 0.0;
}

}  // namespace trialign
