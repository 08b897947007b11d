#include "models/fast_ops.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace trialign {

namespace {

constexpr float kQuickGeluScale = 1.702f;

// TRIALIGN_FAST_OPS=0 turns the kernels off (LibTorch's composite ops everywhere), to compare.
bool enabled() {
  static const bool on = [] {
    const char* e = std::getenv("TRIALIGN_FAST_OPS");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// fp32 on the CPU outside autocast: under bf16 autocast the composite ops run as before.
bool fast_path(const torch::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && !at::autocast::is_cpu_enabled();
}

// --- quick-GELU ------------------------------------------------------------------------------
// y = x s with s = sigmoid(1.702 x); dy/dx = s + 1.702 x s (1 - s).

void quick_gelu_plain(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] / (1.0f + std::exp(-kQuickGeluScale * x[i]));
}

void quick_gelu_grad_plain(const float* x, const float* g, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-kQuickGeluScale * x[i]));
    dx[i] = g[i] * (s + kQuickGeluScale * x[i] * s * (1.0f - s));
  }
}

void swiglu_plain(const float* a, const float* b, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
}

void swiglu_grad_plain(const float* a, const float* b, const float* g, float* da, float* db, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float s = 1.0f / (1.0f + std::exp(-a[i]));
    da[i] = g[i] * b[i] * (s + a[i] * s * (1.0f - s));
    db[i] = g[i] * a[i] * s;
  }
}

#if defined(__x86_64__)
// exp(t) for 8 floats: t = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n
// through the exponent bits (Cephes' expf coefficients; within 2 ulp of exp on the clamped
// range, which keeps 2^n a normal float; beyond it sigmoid is 0 or 1 to float precision anyway).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 t) {
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), t);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// sigmoid(a x), a = kQuickGeluScale by default. Where -a x passes exp8's clamp the true value is
// below the smallest normal float: 0 exactly, so x s is -0 (and NaN for x = -inf) as in LibTorch's ops.
__attribute__((target("avx2,fma"))) inline __m256 sigmoid_scaled8(__m256 x, float a = kQuickGeluScale) {
  const __m256 one = _mm256_set1_ps(1.0f), t = _mm256_mul_ps(x, _mm256_set1_ps(-a));
  const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(t)));
  return _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_set1_ps(87.0f), _CMP_GT_OQ), s);
}

__attribute__((target("avx2,fma"))) void quick_gelu_avx2(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(v, sigmoid_scaled8(v)));
  }
  quick_gelu_plain(x + i, y + i, n - i);
}

__attribute__((target("avx2,fma"))) void quick_gelu_grad_avx2(const float* x, const float* g, float* dx, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), scale = _mm256_set1_ps(kQuickGeluScale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i), s = sigmoid_scaled8(v);
    // s + 1.702 x s (1 - s)
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(scale, v), s), _mm256_sub_ps(one, s), s);
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(g + i), d));
  }
  quick_gelu_grad_plain(x + i, g + i, dx + i, n - i);
}

// SwiGLU: y = silu(a) b = a s b with s = sigmoid(a); dy/da = b s (1 + a (1 - s)), dy/db = a s.
__attribute__((target("avx2,fma"))) void swiglu_avx2(const float* a, const float* b, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(a + i);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(v, sigmoid_scaled8(v, 1.0f)), _mm256_loadu_ps(b + i)));
  }
  swiglu_plain(a + i, b + i, y + i, n - i);
}

__attribute__((target("avx2,fma"))) void swiglu_grad_avx2(const float* a, const float* b, const float* g, float* da,
                                                           float* db, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(a + i), s = sigmoid_scaled8(v, 1.0f), gi = _mm256_loadu_ps(g + i);
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(v, s), _mm256_sub_ps(one, s), s);  // s (1 + a (1 - s))
    _mm256_storeu_ps(da + i, _mm256_mul_ps(_mm256_mul_ps(gi, _mm256_loadu_ps(b + i)), d));
    _mm256_storeu_ps(db + i, _mm256_mul_ps(gi, _mm256_mul_ps(v, s)));
  }
  swiglu_grad_plain(a + i, b + i, g + i, da + i, db + i, n - i);
}

bool use_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

