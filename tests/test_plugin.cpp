// Loss plugins: the example SimPO project built out of tree against the installed package, its
// loss against hand-worked values in process and through a training run from YAML, and the
// errors a user meets (wrong API version, not a plugin, unknown option, a failing forward).
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <filesystem>

#include "core/checkpoint.h"
#include "core/config_tree.h"
#include "core/errors.h"
#include "core/plugins.h"
#include "losses/preference.h"
#include "test_helpers.h"
#include "trainers/preference.h"

using namespace trialign;
using trialign::test::TempDir;
using trialign::test::write_file;
namespace fs = std::filesystem;

namespace {

// The example plugin, built once per test process against a fresh install of this build.
const std::string& simpo_plugin() {
  static const std::string path = [] {
    static TempDir dir("plugin");
    std::string log;
    const std::string prefix = dir.file("prefix"), build = dir.file("build");
    if (test::run_command("cmake --install " + std::string(TRIALIGN_BUILD_DIR) + " --prefix " + prefix, &log) != 0) FAIL(log);
    if (test::run_command("cmake -S " + test::source_dir() + "/examples/simpo_loss -B " + build + " -DCMAKE_PREFIX_PATH=" + prefix +
                  " -DCMAKE_CXX_COMPILER=" + TRIALIGN_CXX,
              &log) != 0)
      FAIL(log);
    if (test::run_command("cmake --build " + build + " -j2", &log) != 0) FAIL(log);
    return build + "/libsimpo_loss.so";
  }();
  return path;
}

SequenceLogps logps(const std::vector<std::vector<float>>& rows) {
  size_t t = 0;
  for (const auto& r : rows) t = std::max(t, r.size());
  auto lp = torch::zeros({static_cast<int64_t>(rows.size()), static_cast<int64_t>(t)});
  auto mask = torch::zeros_like(lp);
  for (size_t i = 0; i < rows.size(); ++i)
    for (size_t j = 0; j < rows[i].size(); ++j) {
      lp[i][j] = rows[i][j];
      mask[i][j] = 1;
    }
  return {lp, mask};
}

TypedSpec spec(const std::string& yaml) {
  TypedSpec s{"simpo", parse_config_string(yaml, "test.yaml"), "loss"};
  return s;
}

}  // namespace

TEST_CASE("loss plugin: built out of tree, registered by name, SimPO against hand-worked values", "[plugin][slow]") {
  ConfigErrors errors;
  load_plugins({simpo_plugin()}, nullptr, errors);
  REQUIRE(errors.empty());
  REQUIRE(preference_losses().contains("simpo"));
  CHECK(preference_losses().origin("simpo") == fs::canonical(simpo_plugin()).string());
  CHECK(preference_losses().origin("dpo").empty());  // built-ins have no origin

  auto loss = preference_losses().create_or_throw(spec("{beta: 2.0, gamma: 0.5}"));
  CHECK_FALSE(loss->needs_reference());  // policy passes only
  PreferenceInputs in;
  // Pair 1: chosen mean (-1 - 2) / 2 = -1.5, rejected (-3 - 1 - 2) / 3 = -2:
  //   z = 2 (-1.5) - 2 (-2) - 0.5 = 0.5, loss = log(1 + e^-0.5) = 0.474077.
  // Pair 2: chosen -2, rejected (-1 - 1) / 2 = -1: z = -4 + 2 - 0.5 = -2.5, loss = log(1 + e^2.5) = 2.578889.
  in.logps["policy/chosen"] = logps({{-1, -2}, {-2}});
  in.logps["policy/rejected"] = logps({{-3, -1, -2}, {-1, -1}});
  const auto out = loss->forward(in);
  CHECK(out.loss.item<double>() == Approx((0.474077 + 2.578889) / 2).epsilon(1e-5));
  CHECK(out.metrics.at("rewards/accuracies").item<double>() == Approx(0.5));
  CHECK(out.metrics.at("rewards/margins").item<double>() == Approx((1.0 + -2.0) / 2));

  // Its options are validated like a built-in's.
  CHECK_THROWS_WITH(preference_losses().create_or_throw(spec("{beta: 2.0, gama: 1.0}")), Catch::Contains("gama"));
  CHECK_THROWS_WITH(preference_losses().create_or_throw(spec("{beta: -1.0}")), Catch::Contains("loss.beta"));
}

