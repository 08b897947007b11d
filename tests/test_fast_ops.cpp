// The fp32 CPU kernels of models/fast_ops.h against LibTorch's composite ops: values and
// gradients, on contiguous and strided inputs and on the edges (vector tails, extremes).
#include <catch2/catch.hpp>

#include "models/fast_ops.h"

using namespace trialign;

TEST_CASE("quick_gelu: x * sigmoid(1.702 x) and its gradient, within float rounding", "[fast_ops]") {
  torch::manual_seed(1);
  // [25, 40] = 125 blocks of 8; the same as a strided view (every other column); 995 values, so
  // 3 past the last block of 8. The first row holds extremes: sigmoid saturates to 0 and 1
  // (x = +-100, +-1e4, -1e38: x s is -0 there, not -1e38 times the smallest float), 0 and -1e-3.
  auto base = torch::randn({25, 80}) * 4;
  base[0][0] = 100, base[0][1] = -100, base[0][2] = 0, base[0][3] = 1e4, base[0][4] = -1e4, base[0][5] = -1e-3,
  base[0][6] = -1e38, base[0][7] = 52;
  for (const auto& input : {base.slice(1, 0, 40).contiguous(), base.slice(1, 0, 80, 2), base.reshape({-1}).slice(0, 0, 995)}) {
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
