// The fp32 CPU kernels of models/fast_ops.h against LibTorch's composite ops: values and both
// gradients, on the layouts the attention code hands them and on the edges (tails, extremes).
#include <catch2/catch.hpp>

#include "models/fast_ops.h"

using namespace trialign;

namespace {

// max |got - want| relative to max |want| (float rounding of sums scales with the largest terms)
double rel_diff(const torch::Tensor& got, const torch::Tensor& want) {
  REQUIRE(got.sizes() == want.sizes());
  return (got - want).abs().max().item<double>() / want.abs().max().item<double>();
}

}  // namespace

TEST_CASE("quick_gelu: x * sigmoid(1.702 x) and its gradient, within float rounding", "[fast_ops]") {
  torch::manual_seed(1);
  // 1000 = 125 blocks of 8, then a non-contiguous view (every other column) and extremes:
  // sigmoid saturates to 0 and 1 (x = +-100, +-1e4), and 0 itself.
  auto base = torch::randn({25, 80}) * 4;
  base[0][0] = 100, base[0][1] = -100, base[0][2] = 0, base[0][3] = 1e4, base[0][4] = -1e4, base[0][5] = -1e-3;
  for (const auto& input : {base.slice(1, 0, 40).contiguous(), base.slice(1, 0, 80, 2), base.reshape({-1}).slice(0, 0, 1003 - 8)}) {
    INFO("shape " << input.sizes() << (input.is_contiguous() ? " contiguous" : " strided"));
    auto x1 = input.clone().requires_grad_(), x2 = input.clone().requires_grad_();
    const auto g = torch::randn(input.sizes());
    const auto want = x1 * torch::sigmoid(1.702 * x1);
    const auto got = quick_gelu(x2);
    // element by element: a few float roundings of each value (exp within 2 ulp)
    CHECK(torch::allclose(got, want, 2e-6, 1e-7));
    want.backward(g);
    got.backward(g);
    CHECK(torch::allclose(x2.grad(), x1.grad(), 4e-6, 1e-7));
    CHECK(torch::isfinite(x2.grad()).all().item<bool>());
  }
  // Hand values: quick_gelu(1) = s = 1 / (1 + e^-1.702) = 1 / 1.182318 = 0.845796; its slope
  // there is s + 1.702 s (1 - s) = 0.845796 + 1.702 * 0.845796 * 0.154204 = 1.067780.
  auto one = torch::ones({9}, torch::requires_grad());
  const auto y = quick_gelu(one);
  CHECK(y[8].item<double>() == Approx(0.845796).epsilon(1e-5));
  y.sum().backward();
  CHECK(one.grad()[8].item<double>() == Approx(1.067780).epsilon(1e-5));
  CHECK(one.grad()[0].item<double>() == Approx(1.067780).epsilon(1e-5));  // the vector lanes and the tail agree
}

TEST_CASE("attention_matmul equals torch::matmul on q/k/v views, with both gradients", "[fast_ops]") {
  torch::manual_seed(2);
  const int64_t B = 3, T = 7, H = 2, Dh = 5;
  // q, k, v as the attention code makes them: [B, T, H * Dh] -> [B, H, T, Dh] views, not copies.
  const auto proj = torch::randn({3, B, T, H * Dh});
  auto heads = [&](const torch::Tensor& t) { return t.view({B, T, H, Dh}).transpose(1, 2); };
  for (const int64_t rows : {T, int64_t{1}}) {  // whole attention, and one query row per sample
    INFO("query rows " << rows);
    auto q1 = proj[0].slice(1, 0, rows).clone().requires_grad_(), q2 = q1.detach().clone().requires_grad_();
    auto k1 = proj[1].clone().requires_grad_(), k2 = k1.detach().clone().requires_grad_();
    auto v1 = proj[2].clone().requires_grad_(), v2 = v1.detach().clone().requires_grad_();
    const auto rows_of = [&](const torch::Tensor& t) { return t.view({B, rows, H, Dh}).transpose(1, 2); };
    const auto s1 = torch::matmul(rows_of(q1), heads(k1).transpose(-2, -1));  // [B, H, rows, T]
    const auto s2 = attention_matmul(rows_of(q2), heads(k2).transpose(-2, -1));
    CHECK(rel_diff(s2, s1) < 1e-6);
    const auto o1 = torch::matmul(torch::softmax(s1, -1), heads(v1));  // [B, H, rows, Dh]
    const auto o2 = attention_matmul(torch::softmax(s2, -1), heads(v2));
    CHECK(rel_diff(o2, o1) < 1e-6);
    const auto g = torch::randn(o1.sizes());
    o1.backward(g);
    o2.backward(g);
    CHECK(rel_diff(q2.grad(), q1.grad()) < 1e-6);
    CHECK(rel_diff(k2.grad(), k1.grad()) < 1e-6);
    CHECK(rel_diff(v2.grad(), v1.grad()) < 1e-6);
  }
  // A hand-worked product: [[1, 2], [3, 4]] x [[5], [6]] = [[17], [39]], through a transposed view.
  const auto a = torch::tensor({1.0f, 3.0f, 2.0f, 4.0f}).view({1, 1, 2, 2}).transpose(-2, -1);
  CHECK(torch::equal(attention_matmul(a, torch::tensor({5.0f, 6.0f}).view({1, 1, 2, 1})),
                     torch::tensor({17.0f, 39.0f}).view({1, 1, 2, 1})));
  // Anything else goes to torch::matmul: bf16, and other ranks.
  const auto x = torch::randn({2, 3, 4, 5}).to(torch::kBFloat16), y = torch::randn({2, 3, 5, 4}).to(torch::kBFloat16);
  CHECK(torch::equal(attention_matmul(x, y), torch::matmul(x, y)));
  const auto x3 = torch::randn({3, 4, 5}), y3 = torch::randn({3, 5, 2});
  CHECK(torch::equal(attention_matmul(x3, y3), torch::matmul(x3, y3)));
}
