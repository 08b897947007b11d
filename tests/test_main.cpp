// Catch2 runner: pins LibTorch to TRIALIGN_TEST_THREADS threads (default 1) so ctest can run
// tests side by side on few cores without oversubscription.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cstdlib>

int main(int argc, char* argv[]) {
  const char* env = std::getenv("TRIALIGN_TEST_THREADS");
  at::set_num_threads(env ? std::max(1, std::atoi(env)) : 1);
  return Catch::Session().run(argc, argv);
}
