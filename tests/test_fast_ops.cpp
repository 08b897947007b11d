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

TEST_CASE("swiglu: silu(gate) * up and both gradients, within float rounding", "[fast_ops]") {
  torch::manual_seed(2);
  // The same layouts as above; the first row of gate holds extremes (silu saturates to 0 and to
  // the identity), and up a zero and a large value.
  auto gate = torch::randn({25, 80}) * 4, up = torch::randn({25, 80}) * 2;
  gate[0][0] = 100, gate[0][1] = -100, gate[0][2] = 0, gate[0][3] = 1e4, gate[0][4] = -1e4, gate[0][5] = -1e-3,
  gate[0][6] = -1e38, gate[0][7] = 52;
  up[0][2] = 0, up[0][5] = 1e3;
  auto views = [](const torch::Tensor& t) {
    return std::vector<torch::Tensor>{t.slice(1, 0, 40).contiguous(), t.slice(1, 0, 80, 2), t.reshape({-1}).slice(0, 0, 995)};
  };
  const auto gates = views(gate), ups = views(up);
  for (size_t v = 0; v < gates.size(); ++v) {
    INFO("shape " << gates[v].sizes() << (gates[v].is_contiguous() ? " contiguous" : " strided"));
    auto a1 = gates[v].clone().requires_grad_(), a2 = gates[v].clone().requires_grad_();
    auto b1 = ups[v].clone().requires_grad_(), b2 = ups[v].clone().requires_grad_();
    const auto g = torch::randn(gates[v].sizes());
    const auto want = torch::silu(a1) * b1;
    const auto got = swiglu(a2, b2);
    CHECK(torch::allclose(got, want, 2e-6, 1e-7));
    want.backward(g);
    got.backward(g);
    CHECK(torch::allclose(a2.grad(), a1.grad(), 4e-6, 1e-7));
    CHECK(torch::allclose(b2.grad(), b1.grad(), 4e-6, 1e-7));
    CHECK(torch::isfinite(a2.grad()).all().item<bool>());
  }
  // Hand values at gate 1, up 2: s = 1 / (1 + e^-1) = 0.731059, y = 2 s = 1.462117; dy/dgate =
  // 2 s (1 + (1 - s)) = 2 * 0.731059 * 1.268941 = 1.855341; dy/dup = s = 0.731059.
  auto a = torch::ones({9}, torch::requires_grad()), b = torch::full({9}, 2.0f, torch::requires_grad());
  const auto y = swiglu(a, b);
  CHECK(y[8].item<double>() == Approx(1.462117).epsilon(1e-5));
  y.sum().backward();
  for (int i : {0, 8}) {  // a vector lane and the tail
    CHECK(a.grad()[i].item<double>() == Approx(1.855341).epsilon(1e-5));
    CHECK(b.grad()[i].item<double>() == Approx(0.731059).epsilon(1e-5));
  }
  // Only the gate needs a gradient (the up projection frozen): the same gate gradient.
  auto a3 = torch::ones({9}, torch::requires_grad());
  swiglu(a3, torch::full({9}, 2.0f)).sum().backward();
  CHECK(torch::allclose(a3.grad(), a.grad()));
}

TEST_CASE("rms_norm: x / rms(x) * weight and both gradients, within float rounding", "[fast_ops]") {
  torch::manual_seed(3);
  auto composite = [](const torch::Tensor& x, const torch::Tensor& w, double eps) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
  };
  // Rows of 40 (5 vector blocks), a strided view of them, and rows of 13 (a tail of 5) in 3 dims;
  // 100 rows span four blocks of the weight gradient.
  auto base = torch::randn({100, 80}) * 3;
  base[0].fill_(1e-3);  // mean square 1e-6 = eps: eps halves r**2 there
  for (const auto& input : {base.slice(1, 0, 40).contiguous(), base.slice(1, 0, 80, 2), torch::randn({3, 7, 13})}) {
    INFO("shape " << input.sizes() << (input.is_contiguous() ? " contiguous" : " strided"));
    const int64_t d = input.size(-1);
    const auto w0 = torch::rand({d}) + 0.5;
    auto x1 = input.clone().requires_grad_(), x2 = input.clone().requires_grad_();
    auto w1 = w0.clone().requires_grad_(), w2 = w0.clone().requires_grad_();
    const auto g = torch::randn(input.sizes());
    const auto want = composite(x1, w1, 1e-6);
    const auto got = rms_norm(x2, w2, 1e-6);
    CHECK(torch::allclose(got, want, 2e-6, 1e-7));
    want.backward(g);
    got.backward(g);
    CHECK(torch::allclose(x2.grad(), x1.grad(), 1e-5, 1e-6));
    CHECK(torch::allclose(w2.grad(), w1.grad(), 1e-5, 1e-5));
  }
  // Hand values, eps 0: x = [1, 2, 3, 4], w = [1, 1, 2, 1]: r = 1 / sqrt(30 / 4) = 0.365148,
  // y = x r w = [0.365148, 0.730297, 2.190890, 1.460593]. With g = 1: a = g w, sum(a x) = 13,
  // c = r^3 13 / 4 = 0.158231, dx = r a - x c = [0.206917, 0.048686, 0.255604, -0.267775],
  // dw = g x r = [0.365148, 0.730297, 1.095445, 1.460593].
  auto x = torch::tensor({1.f, 2.f, 3.f, 4.f}).repeat({2, 3}).requires_grad_();  // rows of 12: a block of 8 + a tail
  auto w = torch::tensor({1.f, 1.f, 2.f, 1.f}).repeat({3}).requires_grad_();
  const auto y = rms_norm(x, w, 0.0);
  y.sum().backward();
  const std::vector<double> want_y = {0.365148, 0.730297, 2.190890, 1.460593}, want_dx = {0.206917, 0.048686, 0.255604, -0.267775};
  for (int i : {0, 1, 2, 3, 8, 9, 10, 11}) {  // vector lanes and the tail
    CHECK(y[1][i].item<double>() == Approx(want_y[i % 4]).epsilon(1e-5));
    CHECK(x.grad()[1][i].item<double>() == Approx(want_dx[i % 4]).epsilon(1e-4));
    // The weight gradient sums the two rows; each 4-column group repeats x, so r is the same.
    CHECK(w.grad()[i].item<double>() == Approx(2 * want_y[i % 4] / (i % 4 == 2 ? 2 : 1)).epsilon(1e-5));
  }
  // The weight gradient does not depend on the thread count: blocks of rows are summed in order.
  const int threads = at::get_num_threads();
  auto dw_with = [&](int n) {
    at::set_num_threads(n);
    auto xx = base.clone(), ww = torch::ones({80}, torch::requires_grad());
    rms_norm(xx, ww, 1e-6).pow(2).sum().backward();
    return ww.grad().clone();
  };
  const auto one = dw_with(1), two = dw_with(2);
  at::set_num_threads(threads);
  CHECK(torch::equal(one, two));
  // No second derivatives through the kernel: refused, not silently zero.
  auto xs = torch::randn({2, 8}, torch::requires_grad());
  const auto out = rms_norm(xs, torch::ones({8}), 1e-6).pow(2).sum();
  CHECK_THROWS_WITH(torch::autograd::grad({out}, {xs}, {}, /*retain_graph=*/true, /*create_graph=*/true),
                    Catch::Contains("second derivatives are not supported"));
  CHECK(torch::autograd::grad({out}, {xs})[0].defined());  // a plain backward is fine
}
