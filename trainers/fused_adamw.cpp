// Built with -ffp-contract=off and -fno-math-errno (CMakeLists.txt): the compiler must not fuse
// a multiply and an add that LibTorch's kernels round separately, and sqrt must vectorise.
#include "trainers/fused_adamw.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <string>

namespace trialign {
namespace {

// The per-step constants, rounded to float once as LibTorch's scalar arguments are.
struct Coeffs {
  float decay;     // 1 - lr * weight_decay
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float sqrt_bc2;  // sqrt(1 - beta2^t)
  float eps;
  float neg_step;  // -lr / (1 - beta1^t)
};

// One element at a time, in the order and rounding of LibTorch's kernels:
//   p <- p * decay
//   m <- g * (1 - beta1) + m * beta1           (aten add_ with alpha: vec::fmadd)
//   v <- ((1 - beta2) * g) * g + v * beta2     (aten addcmul_)
//   p <- p + (-step * m) / (sqrt(v) / sqrt_bc2 + eps)
// Where ATen runs its AVX2 / AVX-512 kernels, the two multiply-adds are fused (one rounding);
// in its DEFAULT kernels (CPUs without AVX2+FMA, or ATEN_CPU_CAPABILITY=default) they are not.
// A macro, so that each copy below is compiled (and vectorised) for its own instruction set.
#define TRIALIGN_ADAMW_LOOP(MADD)                                          \
  for (int64_t i = 0; i < n; ++i) {                                        \
    const float gi = g[i];                                                 \
    const float pv = p[i] * c.decay;                                       \
    const float mv = MADD(gi, c.one_minus_beta1, m[i] * c.beta1);          \
    const float vv = MADD(c.one_minus_beta2 * gi, gi, v[i] * c.beta2);     \
    const float denom = __builtin_sqrtf(vv) / c.sqrt_bc2 + c.eps;          \
    m[i] = mv;                                                             \
    v[i] = vv;                                                             \
    p[i] = pv + (c.neg_step * mv) / denom;                                 \
  }
#define TRIALIGN_FUSED_MADD(a, b, c) __builtin_fmaf(a, b, c)
#define TRIALIGN_PLAIN_MADD(a, b, c) ((a) * (b) + (c))  // two roundings: this file is built with -ffp-contract=off

void adamw_range_plain(float* p, const float* g, float* m, float* v, int64_t n, Coeffs c) {
  TRIALIGN_ADAMW_LOOP(TRIALIGN_PLAIN_MADD)
}

#if defined(__x86_64__)
// 8 floats per instruction and each multiply-add one instruction.
__attribute__((target("avx2,fma"))) void adamw_range_avx2(float* p, const float* g, float* m, float* v, int64_t n,
                                                         Coeffs c) {
  TRIALIGN_ADAMW_LOOP(TRIALIGN_FUSED_MADD)
}
#endif

#undef TRIALIGN_ADAMW_LOOP
#undef TRIALIGN_FUSED_MADD
#undef TRIALIGN_PLAIN_MADD

using RangeFn = void (*)(float*, const float*, float*, float*, int64_t, Coeffs);

// The copy that rounds as the kernels ATen picked: it takes AVX2 (or AVX-512, whose fused
// multiply-adds round the same) when the CPU has AVX2 and FMA, unless ATEN_CPU_CAPABILITY=default.
RangeFn adamw_range() {
  static const RangeFn fn = [] {
#if defined(__x86_64__)
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    __builtin_cpu_init();
    if (!(forced && std::string(forced) == "default") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return &adamw_range_avx2;
#endif
    return &adamw_range_plain;
  }();
  return fn;
}

bool fusable(const torch::Tensor& p, const torch::Tensor& g, const torch::Tensor& m, const torch::Tensor& v) {
  for (const auto* t : {&p, &g, &m, &v})
    if (t->device().type() != torch::kCPU || t->scalar_type() != torch::kFloat32 || !t->is_contiguous() ||
        t->numel() != p.numel())
      return false;
  return true;
}

}  // namespace

void FusedAdamW::release_grads() {
  for (auto& group : param_groups())
    for (auto& p : group.params())
      if (p.grad().defined()) {
        had_grad_.insert(p.unsafeGetTensorImpl());
        p.mutable_grad() = torch::Tensor();
      }
}

torch::Tensor FusedAdamW::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  one_pass_updates_ = 0;
  for (auto& group : param_groups()) {
    auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
    for (auto& p : group.params()) {
      torch::Tensor grad = p.grad();
      if (!grad.defined()) {
        // Released, and backward did not reach it this step: zero_grad() would have left zeros.
        if (!had_grad_.count(p.unsafeGetTensorImpl())) continue;
        grad = torch::zeros_like(p, torch::MemoryFormat::Preserve);
      }
      TORCH_CHECK(!grad.is_sparse(), "AdamW does not support sparse gradients");
      const auto key = c10::guts::to_string(p.unsafeGetTensorImpl());
      auto found = state_.find(key);
      if (found == state_.end()) {
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(0);
        s->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        s->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        if (o.amsgrad()) s->max_exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        found = state_.emplace(key, std::move(s)).first;
      }
      auto& st = static_cast<torch::optim::AdamWParamState&>(*found->second);
      st.step(st.step() + 1);
      const auto [beta1, beta2] = o.betas();
      const double bc1 = 1 - std::pow(beta1, st.step()), bc2 = 1 - std::pow(beta2, st.step());
      const double decay = 1 - o.lr() * o.weight_decay(), step_size = o.lr() / bc1;
      auto& m = st.exp_avg();
      auto& v = st.exp_avg_sq();

      if (!o.amsgrad() && fusable(p, grad, m, v)) {
        const Coeffs c{static_cast<float>(decay),
                       static_cast<float>(beta1),
                       static_cast<float>(1 - beta1),
                       static_cast<float>(beta2),
                       static_cast<float>(1 - beta2),
                       static_cast<float>(std::sqrt(bc2)),
                       static_cast<float>(o.eps()),
                       static_cast<float>(-step_size)};
        float* pd = p.data_ptr<float>();
        const float* gd = grad.data_ptr<float>();
        float *md = m.data_ptr<float>(), *vd = v.data_ptr<float>();
        // ~64 KiB of each stream per task: small tensors (norms, biases) stay on one thread.
        const RangeFn range = adamw_range();
        at::parallel_for(0, p.numel(), 1 << 14, [&](int64_t b, int64_t e) {
          range(pd + b, gd + b, md + b, vd + b, e - b, c);
        });
        // Written through raw pointers: tell autograd, as an in-place op would.
        for (auto* t : {&p, &m, &v}) t->unsafeGetTensorImpl()->bump_version();
        ++one_pass_updates_;
        continue;
      }
      // Anything else (another dtype or device, a strided tensor, amsgrad): LibTorch's op sequence.
      if (o.weight_decay() != 0) p.mul_(decay);
      m.mul_(beta1).add_(grad, 1 - beta1);
      v.mul_(beta2).addcmul_(grad, grad, 1 - beta2);
      torch::Tensor second = v;
      if (o.amsgrad()) {
        torch::max_out(st.max_exp_avg_sq(), st.max_exp_avg_sq(), v);
        second = st.max_exp_avg_sq();
      }
      p.addcdiv_(m, (second.sqrt() / std::sqrt(bc2)).add_(o.eps()), -step_size);
    }
  }
  return loss;
}

}  // namespace trialign