constexpr int64_t kGrain = 1 << 14;

// The backwards below are not themselves differentiable; nothing in trialign takes second
// derivatives. A create_graph backward through them is refused rather than silently wrong.
void check_no_double_backward(const char* op) {
  TORCH_CHECK(!torch::GradMode::is_enabled(), op,
              ": second derivatives are not supported; set TRIALIGN_FAST_OPS=0 to use LibTorch's ops");
}

class QuickGeluFn : public torch::autograd::Function<QuickGeluFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& input) {
    const auto x = input.contiguous();
    auto y = torch::empty_like(x);
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
      if (use_avx2()) return quick_gelu_avx2(xp + b, yp + b, e - b);
#endif
      quick_gelu_plain(xp + b, yp + b, e - b);
    });
    ctx->save_for_backward({x});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_no_double_backward("quick_gelu");
    const auto x = ctx->get_saved_variables()[0];
    const auto g = grads[0].contiguous();
    auto dx = torch::empty_like(x);
    const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>();
    float* dp = dx.data_ptr<float>();
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
      if (use_avx2()) return quick_gelu_grad_avx2(xp + b, gp + b, dp + b, e - b);
#endif
      quick_gelu_grad_plain(xp + b, gp + b, dp + b, e - b);
    });
    return {dx};
  }
};

// --- RMSNorm --------------------------------------------------------------------------------
// y = x r w with r = (mean(x^2) + eps)^-1/2 per row; with a = g w:
// dx = r a - x r^3 mean(a x), dw = sum over rows of g x r.

float dot_plain(const float* a, const float* b, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void rms_row_plain(const float* x, const float* w, float* y, float r, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] = x[i] * r * w[i];
}

void rms_row_grad_plain(const float* x, const float* w, const float* g, float r, float c, float* dx, float* dw,
                        int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    dx[i] = r * g[i] * w[i] - x[i] * c;
    dw[i] += g[i] * x[i] * r;
  }
}

float gwx_plain(const float* g, const float* w, const float* x, int64_t d) {
  float s = 0;
  for (int64_t i = 0; i < d; ++i) s += g[i] * w[i] * x[i];
  return s;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float hsum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float s = 0;
  for (float l : lanes) s += l;
  return s;
}

__attribute__((target("avx2,fma"))) float rms_row_avx2(const float* x, const float* w, float* y, int64_t d, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / std::sqrt((hsum8(acc) + dot_plain(x + i, x + i, d - i)) / static_cast<float>(d) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= d; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
  rms_row_plain(x + i, w + i, y + i, r, d - i);
  return r;
}

__attribute__((target("avx2,fma"))) void rms_row_grad_avx2(const float* x, const float* w, const float* g, float r,
                                                            float* dx, float* dw, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(w + i)), _mm256_loadu_ps(x + i), acc);
  const float c = r * r * r * (hsum8(acc) + gwx_plain(g + i, w + i, x + i, d - i)) / static_cast<float>(d);
  const __m256 rv = _mm256_set1_ps(r), cv = _mm256_set1_ps(c);
  for (i = 0; i + 8 <= d; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i), xv = _mm256_loadu_ps(x + i);
    const __m256 a = _mm256_mul_ps(_mm256_mul_ps(rv, gv), _mm256_loadu_ps(w + i));
    _mm256_storeu_ps(dx + i, _mm256_fnmadd_ps(xv, cv, a));
    _mm256_storeu_ps(dw + i, _mm256_fmadd_ps(_mm256_mul_ps(gv, xv), rv, _mm256_loadu_ps(dw + i)));
  }
  rms_row_grad_plain(x + i, w + i, g + i, r, c, dx + i, dw + i, d - i);
}
#endif

// One row forward: y = x r w, returns r.
float rms_row(const float* x, const float* w, float* y, int64_t d, float eps) {
#if defined(__x86_64__)
  if (use_avx2()) return rms_row_avx2(x, w, y, d, eps);
#endif
  const float r = 1.0f / std::sqrt(dot_plain(x, x, d) / static_cast<float>(d) + eps);
  rms_row_plain(x, w, y, r, d);
  return r;
}

