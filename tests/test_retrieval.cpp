// Retrieval recall on constructed embeddings with known rankings, ties and duplicate captions.
#include <catch2/catch.hpp>

#include "eval/representation.h"
#include "eval/retrieval.h"

using namespace trialign;

TEST_CASE("retrieval recall on a constructed case", "[eval]") {
  // Three images and texts on axes; image 2 is closest to text 0, so it misses at R@1 and hits at R@2.
  auto img = torch::tensor({{1.f, 0.f, 0.f}, {0.f, 1.f, 0.f}, {0.9f, 0.f, 0.436f}});
  auto txt = torch::tensor({{1.f, 0.f, 0.f}, {0.f, 1.f, 0.f}, {0.f, 0.f, 1.f}});
  auto r = retrieval_recall(img, txt, {"a", "b", "c"}, {1, 2});
  // i2t: image0 -> text0 (hit@1), image1 -> text1 (hit@1), image2 -> text0 (0.9) then text2 (0.436): hit@2.
  CHECK(r.at("i2t/R@1") == Approx(2.0 / 3));
  CHECK(r.at("i2t/R@2") == Approx(1.0));
  // t2i: text0 -> image0 (1.0) beats image2 (0.9): hit@1; text1 -> image1; text2 -> image2 (0.436) first.
  CHECK(r.at("t2i/R@1") == Approx(1.0));
}

TEST_CASE("retrieval counts a caption with the same text as a hit and breaks ties by index", "[eval]") {
  // Images 0 and 1 have the same caption text "x". Image 1 retrieves text 0 first, which reads "x": a hit.
  auto img = torch::tensor({{1.f, 0.f}, {1.f, 0.f}, {0.f, 1.f}});
  auto txt = torch::tensor({{1.f, 0.f}, {0.f, 1.f}, {0.f, 1.f}});
  auto r = retrieval_recall(img, txt, {"x", "x", "y"}, {1});
  // i2t: image0 -> text0 "x" hit; image1 -> text0 "x" hit; image2 ties text1 ("x") and text2 ("y") at 1.0:
  // the lower index (text1, "x") ranks first, so a miss at R@1.
  CHECK(r.at("i2t/R@1") == Approx(2.0 / 3));
  // t2i: text0 ties image0/image1 (both "x") -> hit; text1 ("x") ranks image2 ("y") first -> miss;
  // text2 ("y") -> image2 hit.
  CHECK(r.at("t2i/R@1") == Approx(2.0 / 3));
  // Similarities [[1,0,0],[1,0,0],[0,1,1]]: diagonal mean 2/3; the other six sum to 4 - 2 = 2.
  CHECK(r.at("cosine/matched") == Approx(2.0 / 3));
  CHECK(r.at("cosine/mismatched") == Approx(1.0 / 3));
}

TEST_CASE("mutual kNN alignment and linear CKA against hand-worked values", "[retrieval][alignment]") {
  // Space A: {0, 1} near each other, {2, 3} near each other.
  const auto a = torch::tensor({{1.0, 0.0}, {0.9, 0.1}, {0.0, 1.0}, {0.1, 0.9}});
  CHECK(mutual_knn_alignment(a, a, 1) == 1.0);
  // Space B agrees for items 0, 1 and 2, but item 3's nearest neighbour moves from 2 to 1:
  // cos(b3, b1) = 0.59 / (0.721 * 0.951) = 0.86 > cos(b3, b0) = 0.832 > cos(b3, b2) = 0.555.
  const auto b = torch::tensor({{1.0, 0.0}, {0.95, 0.05}, {0.0, 1.0}, {0.6, 0.4}});
  CHECK(mutual_knn_alignment(a, b, 1) == Approx(0.75));
  // k = 2, neighbour sets in A and B: item 0 {1, 3} and {1, 3}; item 1 {0, 3} and {0, 3}; item 2
  // {3, 1} and {3, 1}; item 3 {2, 1} and {1, 0}, sharing one of two.
  CHECK(mutual_knn_alignment(a, b, 2) == Approx(3.5 / 4));
  CHECK_THROWS(mutual_knn_alignment(a, b, 4));

  // CKA of x = (1, 2, 3) and y = (1, 3, 2): centred (-1, 0, 1) and (-1, 1, 0); (y.x)^2 = 1,
  // |x.x| = |y.y| = 2, so 1 / 4: the squared correlation of two 1-d variables (r = 0.5).
  CHECK(linear_cka(torch::tensor({{1.0}, {2.0}, {3.0}}), torch::tensor({{1.0}, {3.0}, {2.0}})) == Approx(0.25));
  torch::manual_seed(3);
  const auto x = torch::randn({20, 5}, torch::kFloat64);
  const auto q = std::get<0>(torch::linalg::qr(torch::randn({5, 5}, torch::kFloat64)));
  CHECK(linear_cka(x, x) == Approx(1.0));
  CHECK(linear_cka(x, 3.0 * x.matmul(q)) == Approx(1.0));  // orthogonal transform, isotropic scale
  CHECK(linear_cka(x, torch::randn({20, 3}, torch::kFloat64)) < 0.6);
}
