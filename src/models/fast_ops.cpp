#include "models/fast_ops.h"

#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
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

using bf16 = c10::BFloat16;

// fp32 CPU tensors, and for the element-wise kernels bf16 ones (what bf16 autocast's matmuls
// return): they read bf16, compute in fp32 and round once, to nearest even as LibTorch does.
bool fast_path(const torch::Tensor& t, bool bf16_too = true) {
  return t.device().is_cpu() &&
         (t.scalar_type() == torch::kFloat32 || (bf16_too && t.scalar_type() == torch::kBFloat16));
}

// Runs f(T{}) with T = float or c10::BFloat16 for the tensor's dtype.
template <typename F>
void for_dtype(const torch::Tensor& t, F&& f) {
  if (t.scalar_type() == torch::kBFloat16) f(bf16{});
  else f(float{});
}

inline float to_f(float v) { return v; }
inline float to_f(bf16 v) { return static_cast<float>(v); }

// --- quick-GELU ------------------------------------------------------------------------------
// y = x s with s = sigmoid(1.702 x); dy/dx = s + 1.702 x s (1 - s).

template <typename T>
void quick_gelu_plain(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f(x[i]);
    y[i] = static_cast<T>(v / (1.0f + std::exp(-kQuickGeluScale * v)));
  }
}

template <typename T>
void quick_gelu_grad_plain(const T* x, const T* g, T* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f(x[i]), s = 1.0f / (1.0f + std::exp(-kQuickGeluScale * v));
    dx[i] = static_cast<T>(to_f(g[i]) * (s + kQuickGeluScale * v * s * (1.0f - s)));
  }
}

template <typename T>
void swiglu_plain(const T* a, const T* b, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f(a[i]);
    y[i] = static_cast<T>(v / (1.0f + std::exp(-v)) * to_f(b[i]));
  }
}

template <typename T>
void swiglu_grad_plain(const T* a, const T* b, const T* g, T* da, T* db, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f(a[i]), w = to_f(b[i]), gi = to_f(g[i]), s = 1.0f / (1.0f + std::exp(-v));
    da[i] = static_cast<T>(gi * w * (s + v * s * (1.0f - s)));
    db[i] = static_cast<T>(gi * v * s);
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

// exp(t) that is exactly 0 below the clamp (an additive -inf mask must give a zero weight).
__attribute__((target("avx2,fma"))) inline __m256 exp8_or_zero(__m256 t) {
  return _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_set1_ps(-87.0f), _CMP_LT_OQ), exp8(t));
}

// 8 values in and out: fp32 as is; bf16 widened exactly, and narrowed by rounding to nearest even
// with NaN kept a quiet NaN (c10::BFloat16's rule, so a kernel's bf16 equals LibTorch's cast).
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
__attribute__((target("avx2,fma"))) inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
__attribute__((target("avx2,fma"))) inline void store8(bf16* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// sigmoid(a x), a = kQuickGeluScale by default. Where -a x passes exp8's clamp the true value is
// below the smallest normal float: 0 exactly, so x s is -0 (and NaN for x = -inf) as in LibTorch's ops.
__attribute__((target("avx2,fma"))) inline __m256 sigmoid_scaled8(__m256 x, float a = kQuickGeluScale) {
  const __m256 one = _mm256_set1_ps(1.0f), t = _mm256_mul_ps(x, _mm256_set1_ps(-a));
  const __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(t)));
  return _mm256_andnot_ps(_mm256_cmp_ps(t, _mm256_set1_ps(87.0f), _CMP_GT_OQ), s);
}

template <typename T>
__attribute__((target("avx2,fma"))) void quick_gelu_avx2(const T* x, T* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(x + i);
    store8(y + i, _mm256_mul_ps(v, sigmoid_scaled8(v)));
  }
  quick_gelu_plain(x + i, y + i, n - i);
}

