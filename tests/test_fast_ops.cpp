// The CPU kernels of models/fast_ops.h against LibTorch's composite ops: values and gradients,
// in fp32 and bf16, on contiguous and strided inputs and on the edges (vector tails, extremes,
// masked keys, rounding ties).
#include <catch2/catch.hpp>

#include <ATen/autocast_mode.h>

#include <cmath>
#include <limits>

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

namespace {
// |got - want| within `ulps` bf16 steps of want (2^-8 relative each) plus a floor for values
// near 0, element by element.
bool within_bf16(const torch::Tensor& got, const torch::Tensor& want, double ulps, double floor = 1e-30) {
  const auto g = got.to(torch::kFloat32), w = want.to(torch::kFloat32);
  return ((g - w).abs() <= w.abs() * (ulps / 256.0) + floor).all().item<bool>();
}
}  // namespace

TEST_CASE("quick_gelu and swiglu in bf16: computed in fp32 and rounded once, gradients too", "[fast_ops]") {
  torch::manual_seed(4);
  // 995 values: 124 blocks of 8 and a tail of 3, as bf16 autocast's matmuls hand them over.
  const auto x = (torch::randn({995}) * 4).to(torch::kBFloat16), up = (torch::randn({995}) * 2).to(torch::kBFloat16);
  const auto g = torch::randn({995}).to(torch::kBFloat16);
  {
    auto x1 = x.to(torch::kFloat32).requires_grad_(), x2 = x.clone().requires_grad_();
    const auto want = x1 * torch::sigmoid(1.702 * x1);  // fp32 composite of the same bf16 inputs
    const auto got = quick_gelu(x2);
    CHECK(got.scalar_type() == torch::kBFloat16);
    // One rounding of a value within 2e-6 of the fp32 one: at most one bf16 step off.
    CHECK(within_bf16(got, want, 1.0));
    want.backward(g.to(torch::kFloat32));
    got.backward(g);
    CHECK(x2.grad().scalar_type() == torch::kBFloat16);
    CHECK(within_bf16(x2.grad(), x1.grad(), 1.0, 1e-6));
  }
  {
    auto a1 = x.to(torch::kFloat32).requires_grad_(), a2 = x.clone().requires_grad_();
    auto b1 = up.to(torch::kFloat32).requires_grad_(), b2 = up.clone().requires_grad_();
    const auto want = torch::silu(a1) * b1;
    const auto got = swiglu(a2, b2);
    CHECK(within_bf16(got, want, 1.0));
    want.backward(g.to(torch::kFloat32));
    got.backward(g);
    CHECK(within_bf16(a2.grad(), a1.grad(), 1.0, 1e-6));
    CHECK(within_bf16(b2.grad(), b1.grad(), 1.0, 1e-6));
  }
  // Rounding to nearest even, exactly as LibTorch casts: for gate >= 20 sigmoid is 1 in fp32, so
  // y is the exact fp32 product of two bf16 values (at most 16 significant bits), and its bf16 is
  // LibTorch's cast of that product. Values 1 + k/128 make halfway cases among the products.
  const auto gate = (20 + torch::randint(0, 40, {203}) + torch::randint(0, 128, {203}) / 128.0).to(torch::kBFloat16);
  const auto u = (1 + torch::randint(0, 128, {203}) / 128.0).to(torch::kBFloat16) *
                 torch::where(torch::rand({203}) < 0.5, -1, 1).to(torch::kBFloat16);
  const auto exact = (gate.to(torch::kFloat32) * u.to(torch::kFloat32)).to(torch::kBFloat16);
  CHECK(torch::equal(swiglu(gate, u), exact));
  // Hand values (bf16 steps are 0.5 from 64 to 128): 96 * 1.0234375 = 98.25, halfway between
  // 98.0 (even last bit) and 98.5, goes down to 98; 96 * 1.0078125 = 96.75, halfway between 96.5
  // (odd) and 97.0 (even), goes up to 97. In a vector lane and in the tail.
  const auto at96 = torch::full({9}, 96.0, torch::kBFloat16);
  for (int i : {3, 8}) {
    CHECK(swiglu(at96, torch::full({9}, 1.0234375, torch::kBFloat16))[i].item<float>() == 98.0f);
    CHECK(swiglu(at96, torch::full({9}, 1.0078125, torch::kBFloat16))[i].item<float>() == 97.0f);
  }
  // The split over threads falls at multiples of 8: the same values on 1 and 2 threads.
  const auto big = (torch::randn({40003}) * 3).to(torch::kBFloat16);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto one = quick_gelu(big);
  at::set_num_threads(2);
  const auto two = quick_gelu(big);
  at::set_num_threads(threads);
  CHECK(torch::equal(one, two));
}

