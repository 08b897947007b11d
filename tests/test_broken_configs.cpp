// The config half of the broken-input corpus (tests/broken/configs): mistakes found while the
// config loads, before any data or tokenizer is touched, so these also run in the sanitizer
// build. Each gives one message naming the file:line or dotted key, and exit code 2.
#include <catch2/catch.hpp>

#include <filesystem>

#include "test_helpers.h"

namespace fs = std::filesystem;

TEST_CASE("broken configs: one clear message naming the key or file, exit 2", "[broken][cli]") {
  trialign::test::TempDir dir{"broken-configs"};
  fs::copy(trialign::test::source_dir() + "/tests/broken", dir.path, fs::copy_options::recursive);
  struct Case {
    std::string input, args;
    std::vector<std::string> messages;
  };
  const std::vector<Case> cases = {
      {"typo'd key", "train configs/typo_key.yaml", {"configs/typo_key.yaml:2", "unknown key 'trian'; did you mean 'train'?"}},
      {"wrong type", "train configs/wrong_type.yaml", {"configs/wrong_type.yaml:2", "train.steps", "many"}},
      {"negative lr", "train configs/negative_lr.yaml", {"configs/negative_lr.yaml:2", "optim.lr"}},
      {"zero batch", "train configs/zero_batch.yaml", {"configs/zero_batch.yaml:2", "train.batch_size"}},
      {"unknown component type", "train configs/unknown_type.yaml",
       {"model.projector.type: unknown projector type 'qformer'; registered: linear, mlp2x_gelu, resampler"}},
      {"batch not divisible by accumulation", "train configs/accum_indivisible.yaml", {"train.batch_size", "grad_accum"}},
      {"nccl on the CPU", "train configs/nccl_on_cpu.yaml", {"distributed.backend", "use gloo"}},
      {"no such file", "train configs/nope.yaml", {"nope.yaml"}},
      {"bad --set", "train configs/base.yaml --set train.steps=-3", {"train.steps"}},
      {"patch window not centred", "train configs/base.yaml --set model.vision.patch_kernel_size=11",
       {"model.vision.patch_kernel_size", "patch_size (8) plus an even number"}},
      {"unknown pooling", "train configs/base.yaml --set model.vision.pooling=avg",
       {"model.vision.pooling", "cls", "max"}},
      {"--set of an unknown key", "train configs/base.yaml --set optim.learning_rate=1", {"optim.learning_rate"}},
  };
  for (const auto& c : cases) {
    std::string out;
    const int code = trialign::test::run_command("cd " + dir.path.string() + " && " + TRIALIGN_BINARY + " " + c.args, &out);
    INFO(c.input << ": trialign " << c.args << "\n" << out);
    CHECK(code == 2);
    for (const auto& m : c.messages) CHECK_THAT(out, Catch::Contains(m));
  }
}