// One row backward: dx as above, and g x r added into dw.
void rms_row_grad(const float* x, const float* w, const float* g, float r, float* dx, float* dw, int64_t d) {
#if defined(__x86_64__)
  if (use_avx2()) return rms_row_grad_avx2(x, w, g, r, dx, dw, d);
#endif
  const float c = r * r * r * gwx_plain(g, w, x, d) / static_cast<float>(d);
  rms_row_grad_plain(x, w, g, r, c, dx, dw, d);
}

class SwiGluFn : public torch::autograd::Function<SwiGluFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate, const torch::Tensor& up) {
    const auto a = gate.contiguous(), b = up.contiguous();
    auto y = torch::empty_like(a);
    const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t s, int64_t e) {
#if defined(__x86_64__)
      if (use_avx2()) return swiglu_avx2(ap + s, bp + s, yp + s, e - s);
#endif
      swiglu_plain(ap + s, bp + s, yp + s, e - s);
    });
    ctx->save_for_backward({a, b});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_no_double_backward("swiglu");
    const auto saved = ctx->get_saved_variables();
    const auto &a = saved[0], &b = saved[1];
    const auto g = grads[0].contiguous();
    auto da = torch::empty_like(a), db = torch::empty_like(b);
    const float *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>(), *gp = g.data_ptr<float>();
    float *dap = da.data_ptr<float>(), *dbp = db.data_ptr<float>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t s, int64_t e) {
#if defined(__x86_64__)
      if (use_avx2()) return swiglu_grad_avx2(ap + s, bp + s, gp + s, dap + s, dbp + s, e - s);
#endif
      swiglu_grad_plain(ap + s, bp + s, gp + s, dap + s, dbp + s, e - s);
    });
    return {da, db};
  }
};

constexpr int64_t kRmsBlock = 32;  // rows per partial weight gradient

class RmsNormFn : public torch::autograd::Function<RmsNormFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& input,
                               const torch::Tensor& weight, double eps) {
    const auto x = input.contiguous(), w = weight.contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / d;
    auto y = torch::empty_like(x);
    auto r = torch::empty({rows}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float *yp = y.data_ptr<float>(), *rp = r.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / d), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) rp[i] = rms_row(xp + i * d, wp, yp + i * d, d, static_cast<float>(eps));
    });
    ctx->save_for_backward({x, w, r});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_no_double_backward("rms_norm");
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &r = saved[2];
    const auto g = grads[0].contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / d, blocks = (rows + kRmsBlock - 1) / kRmsBlock;
    auto dx = torch::empty_like(x);
    auto partial = torch::zeros({blocks, d}, x.options());  // one weight gradient per block of rows
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = r.data_ptr<float>(),
                *gp = g.data_ptr<float>();
    float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k)
        for (int64_t i = k * kRmsBlock; i < std::min(rows, (k + 1) * kRmsBlock); ++i)
          rms_row_grad(xp + i * d, wp, gp + i * d, rp[i], dxp + i * d, pp + k * d, d);
    });
    auto dw = torch::zeros({d}, x.options());
    float* dwp = dw.data_ptr<float>();
    for (int64_t k = 0; k < blocks; ++k)  // in block order: the same sum for any thread count
      for (int64_t j = 0; j < d; ++j) dwp[j] += pp[k * d + j];
    return {dx, dw, torch::Tensor()};
  }
};

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (!enabled() || !fast_path(x) || !fast_path(weight) || x.dim() == 0 || x.numel() == 0 || weight.dim() != 1 ||
      weight.size(0) != x.size(-1)) {
    const auto xf = x.scalar_type() == torch::kDouble ? x : x.to(torch::kFloat32);
    return (xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight).to(x.scalar_type());
  }
  return RmsNormFn::apply(x, weight, eps);
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (!enabled() || !fast_path(gate) || !fast_path(up) || gate.sizes() != up.sizes() || gate.numel() == 0)
    return torch::silu(gate) * up;
  return SwiGluFn::apply(gate, up);
}

torch::Tensor quick_gelu(const torch::Tensor& x) {
  if (!enabled() || !fast_path(x) || x.numel() == 0) return x * torch::sigmoid(1.702 * x);
  return QuickGeluFn::apply(x);
}

}  // namespace trialign
