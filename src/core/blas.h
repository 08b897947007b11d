// The BLAS that LibTorch's CPU matmuls run on (Debian's LibTorch links the pthreads OpenBLAS),
// reached directly where trialign schedules GEMMs itself. Looked up at run time, so a build
// against another BLAS still runs: each entry point is null when the library lacks it.
#pragma once

#include <cstdint>

namespace trialign {

// OpenBLAS keeps one global thread count, and concurrent callers of a threaded OpenBLAS queue
// up for its one pool. While trialign runs GEMMs from several threads at once (micro-batches on
// threads, the batched attention products) each GEMM runs on its caller's thread instead: this
// sets the count to 1 for the guard's lifetime and restores the previous one. A no-op without
// OpenBLAS, or when the count already is 1.
class OneBlasThread {
 public:
  OneBlasThread();
  ~OneBlasThread();
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_ = 0;
};

// Row-major single-precision GEMM, C[m, n] = A[m, k] B[k, n] (alpha 1, beta 0), each operand
// given by its pointer, leading dimension and whether it is stored transposed. False when the
// BLAS has no cblas_sgemm (nothing computed: the caller falls back to LibTorch).
bool sgemm_row_major(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                     const float* b, int64_t ldb, float* c, int64_t ldc);
bool have_sgemm();

}  // namespace trialign