TEST_CASE("attention_softmax: softmax(scores * scale + mask) and its gradient, fp32 and bf16", "[fast_ops]") {
  torch::manual_seed(5);
  auto composite = [](const torch::Tensor& s, double scale, const torch::Tensor& m) {
    auto z = s * scale;
    if (m.defined()) z = z + m;
    return torch::softmax(z, -1);
  };
  const float neg = -std::numeric_limits<float>::infinity();
  // Rows of 13 keys (a vector block and a tail of 5) and of 32; masks broadcast over heads
  // ([B, 1, Tq, T], the LLM's) or over batch and heads ([Tq, T], the text tower's causal one).
  const auto causal = torch::full({13, 13}, neg).triu(1);
  auto padded = torch::zeros({2, 1, 13, 13});
  padded.slice(3, 10).fill_(neg);  // the last three keys of every row are padding
  padded = padded + causal;
  padded.select(2, 0).fill_(0);  // query 0 sees every key (no fully masked row)
  struct Case {
    torch::Tensor scores, mask;
  };
  const std::vector<Case> cases = {{torch::randn({2, 3, 13, 13}) * 3, causal},
                                   {torch::randn({2, 3, 13, 13}) * 3, padded},
                                   {torch::randn({2, 4, 5, 32}) * 3, torch::Tensor()}};
  for (const auto& c : cases) {
    INFO("scores " << c.scores.sizes() << " mask " << (c.mask.defined() ? c.mask.sizes() : c.scores.sizes().slice(0, 0)));
    const double scale = 0.35;
    auto s1 = c.scores.clone().requires_grad_(), s2 = c.scores.clone().requires_grad_();
    const auto want = composite(s1, scale, c.mask);
    const auto got = attention_softmax(s2, scale, c.mask);
    CHECK(torch::allclose(got, want, 1e-5, 1e-7));
    if (c.mask.defined()) CHECK(torch::equal(got.eq(0), c.mask.expand_as(got).isinf()));  // masked keys weigh exactly 0
    const auto g = torch::randn(c.scores.sizes());
    want.backward(g);
    got.backward(g);
    CHECK(torch::allclose(s2.grad(), s1.grad(), 1e-5, 1e-6));
    // bf16 scores: the fp32 softmax of the same values, rounded once; the gradient within a step.
    auto b = c.scores.to(torch::kBFloat16).requires_grad_();
    auto f = b.detach().to(torch::kFloat32).requires_grad_();
    const auto wantb = composite(f, scale, c.mask);
    const auto gotb = attention_softmax(b, scale, c.mask);
    CHECK(gotb.scalar_type() == torch::kBFloat16);
    CHECK(within_bf16(gotb, wantb, 1.0));
    wantb.backward(g);
    gotb.backward(g.to(torch::kBFloat16));
    CHECK(within_bf16(b.grad(), f.grad(), 2.0, 1e-3));
  }
  // Hand values: scores [0, 2 ln 2, 2 ln 3] at scale 1/2 are logits [0, ln 2, ln 3]: weights
  // [1, 2, 3] / 6; with the last key masked, [1, 2] / 3 and 0. With g = [1, 0, 0] the gradient is
  // scale p (g - p0) = 0.5 [1/3 * 2/3, 2/3 * -1/3, 0] = [1/9, -1/9, 0].
  auto s = torch::tensor({0.0, 2 * std::log(2.0), 2 * std::log(3.0)}, torch::kFloat32).view({1, 3}).requires_grad_();
  const auto p = attention_softmax(s, 0.5, torch::Tensor());
  CHECK(p[0][0].item<double>() == Approx(1.0 / 6).epsilon(1e-6));
  CHECK(p[0][2].item<double>() == Approx(0.5).epsilon(1e-6));
  const auto pm = attention_softmax(s, 0.5, torch::tensor({0.0f, 0.0f, neg}));
  CHECK(pm[0][1].item<double>() == Approx(2.0 / 3).epsilon(1e-6));
  CHECK(pm[0][2].item<double>() == 0.0);
  pm.backward(torch::tensor({{1.0f, 0.0f, 0.0f}}));
  CHECK(s.grad()[0][0].item<double>() == Approx(1.0 / 9).epsilon(1e-5));
  CHECK(s.grad()[0][1].item<double>() == Approx(-1.0 / 9).epsilon(1e-5));
  CHECK(s.grad()[0][2].item<double>() == 0.0);
  // Every key masked: NaN, as LibTorch's softmax gives, not a silent uniform row.
  CHECK(torch::isnan(attention_softmax(torch::zeros({1, 9}), 1.0, torch::full({9}, neg))).all().item<bool>());
}