template <typename T>
__attribute__((target("avx2,fma"))) void quick_gelu_grad_avx2(const T* x, const T* g, T* dx, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), scale = _mm256_set1_ps(kQuickGeluScale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(x + i), s = sigmoid_scaled8(v);
    // s + 1.702 x s (1 - s)
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(scale, v), s), _mm256_sub_ps(one, s), s);
    store8(dx + i, _mm256_mul_ps(load8(g + i), d));
  }
  quick_gelu_grad_plain(x + i, g + i, dx + i, n - i);
}

// SwiGLU: y = silu(a) b = a s b with s = sigmoid(a); dy/da = b s (1 + a (1 - s)), dy/db = a s.
template <typename T>
__attribute__((target("avx2,fma"))) void swiglu_avx2(const T* a, const T* b, T* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(a + i);
    store8(y + i, _mm256_mul_ps(_mm256_mul_ps(v, sigmoid_scaled8(v, 1.0f)), load8(b + i)));
  }
  swiglu_plain(a + i, b + i, y + i, n - i);
}

template <typename T>
__attribute__((target("avx2,fma"))) void swiglu_grad_avx2(const T* a, const T* b, const T* g, T* da, T* db, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = load8(a + i), s = sigmoid_scaled8(v, 1.0f), gi = load8(g + i);
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(v, s), _mm256_sub_ps(one, s), s);  // s (1 + a (1 - s))
    store8(da + i, _mm256_mul_ps(_mm256_mul_ps(gi, load8(b + i)), d));
    store8(db + i, _mm256_mul_ps(gi, _mm256_mul_ps(v, s)));
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

// f(begin, end) over [0, n) on LibTorch's threads, split at multiples of 8: which values take the
// vector path, and so their rounding, does not depend on the thread count.
template <typename F>
void parallel_blocks(int64_t n, const F& f) {
  at::parallel_for(0, (n + 7) / 8, kGrain / 8, [&](int64_t b, int64_t e) { f(8 * b, std::min(n, 8 * e)); });
}

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
    for_dtype(x, [&](auto tag) {
      using T = decltype(tag);
      const T* xp = x.data_ptr<T>();
      T* yp = y.data_ptr<T>();
      parallel_blocks(x.numel(), [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
        if (use_avx2()) return quick_gelu_avx2(xp + b, yp + b, e - b);
#endif
        quick_gelu_plain(xp + b, yp + b, e - b);
      });
    });
    ctx->save_for_backward({x});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_no_double_backward("quick_gelu");
    const auto x = ctx->get_saved_variables()[0];
    const auto g = grads[0].to(x.scalar_type()).contiguous();
    auto dx = torch::empty_like(x);
    for_dtype(x, [&](auto tag) {
      using T = decltype(tag);
      const T *xp = x.data_ptr<T>(), *gp = g.data_ptr<T>();
      T* dp = dx.data_ptr<T>();
      parallel_blocks(x.numel(), [&](int64_t b, int64_t e) {
#if defined(__x86_64__)
        if (use_avx2()) return quick_gelu_grad_avx2(xp + b, gp + b, dp + b, e - b);
#endif
        quick_gelu_grad_plain(xp + b, gp + b, dp + b, e - b);
      });
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

// y (and so g) is fp32, or bf16 under bf16 autocast (T); x, w, dx and dw are fp32.
template <typename T>
void rms_row_plain(const float* x, const float* w, T* y, float r, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] = static_cast<T>(x[i] * r * w[i]);
}

template <typename T>
void rms_row_grad_plain(const float* x, const float* w, const T* g, float r, float c, float* dx, float* dw, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    const float gi = to_f(g[i]);
    dx[i] = r * gi * w[i] - x[i] * c;
    dw[i] += gi * x[i] * r;
  }
}

