// Representation-level alignment between two embedding spaces of the same N items (image and
// text embeddings of N pairs; projected visual tokens and the LLM's text embeddings).
#pragma once
#include <torch/torch.h>

namespace trialign {

// Mutual k-nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
// Hypothesis"): for each item i, the k nearest other items by cosine similarity in space A and
// in space B; the score is the mean over i of |knn_A(i) ∩ knn_B(i)| / k. 1 = the two spaces
// agree on every neighbourhood; chance is about k / (N - 1). a: [N, Da], b: [N, Db], 1 <= k < N.
// Ties rank by index.
double mutual_knn_alignment(const torch::Tensor& a, const torch::Tensor& b, int64_t k);

// Linear CKA (Kornblith et al. 2019): with X, Y column-centred,
//   CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),
// in [0, 1], invariant to orthogonal transforms and isotropic scaling of either space.
// x: [N, Dx], y: [N, Dy]. Computed in float64.
double linear_cka(const torch::Tensor& x, const torch::Tensor& y);

}  // namespace trialign
