#include "core/blas.h"

#include <dlfcn.h>

namespace trialign {

namespace {

// CBLAS's enums, as every CBLAS defines them.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);

struct Api {  // looked up once
  int (*get)() = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  void (*set)(int) = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  Sgemm sgemm = reinterpret_cast<Sgemm>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
};

const Api& api() {
  static const Api a;
  return a;
}

}  // namespace

OneBlasThread::OneBlasThread() {
  if (!api().get || !api().set) return;
  const int n = api().get();
  if (n > 1) {
    previous_ = n;
    api().set(1);
  }
}

OneBlasThread::~OneBlasThread() {
  if (previous_ > 0) api().set(previous_);
}

bool have_sgemm() { return api().sgemm != nullptr; }

bool sgemm_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                     const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (!api().sgemm) return false;
  api().sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb), 0.0f,
              c, static_cast<int>(ldc));
  return true;
}

}  // namespace trialign