template <typename T>
float gwx_plain(const T* g, const float* w, const float* x, int64_t d) {
  float s = 0;
  for (int64_t i = 0; i < d; ++i) s += to_f(g[i]) * w[i] * x[i];
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

template <typename T>
__attribute__((target("avx2,fma"))) float rms_row_avx2(const float* x, const float* w, T* y, int64_t d, float eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  const float r = 1.0f / std::sqrt((hsum8(acc) + dot_plain(x + i, x + i, d - i)) / static_cast<float>(d) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= d; i += 8)
    store8(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(w + i)));
  rms_row_plain(x + i, w + i, y + i, r, d - i);
  return r;
}

template <typename T>
__attribute__((target("avx2,fma"))) void rms_row_grad_avx2(const float* x, const float* w, const T* g, float r,
                                                            float* dx, float* dw, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    acc = _mm256_fmadd_ps(_mm256_mul_ps(load8(g + i), _mm256_loadu_ps(w + i)), _mm256_loadu_ps(x + i), acc);
  const float c = r * r * r * (hsum8(acc) + gwx_plain(g + i, w + i, x + i, d - i)) / static_cast<float>(d);
  const __m256 rv = _mm256_set1_ps(r), cv = _mm256_set1_ps(c);
  for (i = 0; i + 8 <= d; i += 8) {
    const __m256 gv = load8(g + i), xv = _mm256_loadu_ps(x + i);
    const __m256 a = _mm256_mul_ps(_mm256_mul_ps(rv, gv), _mm256_loadu_ps(w + i));
    _mm256_storeu_ps(dx + i, _mm256_fnmadd_ps(xv, cv, a));
    _mm256_storeu_ps(dw + i, _mm256_fmadd_ps(_mm256_mul_ps(gv, xv), rv, _mm256_loadu_ps(dw + i)));
  }
  rms_row_grad_plain(x + i, w + i, g + i, r, c, dx + i, dw + i, d - i);
}
#endif

// One row forward: y = x r w, returns r.
template <typename T>
float rms_row(const float* x, const float* w, T* y, int64_t d, float eps) {
#if defined(__x86_64__)
  if (use_avx2()) return rms_row_avx2(x, w, y, d, eps);
#endif
  const float r = 1.0f / std::sqrt(dot_plain(x, x, d) / static_cast<float>(d) + eps);
  rms_row_plain(x, w, y, r, d);
  return r;
}

// One row backward: dx as above, and g x r added into dw.
template <typename T>
void rms_row_grad(const float* x, const float* w, const T* g, float r, float* dx, float* dw, int64_t d) {
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
    for_dtype(a, [&](auto tag) {
      using T = decltype(tag);
      const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>();
      T* yp = y.data_ptr<T>();
      parallel_blocks(a.numel(), [&](int64_t s, int64_t e) {
#if defined(__x86_64__)
        if (use_avx2()) return swiglu_avx2(ap + s, bp + s, yp + s, e - s);
#endif
        swiglu_plain(ap + s, bp + s, yp + s, e - s);
      });
    });
    ctx->save_for_backward({a, b});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_no_double_backward("swiglu");
    const auto saved = ctx->get_saved_variables();
    const auto &a = saved[0], &b = saved[1];
    const auto g = grads[0].to(a.scalar_type()).contiguous();
    auto da = torch::empty_like(a), db = torch::empty_like(b);
    for_dtype(a, [&](auto tag) {
      using T = decltype(tag);
      const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>(), *gp = g.data_ptr<T>();
      T *dap = da.data_ptr<T>(), *dbp = db.data_ptr<T>();
      parallel_blocks(a.numel(), [&](int64_t s, int64_t e) {
#if defined(__x86_64__)
        if (use_avx2()) return swiglu_grad_avx2(ap + s, bp + s, gp + s, dap + s, dbp + s, e - s);
#endif
        swiglu_grad_plain(ap + s, bp + s, gp + s, dap + s, dbp + s, e - s);
      });
    });
    return {da, db};
  }
};

constexpr int64_t kRmsBlock = 32;  // rows per partial weight gradient