TEST_CASE("rms_norm under bf16 autocast: the fp32 kernel on the fp32 residual stream, written in bf16", "[fast_ops]") {
  torch::manual_seed(6);
  const auto x = torch::randn({7, 40}), w = torch::rand({40}) + 0.5;
  auto x1 = x.clone().requires_grad_(), x2 = x.clone().requires_grad_();
  auto w1 = w.clone().requires_grad_(), w2 = w.clone().requires_grad_();
  const auto plain = rms_norm(x1, w1, 1e-6);
  at::autocast::set_cpu_enabled(true);
  const auto under = rms_norm(x2, w2, 1e-6);
  at::autocast::set_cpu_enabled(false);
  at::autocast::clear_cache();
  // What the matmuls after it would have cast it to, without the cast.
  CHECK(under.scalar_type() == torch::kBFloat16);
  CHECK(torch::equal(under, plain.to(torch::kBFloat16)));
  CHECK(torch::allclose(plain, x * torch::rsqrt(x.pow(2).mean(-1, true) + 1e-6) * w, 2e-6, 1e-7));
  // Backward reads the bf16 gradient exactly: the same fp32 gradients as from its fp32 value.
  const auto gb = torch::randn({7, 40}).to(torch::kBFloat16);
  plain.backward(gb.to(torch::kFloat32));
  under.backward(gb);
  CHECK(x2.grad().scalar_type() == torch::kFloat32);
  CHECK(torch::equal(x2.grad(), x1.grad()));
  CHECK(torch::equal(w2.grad(), w1.grad()));
}

TEST_CASE("rope: x c + rotate_half(x) s on the heads' transposed view, fp32 and bf16, and its gradient", "[fast_ops]") {
  torch::manual_seed(7);
  // [B, T, H, Dh] projections viewed as [B, H, T, Dh] (not contiguous), Dh 20: halves of 10, a
  // vector block and a tail of 2; cos / sin [B, T, Dh] from arbitrary angles.
  const int64_t B = 2, T = 5, H = 3, D = 20;
  const auto proj = torch::randn({B, T, H, D}) * 2;
  const auto angles = torch::rand({B, T, D / 2}) * 6;
  const auto emb = torch::cat({angles, angles}, -1);
  const auto cos = emb.cos(), sin = emb.sin();
  auto composite = [&](const torch::Tensor& x) {
    auto rotated = torch::cat({-x.slice(-1, D / 2), x.slice(-1, 0, D / 2)}, -1);
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1);
  };
  const auto g = torch::randn({B, H, T, D});
  {
    auto p1 = proj.clone().requires_grad_(), p2 = proj.clone().requires_grad_();
    const auto x2 = p2.transpose(1, 2);
    REQUIRE(rope_fits(x2, cos, sin));
    const auto want = composite(p1.transpose(1, 2));
    const auto got = rope(x2, cos, sin);
    CHECK(got.is_contiguous());
    CHECK(torch::allclose(got, want, 1e-6, 1e-6));
    want.backward(g);
    got.backward(g);
    CHECK(torch::allclose(p2.grad(), p1.grad(), 1e-6, 1e-6));
  }
  {
    auto pb = proj.to(torch::kBFloat16).requires_grad_();
    auto pf = pb.detach().to(torch::kFloat32).requires_grad_();
    const auto want = composite(pf.transpose(1, 2));  // fp32 of the same bf16 inputs
    const auto got = rope(pb.transpose(1, 2), cos, sin);
    CHECK(got.scalar_type() == torch::kBFloat16);
    CHECK(within_bf16(got, want, 1.0, 1e-5));
    const auto gb = g.to(torch::kBFloat16);  // the gradient as bf16 autocast hands it back
    want.backward(gb.to(torch::kFloat32));
    got.backward(gb);
    CHECK(within_bf16(pb.grad(), pf.grad(), 1.0, 1e-5));
  }
  // Hand values: Dh 2, angle pi/2 (cos 0, sin 1) turns [x1, x2] into [-x2, x1]; the gradient of
  // y1 is then [0, -1] and that of y2 [1, 0].
  auto x = torch::tensor({3.0f, 5.0f}).view({1, 1, 1, 2}).requires_grad_();
  const auto c = torch::zeros({1, 1, 2}), s = torch::ones({1, 1, 2});
  const auto y = rope(x, c, s);
  CHECK(y.flatten()[0].item<float>() == -5.0f);
  CHECK(y.flatten()[1].item<float>() == 3.0f);
  y.backward(torch::tensor({1.0f, 0.0f}).view({1, 1, 1, 2}));
  CHECK(x.grad().flatten()[0].item<float>() == 0.0f);
  CHECK(x.grad().flatten()[1].item<float>() == -1.0f);
  // Tables that do not fit (no batch dimension) are left to the composite ops.
  CHECK_FALSE(rope_fits(proj.transpose(1, 2), cos[0], sin[0]));
}