TEST_CASE("loss plugin: a short preference run from YAML logs the loss its own metrics imply", "[plugin][slow]") {
  TempDir d("plugin-run");
  test::write_tiny_shapes_corpus(d.file("data"), 8, 4);
  write_file(d.file("simpo.yaml"), "trainer: preference\nplugins: [" + simpo_plugin() + R"(]
run: {threads: 1, seed: 5, precision: fp32, out_dir: )" + d.file("run") + R"(}
data: {image_size: 32, max_seq_len: 320, workers: 1, template: chat, tokenizer: )" + d.file("data/tok.model") +
                                        ", train: " + d.file("data/train_pref.jsonl") + R"(}
model:
  vision: {image_size: 32, patch_size: 8, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}
  projector: {type: mlp2x_gelu, spatial_merge: 2}
  llm: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 320}
loss: {type: simpo, beta: 2.0, gamma: 0.5}
train: {batch_size: 1, log_every: 1, steps: 2}
optim: {lr: 1.0e-3}
)");
  std::string log;
  REQUIRE(test::run_command(std::string(TRIALIGN_BINARY) + " train " + d.file("simpo.yaml"), &log) == 0);
  // One pair per step: loss = softplus(-(beta (c - r) - gamma)) of the logged mean log-probs.
  int64_t checked = 0;
  for (const auto& line : [&] {
         std::vector<std::string> v;
         std::stringstream ss(read_text_file(d.file("run/metrics.jsonl")));
         for (std::string l; std::getline(ss, l);) v.push_back(l);
         return v;
       }()) {
    const auto r = nlohmann::json::parse(line);
    if (r.value("split", "") != "train") continue;
    const double c = r["metrics"]["logps/chosen_mean"], rj = r["metrics"]["logps/rejected_mean"];
    const double z = 2.0 * (c - rj) - 0.5;
    INFO(line);
    CHECK(r["loss"].get<double>() == Approx(std::log1p(std::exp(-z))).epsilon(1e-5));
    ++checked;
  }
  CHECK(checked == 2);

  // The checkpoint's config names the plugin, so eval and resume load it again.
  CHECK_THAT(read_text_file(d.file("run/config.yaml")), Catch::Contains("libsimpo_loss.so"));

  // A loss whose forward throws is named with the step it failed at.
  if (!preference_losses().contains("fails_in_forward"))
    preference_losses().add("fails_in_forward", "test", [](ConfigReader&) -> std::shared_ptr<PreferenceLossImpl> {
      struct Failing : PreferenceLossImpl {
        std::vector<ResponsePass> passes() const override { return {{"policy", "chosen"}}; }
        LossOutput forward(const PreferenceInputs&) override { throw std::runtime_error("something inside broke"); }
      };
      return std::make_shared<Failing>();
    });
  TrainOptions quiet;
  quiet.quiet = true;
  std::string yaml = read_text_file(d.file("simpo.yaml"));
  yaml.replace(yaml.find("loss: {type: simpo, beta: 2.0, gamma: 0.5}"), 42, "loss: {type: fails_in_forward}");
  write_file(d.file("fail.yaml"), yaml);
  const RunConfig failing = load_run_config(d.file("fail.yaml"), {"run.out_dir=" + d.file("fail")});
  CHECK_THROWS_WITH(train_preference(failing, quiet),
                    Catch::Contains("step 1 (loss 'fails_in_forward'): something inside broke"));
}

TEST_CASE("plugin errors: missing file, not a plugin, another API version", "[plugin]") {
  TempDir d("plugin-bad");
  write_file(d.file("other.cpp"), "extern \"C\" int trialign_plugin_api_version() { return 99; }\n"
                                  "extern \"C\" void trialign_plugin_register() {}\n");
  write_file(d.file("plain.cpp"), "extern \"C\" int unrelated() { return 1; }\n");
  std::string log;
  REQUIRE(test::run_command(std::string(TRIALIGN_CXX) + " -shared -fPIC -o " + d.file("libother.so") + " " + d.file("other.cpp"), &log) == 0);
  REQUIRE(test::run_command(std::string(TRIALIGN_CXX) + " -shared -fPIC -o " + d.file("libplain.so") + " " + d.file("plain.cpp"), &log) == 0);
  write_file(d.file("garbage.so"), "not an ELF file");
  ConfigErrors errors;
  load_plugins({d.file("missing.so"), d.file("libplain.so"), d.file("libother.so"), d.file("garbage.so")}, nullptr, errors);
  std::string all;
  try {
    errors.throw_if_any("plugins");
  } catch (const ConfigError& e) {
    all = e.what();
  }
  CHECK_THAT(all, Catch::Contains("plugins[0]") && Catch::Contains("missing.so' does not exist"));
  CHECK_THAT(all, Catch::Contains("plugins[1]") && Catch::Contains("is not a trialign plugin"));
  CHECK_THAT(all, Catch::Contains("plugins[2]") && Catch::Contains("built against plugin API version 99, this trialign has version " +
                                                                   std::to_string(kPluginApiVersion)));
  CHECK_THAT(all, Catch::Contains("plugins[3]") && Catch::Contains("cannot load plugin"));
}