class RmsNormFn : public torch::autograd::Function<RmsNormFn> {
 public:
  // bf16_out: y in bf16 (what the matmuls after it read under bf16 autocast), else fp32.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& input,
                               const torch::Tensor& weight, double eps, bool bf16_out) {
    const auto x = input.contiguous(), w = weight.contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / d;
    auto y = torch::empty(x.sizes(), x.options().dtype(bf16_out ? torch::kBFloat16 : torch::kFloat32));
    auto r = torch::empty({rows}, x.options());
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* rp = r.data_ptr<float>();
    for_dtype(y, [&](auto tag) {
      using T = decltype(tag);
      T* yp = y.data_ptr<T>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / d), [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) rp[i] = rms_row(xp + i * d, wp, yp + i * d, d, static_cast<float>(eps));
      });
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
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = r.data_ptr<float>();
    float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
    for_dtype(g, [&](auto tag) {
      using T = decltype(tag);
      const T* gp = g.data_ptr<T>();
      at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k)
          for (int64_t i = k * kRmsBlock; i < std::min(rows, (k + 1) * kRmsBlock); ++i)
            rms_row_grad(xp + i * d, wp, gp + i * d, rp[i], dxp + i * d, pp + k * d, d);
      });
    });
    auto dw = torch::zeros({d}, x.options());
    float* dwp = dw.data_ptr<float>();
    for (int64_t k = 0; k < blocks; ++k)  // in block order: the same sum for any thread count
      for (int64_t j = 0; j < d; ++j) dwp[j] += pp[k * d + j];
    return {dx, dw, torch::Tensor(), torch::Tensor()};
  }
};

// --- attention weights ------------------------------------------------------------------------
// p = softmax(s scale + m) over a row of n scores, in fp32: p (fp32, what backward reads) and y
// (the scores' dtype, what the next matmul reads). A row with a NaN, or with every key masked, is
// all NaN, as LibTorch's softmax gives.
template <typename T>
void softmax_row_plain(const T* s, const float* m, float scale, float* p, T* y, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = to_f(s[i]) * scale + (m ? m[i] : 0.0f);
    nan |= std::isnan(p[i]);
    mx = std::max(mx, p[i]);
  }
  if (nan || mx == -std::numeric_limits<float>::infinity()) mx = std::numeric_limits<float>::quiet_NaN();
  float sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += (p[i] = std::exp(p[i] - mx));
  const float inv = 1.0f / sum;
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(p[i] *= inv);
}

// ds = scale p (g - sum(g p)).
template <typename T>
void softmax_row_grad_plain(const float* p, const T* g, float scale, T* ds, int64_t n) {
  float dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += to_f(g[i]) * p[i];
  for (int64_t i = 0; i < n; ++i) ds[i] = static_cast<T>(scale * p[i] * (to_f(g[i]) - dot));
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float hmax8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float m = lanes[0];
  for (float l : lanes) m = std::max(m, l);
  return m;
}

template <typename T>
__attribute__((target("avx2,fma"))) void softmax_row_avx2(const T* s, const float* m, float scale, float* p, T* y,
                                                           int64_t n) {
  const int64_t n8 = n / 8 * 8;
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 z = _mm256_fmadd_ps(load8(s + i), sc, m ? _mm256_loadu_ps(m + i) : _mm256_setzero_ps());
    _mm256_storeu_ps(p + i, z);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, z);
  }
  float mxs = hmax8(mx);
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (int64_t i = n8; i < n; ++i) {
    p[i] = to_f(s[i]) * scale + (m ? m[i] : 0.0f);
    has_nan |= std::isnan(p[i]);
    mxs = std::max(mxs, p[i]);
  }
  if (has_nan || mxs == -std::numeric_limits<float>::infinity()) {
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(p[i] = std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const __m256 mv = _mm256_set1_ps(mxs);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 e = exp8_or_zero(_mm256_sub_ps(_mm256_loadu_ps(p + i), mv));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  for (int64_t i = n8; i < n; ++i) sum += (p[i] = std::exp(p[i] - mxs));
  const float inv = 1.0f / sum;
  const __m256 iv = _mm256_set1_ps(inv);
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 q = _mm256_mul_ps(_mm256_loadu_ps(p + i), iv);
    _mm256_storeu_ps(p + i, q);
    store8(y + i, q);
  }
  for (int64_t i = n8; i < n; ++i) y[i] = static_cast<T>(p[i] *= inv);
}

template <typename T>
__attribute__((target("avx2,fma"))) void softmax_row_grad_avx2(const float* p, const T* g, float scale, T* ds,
                                                                int64_t n) {
  const int64_t n8 = n / 8 * 8;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n8; i += 8) acc = _mm256_fmadd_ps(load8(g + i), _mm256_loadu_ps(p + i), acc);
  float dot = hsum8(acc);
  for (int64_t i = n8; i < n; ++i) dot += to_f(g[i]) * p[i];
  const __m256 dv = _mm256_set1_ps(dot), sc = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n8; i += 8)
    store8(ds + i, _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_loadu_ps(p + i)), _mm256_sub_ps(load8(g + i), dv)));
  for (int64_t i = n8; i < n; ++i) ds[i] = static_cast<T>(scale * p[i] * (to_f(g[i]) - dot));
}
#endif

class AttentionSoftmaxFn : public torch::autograd::Function<AttentionSoftmaxFn> {
 public:
  // scores [..., n] in fp32 or bf16; mask fp32, already expanded to scores' shape with unit stride
  // in the last dimension, or empty for none (autograd's inputs must be defined tensors).
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& scores,
                               const torch::Tensor& mask, double scale) {
    const auto s = scores.contiguous();
    const int64_t n = s.size(-1), rows = s.numel() / n, dims = s.dim();
    auto y = torch::empty_like(s);
    auto p = s.scalar_type() == torch::kFloat32 ? y : torch::empty(s.sizes(), s.options().dtype(torch::kFloat32));
    // Each row's offset into the (broadcast) mask from its leading indices.
    std::vector<int64_t> sizes(s.sizes().begin(), s.sizes().end() - 1), mstrides;
    const float* mp = nullptr;
    if (mask.numel() > 0) {
      mstrides.assign(mask.strides().begin(), mask.strides().end() - 1);
      mp = mask.data_ptr<float>();
    }
    auto mask_row = [&](int64_t r) -> const float* {
      if (!mp) return nullptr;
      int64_t off = 0;
      for (int64_t d = dims - 2; d >= 0; --d) {
        off += (r % sizes[d]) * mstrides[d];
        r /= sizes[d];
      }
      return mp + off;
    };
    const float sc = static_cast<float>(scale);
    for_dtype(s, [&](auto tag) {
      using T = decltype(tag);
      const T* sp = s.data_ptr<T>();
      T* yp = y.data_ptr<T>();
      float* pp = p.data_ptr<float>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / (4 * n)), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
#if defined(__x86_64__)
          if (use_avx2()) {
            softmax_row_avx2(sp + r * n, mask_row(r), sc, pp + r * n, yp + r * n, n);
            continue;
          }
#endif
          softmax_row_plain(sp + r * n, mask_row(r), sc, pp + r * n, yp + r * n, n);
        }
      });
    });
    ctx->save_for_backward({p});
    ctx->saved_data["scale"] = scale;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_no_double_backward("attention_softmax");
    const auto p = ctx->get_saved_variables()[0];
    const float sc = static_cast<float>(ctx->saved_data["scale"].toDouble());
    const auto g = grads[0].contiguous();
    const int64_t n = p.size(-1), rows = p.numel() / n;
    auto ds = torch::empty_like(g);
    for_dtype(g, [&](auto tag) {
      using T = decltype(tag);
      const T* gp = g.data_ptr<T>();
      T* dp = ds.data_ptr<T>();
      const float* pp = p.data_ptr<float>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / (4 * n)), [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
#if defined(__x86_64__)
          if (use_avx2()) {
            softmax_row_grad_avx2(pp + r * n, gp + r * n, sc, dp + r * n, n);
            continue;
          }
#endif
          softmax_row_grad_plain(pp + r * n, gp + r * n, sc, dp + r * n, n);
        }
      });
    });
    return {ds, torch::Tensor(), torch::Tensor()};
  }
};

// --- rotary position embedding ----------------------------------------------------------------
// One row of h = Dh / 2 pairs: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (x1, x2 the halves), and
// back: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1. `sign` -1 turns the forward into the backward
// (the same formula with s negated and read from the other half).
template <typename T>
void rope_row_plain(const T* x, const float* c, const float* s, T* y, int64_t h, float sign, int64_t from = 0) {
  for (int64_t i = from; i < h; ++i) {
    const float x1 = to_f(x[i]), x2 = to_f(x[i + h]);
    const float s1 = sign > 0 ? s[i] : s[i + h], s2 = sign > 0 ? s[i + h] : s[i];
    y[i] = static_cast<T>(x1 * c[i] - sign * x2 * s1);
    y[i + h] = static_cast<T>(x2 * c[i + h] + sign * x1 * s2);
  }
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx2,fma"))) void rope_row_avx2(const T* x, const float* c, const float* s, T* y, int64_t h,
                                                        float sign) {
  const bool fwd = sign > 0;
  int64_t i = 0;
  for (; i + 8 <= h; i += 8) {
    const __m256 x1 = load8(x + i), x2 = load8(x + i + h);
    const __m256 s1 = _mm256_loadu_ps(fwd ? s + i : s + i + h), s2 = _mm256_loadu_ps(fwd ? s + i + h : s + i);
    // fwd: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; back: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
    __m256 y1 = _mm256_mul_ps(x1, _mm256_loadu_ps(c + i)), y2 = _mm256_mul_ps(x2, _mm256_loadu_ps(c + i + h));
    y1 = fwd ? _mm256_fnmadd_ps(x2, s1, y1) : _mm256_fmadd_ps(x2, s1, y1);
    y2 = fwd ? _mm256_fmadd_ps(x1, s2, y2) : _mm256_fnmadd_ps(x1, s2, y2);
    store8(y + i, y1);
    store8(y + i + h, y2);
  }
  rope_row_plain(x, c, s, y, h, sign, i);
}
#endif

// x [B, H, T, Dh] with unit stride over Dh (the heads' transposed view), c / s [B, T, Dh] fp32
// contiguous; y [B, H, T, Dh] contiguous. sign +1 forward, -1 backward (x is then the gradient).
template <typename T>
void rope_rows(const T* xp, at::IntArrayRef xstrides, const float* cp, const float* sp, T* yp, int64_t B, int64_t H,
               int64_t Tn, int64_t D, float sign) {
  const int64_t h = D / 2;
  at::parallel_for(0, B * H * Tn, std::max<int64_t>(1, kGrain / D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * Tn), hd = r / Tn % H, t = r % Tn;
      const T* x = xp + b * xstrides[0] + hd * xstrides[1] + t * xstrides[2];
      const float *c = cp + (b * Tn + t) * D, *s = sp + (b * Tn + t) * D;
#if defined(__x86_64__)
      if (use_avx2()) {
        rope_row_avx2(x, c, s, yp + r * D, h, sign);
        continue;
      }
#endif
      rope_row_plain(x, c, s, yp + r * D, h, sign);
    }
  });
}

class RopeFn : public torch::autograd::Function<RopeFn> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& cos,
                               const torch::Tensor& sin) {
    const auto c = cos.contiguous(), s = sin.contiguous();
    auto y = torch::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    for_dtype(x, [&](auto tag) {
      using T = decltype(tag);
      rope_rows(x.data_ptr<T>(), x.strides(), c.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<T>(), x.size(0),
                x.size(1), x.size(2), x.size(3), 1.0f);
    });
    ctx->save_for_backward({c, s});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    check_no_double_backward("rope");
    const auto saved = ctx->get_saved_variables();
    const auto g = grads[0].contiguous();
    auto dx = torch::empty_like(g);
    for_dtype(g, [&](auto tag) {
      using T = decltype(tag);
      rope_rows(g.data_ptr<T>(), g.strides(), saved[0].data_ptr<float>(), saved[1].data_ptr<float>(), dx.data_ptr<T>(),
                g.size(0), g.size(1), g.size(2), g.size(3), -1.0f);
    });
    return {dx, torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool rope_fits(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  auto table_ok = [&](const torch::Tensor& t) {
    return t.device() == x.device() && t.scalar_type() == torch::kFloat32 && !t.requires_grad() && t.dim() == 3 &&
           t.size(0) == x.size(0) && t.size(1) == x.size(2) && t.size(2) == x.size(3);
  };
  return enabled() && fast_path(x) && x.dim() == 4 && x.numel() > 0 && x.size(3) % 2 == 0 && x.stride(3) == 1 &&
         table_ok(cos) && table_ok(sin);
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(rope_fits(x, cos, sin), "rope: x [B, H, T, Dh] fp32 / bf16 with unit stride over Dh and cos / sin [B, T, Dh] "
              "fp32 expected, got x ", x.sizes(), " ", x.scalar_type(), ", cos ", cos.sizes(), " ", cos.scalar_type());
  return RopeFn::apply(x, cos, sin);
}

torch::Tensor attention_softmax(const torch::Tensor& scores, double scale, const torch::Tensor& mask) {
  const bool fits = enabled() && fast_path(scores) && scores.dim() > 0 && scores.numel() > 0 &&
                    (!mask.defined() || (!mask.requires_grad() && mask.device() == scores.device() &&
                                         mask.is_floating_point() && at::is_expandable_to(mask.sizes(), scores.sizes())));
  if (!fits) {
    auto z = scores * scale;
    if (mask.defined()) z = z + mask.to(z.scalar_type());
    const auto zf = z.scalar_type() == torch::kDouble ? z : z.to(torch::kFloat32);
    return torch::softmax(zf, -1).to(scores.scalar_type());
  }
  if (!mask.defined()) return AttentionSoftmaxFn::apply(scores, torch::empty({0}), scale);
  auto m = mask.to(torch::kFloat32).expand(scores.sizes());  // broadcast dims get stride 0: no copy
  if (m.stride(-1) != 1) m = m.contiguous();
  return AttentionSoftmaxFn::apply(scores, m, scale);
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  if (!enabled() || !fast_path(x, false) || !fast_path(weight, false) || x.dim() == 0 || x.numel() == 0 || weight.dim() != 1 ||
      weight.size(0) != x.size(-1)) {
    const auto xf = x.scalar_type() == torch::kDouble ? x : x.to(torch::kFloat32);
    return (xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight).to(x.scalar_type());
  }
  // Under bf16 autocast every reader of a norm's output is a matmul that would cast it to bf16:
  // the kernel writes bf16 at once, the same values as its fp32 output cast, without the casts
  // (one per reader: q, k and v read the same norm) or their fp32 gradients in backward.
  const bool bf16_out = at::autocast::is_cpu_enabled() && at::autocast::get_autocast_cpu_dtype() == at::kBFloat16;
  return RmsNormFn::apply(x, weight, eps, bf16_out);
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  if (!enabled() || !fast_path(gate) || up.scalar_type() != gate.scalar_type() || !fast_path(up) ||
      gate.sizes() != up.sizes() || gate.numel() == 0)
    return torch::silu(gate) * up;
  return SwiGluFn::apply(gate, up);
}

torch::Tensor quick_gelu(const torch::Tensor& x) {
  if (!enabled() || !fast_path(x) || x.numel() == 0) return x * torch::sigmoid(1.702 * x);
  return QuickGeluFn::apply(x);
}

}  // namespace trialign
