// Config loading: strict typed reading with file:line + dotted path, every error at once,
// includes, overrides, registry errors, and every shipped config validates.
#include <catch2/catch.hpp>

#include <filesystem>

#include "core/config_reader.h"
#include "core/errors.h"
#include "core/run_config.h"
#include "losses/loss.h"
#include "test_helpers.h"
#include "trainers/common.h"
#include "trainers/pipeline.h"

using namespace trialign;
using trialign::test::TempDir;
using trialign::test::write_file;

namespace {

const auto error_of = trialign::test::message_of<ConfigError>;

const char* kMinimal = "data:\n  train: t.jsonl\n  tokenizer: t.model\n";

}  // namespace

TEST_CASE("unknown key names file, line, dotted path and a suggestion", "[config]") {
  TempDir d("cfg");
  write_file(d.file("a.yaml"), std::string(kMinimal) + "optim:\n  lr: 1e-3\n  weight_decy: 0.1\n");
  const std::string msg = error_of([&] { load_run_config(d.file("a.yaml")); });
  CHECK_THAT(msg, Catch::Contains(d.file("a.yaml") + ":6:16: optim.weight_decy: unknown key 'weight_decy'; did you mean 'weight_decay'?"));
}

TEST_CASE("a tab in the indentation and a YAML merge key are named as such", "[config]") {
  TempDir d("cfg");
  write_file(d.file("tab.yaml"), std::string(kMinimal) + "train:\n\tsteps: 3\n");  // line 5
  CHECK_THAT(error_of([&] { load_run_config(d.file("tab.yaml")); }),
             Catch::StartsWith(d.file("tab.yaml") + ":5:") && Catch::Contains(": YAML syntax error: ") &&
                 Catch::EndsWith("; line 5 is indented with a tab, and YAML indents with spaces only"));
  // A tab inside a value is no indentation, and a syntax error elsewhere gets no tab hint.
  write_file(d.file("ok.yaml"), std::string(kMinimal) + "run:\n  name: \"a\\tb\"\n  out_dir: \"x\ty\"\n");
  CHECK_NOTHROW(load_run_config(d.file("ok.yaml")));
  write_file(d.file("bad.yaml"), std::string(kMinimal) + "train: [1, 2\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("bad.yaml")); }),
             Catch::Contains("YAML syntax error") && !Catch::Contains("indented with a tab"));
  // A blank line holding a tab, next to a syntax error of another kind, indents nothing.
  write_file(d.file("blank_tab.yaml"), std::string(kMinimal) + "train: [1, 2\n\t\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("blank_tab.yaml")); }),
             Catch::Contains("YAML syntax error") && !Catch::Contains("indented with a tab"));
  write_file(d.file("merge.yaml"), std::string(kMinimal) + "train:\n  <<: {steps: 3}\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("merge.yaml")); }),
             Catch::Contains("train.<<: unknown key '<<': YAML merge keys ('<<: *anchor') are not supported"));
}

TEST_CASE("wrong types and out-of-range values are all reported together", "[config]") {
  TempDir d("cfg");
  write_file(d.file("a.yaml"), std::string(kMinimal) +
                                   "optim:\n  lr: fast\n"            // line 5: bad type
                                   "train:\n  batch_size: 0\n"       // line 7: out of range
                                   "  steps: 10\n"
                                   "schedule:\n  type: wavy\n");     // line 10: bad choice
  const std::string msg = error_of([&] { load_run_config(d.file("a.yaml")); });
  CHECK_THAT(msg, Catch::Contains("3 problems"));
  CHECK_THAT(msg, Catch::Contains("a.yaml:5:7: optim.lr: expected a finite number, got 'fast'"));
  CHECK_THAT(msg, Catch::Contains("a.yaml:7:15: train.batch_size: must be >= 1, got 0"));
  CHECK_THAT(msg, Catch::Contains("a.yaml:10:9: schedule.type: unknown value 'wavy'; choose one of: cosine, linear, constant"));
}

TEST_CASE("include composes files and the including file wins, and errors point into the included file", "[config]") {
  TempDir d("cfg");
  write_file(d.file("base/model.yaml"), "model:\n  projection_dim: 64\n  vision:\n    hidden_size: 96\n    num_attention_heads: 4\n");
  write_file(d.file("run.yaml"), std::string("include: base/model.yaml\n") + kMinimal + "model:\n  projection_dim: 32\n");
  RunConfig c = load_run_config(d.file("run.yaml"));
  CHECK(c.model.projection_dim == 32);     // the including file overrides
  CHECK(c.model.vision.hidden_size == 96);  // the included value survives
  CHECK(c.model.vision.patch_size == 8);    // defaults fill the rest

  write_file(d.file("base/bad.yaml"), "model:\n  vision:\n    hiden_size: 96\n");
  write_file(d.file("run2.yaml"), std::string("include: [base/bad.yaml]\n") + kMinimal);
  CHECK_THAT(error_of([&] { load_run_config(d.file("run2.yaml")); }),
             Catch::Contains(d.file("base/bad.yaml") + ":3:17: model.vision.hiden_size: unknown key"));
}

TEST_CASE("a missing include and an include cycle are errors naming the including line", "[config]") {
  TempDir d("cfg");
  write_file(d.file("run.yaml"), std::string(kMinimal) + "include: nope.yaml\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("run.yaml")); }),
             Catch::Contains(d.file("run.yaml") + ":4:10: cannot read config file"));
  write_file(d.file("a.yaml"), "include: b.yaml\n");
  write_file(d.file("b.yaml"), "include: a.yaml\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml")); }), Catch::Contains("include cycle"));
}

TEST_CASE("an include naming a folder, an empty --set value and a pipeline stage name that is not a plain folder name are errors",
          "[config]") {
  TempDir d("cfg");
  std::filesystem::create_directories(d.file("adir"));
  write_file(d.file("run.yaml"), std::string(kMinimal) + "include: adir\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("run.yaml")); }),
             Catch::Contains(d.file("run.yaml") + ":4:10: cannot read config file") && Catch::Contains("(it is a folder)"));
  write_file(d.file("a.yaml"), std::string(kMinimal) + "train:\n  steps: 2\n");
  for (const std::string set : {"train.steps=", "train.steps=null", "run=~"})
    CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {set}); }),
               Catch::Contains("the value is empty (or null)") && Catch::Contains("drop the --set"));
  CHECK(load_run_config(d.file("a.yaml"), {"train.steps=3"}).train.steps == 3);
  // A key the --set creates is named by the --set, not "<default>".
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"a.b.c=1"}); }),
             Catch::Contains("--set a.b.c: a: unknown key 'a'"));
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"trainer=finetune", "eval.sets=[{name: v, data: a.jsonl}, {name: v, data: b.jsonl}]"}); }),
             Catch::Contains("eval.sets[1].name") && Catch::Contains("'v' is also eval.sets[0]'s name"));
  for (const std::string name : {"../x", "a/b", ".hidden", "report"}) {
    write_file(d.file("p.yaml"), "name: p\nout_dir: " + d.file("out") + "\nstages:\n  - {name: '" + name +
                                     "', config: " + d.file("a.yaml") + "}\n");
    CHECK_THAT(error_of([&] { load_pipeline(d.file("p.yaml")); }),
               Catch::Contains("stages[0].name: '" + name + "' is the stage's folder under out_dir"));
  }
  write_file(d.file("p.yaml"), "name: p\nout_dir: " + d.file("out") + "\nstages:\n  - {name: stage-1.b_2, config: " +
                                   d.file("a.yaml") + "}\n");
  CHECK_NOTHROW(load_pipeline(d.file("p.yaml")));
  // init_from asks an earlier stage for a component its model does not have: refused when the
  // pipeline is read, not after that stage has trained.
  write_file(d.file("vlm.yaml"), std::string(kMinimal) + "trainer: finetune\n");
  auto two_stages = [&](const std::string& components) {
    write_file(d.file("p.yaml"), "name: p\nout_dir: " + d.file("out") + "\nstages:\n  - {name: a, config: " +
                                     d.file("a.yaml") + "}\n  - {name: b, config: " + d.file("vlm.yaml") +
                                     ", init_from: [{stage: a, components: " + components + "}]}\n");
    return d.file("p.yaml");
  };
  CHECK_THAT(error_of([&] { load_pipeline(two_stages("[vision_model, language_model]")); }),
             Catch::Contains("stages[1].init_from[0].components: stage 'a' (trainer contrastive) has no language_model; "
                             "its checkpoints hold vision_model, text_model, visual_projection, text_projection"));
  CHECK(load_pipeline(two_stages("[vision_model]")).stages.at(1).init_from.at(0).components.size() == 1);
  // A stage's folder is the pipeline's out_dir/<name>: a set of run.out_dir or run.name would be
  // overwritten without a word, so it is refused, from the stage's set, the pipeline's and --set.
  for (const std::string set : {"{run.out_dir: elsewhere}", "{run: {name: other}}"}) {
    write_file(d.file("p.yaml"), "name: p\nout_dir: " + d.file("out") + "\nstages:\n  - name: a\n    config: " +
                                     d.file("a.yaml") + "\n    set: " + set + "\n");
    CHECK_THAT(error_of([&] { load_pipeline(d.file("p.yaml")); }),
               Catch::Contains(d.file("p.yaml") + ":6:") && Catch::Contains("a pipeline stage trains in the pipeline's out_dir/<stage name>"));
  }
  write_file(d.file("p.yaml"), "name: p\nout_dir: " + d.file("out") + "\nset: {run.name: x}\nstages:\n  - {name: a, config: " +
                                   d.file("a.yaml") + "}\n");
  CHECK_THAT(error_of([&] { load_pipeline(d.file("p.yaml")); }), Catch::Contains(d.file("p.yaml") + ":3:") && Catch::Contains("set run.name:"));
  write_file(d.file("p.yaml"), "name: p\nout_dir: " + d.file("out") + "\nstages:\n  - {name: a, config: " + d.file("a.yaml") + "}\n");
  CHECK_THAT(error_of([&] { load_pipeline(d.file("p.yaml"), {"run.out_dir=/tmp/x"}); }),
             Catch::Contains("--set run.out_dir=/tmp/x: set run.out_dir:"));
  CHECK_THAT(error_of([&] { load_pipeline(d.file("p.yaml"), {"run={out_dir: /tmp/x}"}); }),
             Catch::Contains("--set run={out_dir: /tmp/x}: set run.out_dir:"));
  CHECK(load_pipeline(d.file("p.yaml"), {"train.steps=5"}).stages.at(0).run.out_dir == d.file("out") + "/a");
}

TEST_CASE("overrides with --set set typed values, creates nested keys and is validated like the file", "[config]") {
  TempDir d("cfg");
  write_file(d.file("a.yaml"), std::string(kMinimal) + "optim:\n  lr: 1e-3\n");
  RunConfig c = load_run_config(d.file("a.yaml"), {"optim.lr=2e-4", "eval.recall_at=[1, 3]", "loss.type=siglip"});
  CHECK(c.optim.lr == Approx(2e-4));
  CHECK(c.eval.recall_at == std::vector<int64_t>{1, 3});
  CHECK(c.loss.type == "siglip");
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"optim.lr=-1"}); }),
             Catch::Contains("--set optim.lr: optim.lr: must be > 0, got -1"));
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"optim.lr"}); }), Catch::Contains("expected KEY=VALUE"));
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"train.batch_size=[1, 2]"}); }),
             Catch::Contains("train.batch_size: expected an integer, got a list"));
  // A whole section with another type replaces the section (the old type's options would be unknown
  // keys); one without a type, or with the same type, merges into it.
  write_file(d.file("v.yaml"), std::string(kMinimal) +
                                   "trainer: finetune\nmodel:\n  projector:\n    type: mlp2x_gelu\n    spatial_merge: 2\n");
  const RunConfig retyped = load_run_config(d.file("v.yaml"), {"model.projector={type: resampler, num_queries: 8}"});
  CHECK(retyped.model.projector.type == "resampler");
  CHECK(retyped.model.projector.options.find("num_queries") != nullptr);
  CHECK(retyped.model.projector.options.find("spatial_merge") == nullptr);
  const RunConfig merged = load_run_config(d.file("v.yaml"), {"model.projector={spatial_merge: 1}"});
  CHECK(merged.model.projector.type == "mlp2x_gelu");
  CHECK(merged.model.projector.options.find("spatial_merge")->scalar == "1");
}

TEST_CASE("integers that do not fit, an empty recall list and a device this build lacks are errors", "[config]") {
  TempDir d("cfg");
  write_file(d.file("a.yaml"), kMinimal);
  const std::string msg = error_of([&] {
    load_run_config(d.file("a.yaml"), {"train.batch_size=2147483648", "eval.batch_size=4294967296"});
  });
  CHECK_THAT(msg, Catch::Contains("train.batch_size: integer out of range: 2147483648"));
  CHECK_THAT(msg, Catch::Contains("eval.batch_size: integer out of range: 4294967296"));
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"eval.recall_at=[]"}); }),
             Catch::Contains("eval.recall_at: needs at least one k"));
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"run.device=cuda"}); }),
             Catch::Contains("run.device: 'cuda' is not available yet"));
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml"), {"loss.init_logit_scale=90"}); }),
             Catch::Contains("init_logit_scale 90"));
}

TEST_CASE("cross-field checks name the key to fix", "[config]") {
  TempDir d("cfg");
  write_file(d.file("a.yaml"), std::string(kMinimal) + "train:\n  batch_size: 10\n  grad_accum: 3\nmodel:\n  vision:\n    patch_size: 7\n");
  const std::string msg = error_of([&] { load_run_config(d.file("a.yaml")); });
  CHECK_THAT(msg, Catch::Contains("train.grad_accum: train.batch_size (10) must be a multiple of grad_accum (3)"));
  CHECK_THAT(msg, Catch::Contains("model.vision.patch_size: image_size 64 is not a multiple of patch_size 7"));
}

TEST_CASE("registry: unknown loss type lists the registered names, and bad options are errors", "[config][registry]") {
  TempDir d("cfg");
  write_file(d.file("a.yaml"), std::string(kMinimal) + "loss:\n  type: infonse\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("a.yaml")); }),
             Catch::Contains("loss.type: unknown contrastive loss type 'infonse'; registered: infonce, siglip"));
  write_file(d.file("b.yaml"), std::string(kMinimal) + "loss:\n  type: infonce\n  init_logit_scal: 1\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("b.yaml")); }),
             Catch::Contains("b.yaml:6:20: loss.init_logit_scal: unknown key 'init_logit_scal'; did you mean 'init_logit_scale'?"));

  Registry<int> reg("widget");
  reg.add("a", "first", [](ConfigReader&) { return std::make_shared<int>(1); });
  CHECK_THROWS_WITH(reg.add("a", "again", [](ConfigReader&) { return std::make_shared<int>(2); }),
                    Catch::Contains("duplicate widget name 'a'"));
  CHECK(reg.names() == std::vector<std::string>{"a"});
}

TEST_CASE("the resolved config round-trips through YAML", "[config]") {
  TempDir d("cfg");
  write_file(d.file("a.yaml"), std::string(kMinimal) + "optim:\n  lr: 3e-4\nloss:\n  type: siglip\n  init_logit_bias: -5\n");
  RunConfig c = load_run_config(d.file("a.yaml"));
  write_file(d.file("resolved.yaml"), resolved_yaml(c));
  RunConfig again = load_run_config(d.file("resolved.yaml"));
  CHECK(resolved_yaml(again) == resolved_yaml(c));
  CHECK(again.optim.lr == Approx(3e-4));
  CHECK(again.loss.options.find("init_logit_bias")->scalar == "-5");
}

TEST_CASE("every shipped config validates", "[config]") {
  int checked = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(trialign::test::source_dir() + "/configs")) {
    if (e.path().extension() != ".yaml") continue;
    if (e.path().parent_path().filename() == "base") continue;  // fragments meant for include:
    INFO(e.path().string());
    if (e.path().parent_path().filename() == "pipeline") {
      // Stage paths in a pipeline are relative to the repository root, like the README's commands.
      const auto cwd = std::filesystem::current_path();
      std::filesystem::current_path(trialign::test::source_dir());
      CHECK_NOTHROW(load_pipeline(e.path().string()));
      std::filesystem::current_path(cwd);
    } else {
      CHECK_NOTHROW(load_run_config(e.path().string()));
    }
    ++checked;
  }
  CHECK(checked >= 6);
}

TEST_CASE("resume config diff: a key added later with its default, or a number spelled differently, is no change",
          "[config][resume]") {
  const RunConfig cfg = load_run_config(test::source_dir() + "/configs/stage3_finetune.yaml");
  std::string saved = resolved_yaml(cfg);
  // As a checkpoint written before `rewards` existed would hold it, with lr spelled another way.
  const auto at = saved.find("rewards: []\n");
  REQUIRE(at != std::string::npos);
  saved.erase(at, std::string("rewards: []\n").size());
  const auto lr = saved.find("lr: 0.001\n");
  REQUIRE(lr != std::string::npos);
  saved.replace(lr, std::string("lr: 0.001\n").size(), "lr: 1.0e-3\n");
  // Configs saved before numbers were written exactly held 10 significant digits (4/3 below).
  const auto ratio = saved.find("ratio_max: 1.3333333333333333\n");
  REQUIRE(ratio != std::string::npos);
  saved.replace(ratio, std::string("ratio_max: 1.3333333333333333\n").size(), "ratio_max: 1.333333333\n");
  const auto same = diff_for_resume(saved, resolved_yaml(cfg));
  CHECK(same.safe.empty());
  CHECK(same.unsafe.empty());
  // A real change is still one.
  RunConfig other = cfg;
  other.optim.weight_decay = 0.5;
  CHECK(diff_for_resume(saved, resolved_yaml(other)).unsafe == std::vector<std::string>{"optim.weight_decay"});
  // So is a number that differs in its 9th significant digit.
  RunConfig near = cfg;
  near.data.augment.ratio_max = 1.333333343;
  CHECK(diff_for_resume(saved, resolved_yaml(near)).unsafe == std::vector<std::string>{"data.augment.ratio_max"});
}

TEST_CASE("a resume may lower the learning rate and change what a bad step does, not the rules' other fields",
          "[config][resume]") {
  const RunConfig cfg = load_run_config(test::source_dir() + "/configs/stage3_finetune.yaml");
  const std::string saved = resolved_yaml(cfg);
  RunConfig lower = cfg;
  lower.optim.lr = 1e-4;
  lower.optim.param_groups.at(2).lr = 5e-4;  // language_model's rule
  const auto lr = diff_for_resume(saved, resolved_yaml(lower));
  CHECK(lr.unsafe.empty());
  CHECK(lr.safe.empty());
  CHECK(lr.learning_rate == std::vector<std::string>{"optim.lr", "optim.param_groups"});
  // The projector's and language model's rules shared 2e-3 (one optimizer group); now they differ.
  CHECK(lr.lr_regrouped);
  RunConfig scaled = cfg;  // every lr halved: the same groups
  scaled.optim.lr = 5e-4;
  scaled.optim.param_groups.at(1).lr = scaled.optim.param_groups.at(2).lr = 1e-3;
  const auto halved = diff_for_resume(saved, resolved_yaml(scaled));
  CHECK(halved.learning_rate == std::vector<std::string>{"optim.lr", "optim.param_groups"});
  CHECK_FALSE(halved.lr_regrouped);
  // Freezing another component is a different run, lr or not.
  RunConfig thaw = lower;
  thaw.optim.param_groups.at(0).freeze = false;
  const auto frozen = diff_for_resume(saved, resolved_yaml(thaw));
  CHECK(frozen.unsafe == std::vector<std::string>{"optim.param_groups"});
  CHECK(frozen.learning_rate == std::vector<std::string>{"optim.lr"});
  // The remedies a stopped run names: skip bad batches or non-finite steps, allow more of them.
  RunConfig skip = cfg;
  skip.train.on_bad_batch = "skip";
  skip.train.on_nonfinite = "skip";
  skip.train.max_skipped_steps = 7;
  const auto remedies = diff_for_resume(saved, resolved_yaml(skip));
  CHECK(remedies.unsafe.empty());
  CHECK(remedies.learning_rate.empty());
  CHECK(remedies.safe ==
        std::vector<std::string>{"train.max_skipped_steps", "train.on_bad_batch", "train.on_nonfinite"});
}

TEST_CASE("a component's defaults are written into the resolved config, and a changed default is a resume change",
          "[config][resume]") {
  TempDir d("cfg");
  write_file(d.file("p.yaml"), std::string(kMinimal) + "trainer: preference\nloss:\n  type: dpo\n  loss_type: ipo\n");
  const RunConfig c = load_run_config(d.file("p.yaml"));
  // The option written keeps its value; every other DpoOptions field appears with its default.
  CHECK(c.loss.options.find("loss_type")->scalar == "ipo");
  REQUIRE(c.loss.options.find("beta") != nullptr);
  CHECK(c.loss.options.find("beta")->scalar == "0.1");
  CHECK(c.loss.options.find("label_smoothing")->scalar == "0");
  CHECK(c.loss.options.find("reference_free")->scalar == "false");
  CHECK(c.loss.options.find("sft_weight")->scalar == "0");
  CHECK(c.model.projector.options.find("spatial_merge")->scalar == "1");
  CHECK(c.model.projector.options.find("position_encoding")->scalar == "none");
  const std::string yaml = resolved_yaml(c);
  CHECK_THAT(yaml, Catch::Contains("beta: 0.1"));

  // A checkpoint saved by a version whose default beta was 0.2 holds beta: 0.2; this version's
  // 0.1 is then a change that alters training, though neither config wrote beta.
  std::string older = yaml;
  const auto at = older.find("beta: 0.1\n");
  REQUIRE(at != std::string::npos);
  older.replace(at, std::string("beta: 0.1\n").size(), "beta: 0.2\n");
  CHECK(diff_for_resume(older, yaml).unsafe == std::vector<std::string>{"loss.beta"});
  // A checkpoint from before defaults were written (no beta at all) is no change.
  std::string bare = yaml;
  bare.erase(bare.find("  beta: 0.1\n"), std::string("  beta: 0.1\n").size());
  const auto same = diff_for_resume(bare, yaml);
  CHECK(same.unsafe.empty());
  CHECK(same.safe.empty());
}

TEST_CASE("a later layer that changes a section's type keeps the options both types take and leaves out the rest",
          "[config]") {
  TempDir d("cfg");
  write_file(d.file("v.yaml"), std::string(kMinimal) +
                                   "trainer: finetune\nmodel:\n  projector:\n    type: mlp2x_gelu\n    spatial_merge: 2\n");
  // --set TYPE.type=other: resampler takes no spatial_merge, so the file's option is left out
  // of the run and of the resolved config it saves (which must load again as it is).
  const RunConfig resampler = load_run_config(d.file("v.yaml"), {"model.projector.type=resampler"});
  CHECK(resampler.model.projector.type == "resampler");
  CHECK(resampler.model.projector.options.find("spatial_merge") == nullptr);
  CHECK(resampler.model.projector.options.find("num_queries") != nullptr);  // its own defaults, written in
  const std::string saved = resolved_yaml(resampler);
  CHECK_THAT(saved, !Catch::Contains("spatial_merge"));
  write_file(d.file("saved.yaml"), saved);
  CHECK(load_run_config(d.file("saved.yaml")).model.projector.type == "resampler");
  // linear takes spatial_merge too: the file's value stays.
  CHECK(load_run_config(d.file("v.yaml"), {"model.projector.type=linear"}).model.projector.options.find("spatial_merge")->scalar ==
        "2");
  // An unknown option written next to the new type is the user's own mistake: still an error.
  CHECK_THAT(error_of([&] {
               load_run_config(d.file("v.yaml"), {"model.projector.type=linear", "model.projector.spatial_merj=2"});
             }),
             Catch::Contains("--set model.projector.spatial_merj: model.projector.spatial_merj: unknown key 'spatial_merj'; did "
                             "you mean 'spatial_merge'?"));
  // So is a typo in the file under its own type, with no --set at all.
  write_file(d.file("typo.yaml"), std::string(kMinimal) +
                                      "trainer: finetune\nmodel:\n  projector:\n    type: mlp2x_gelu\n    spatial_merj: 2\n");
  CHECK_THAT(error_of([&] { load_run_config(d.file("typo.yaml"), {"model.projector.type=linear"}); }),
             Catch::Contains("typo.yaml:8:19: model.projector.spatial_merj: unknown key 'spatial_merj'"));

  // include: a preference config over a file that wrote mDPO's options. dpo shares beta, not
  // delta or the crop areas; a key the including file writes again is its own.
  write_file(d.file("mdpo.yaml"), std::string(kMinimal) +
                                      "trainer: preference\nloss:\n  type: mdpo\n  beta: 0.4\n  delta: 0.2\n"
                                      "  min_area: 0.1\n");
  write_file(d.file("dpo.yaml"), "include: mdpo.yaml\nloss:\n  type: dpo\n  sft_weight: 0.5\n");
  const RunConfig dpo = load_run_config(d.file("dpo.yaml"));
  CHECK(dpo.loss.type == "dpo");
  CHECK(dpo.loss.options.find("beta")->scalar == "0.4");
  CHECK(dpo.loss.options.find("sft_weight")->scalar == "0.5");
  CHECK(dpo.loss.options.find("delta") == nullptr);
  CHECK(dpo.loss.options.find("min_area") == nullptr);
  // ...and back again: an mdpo layer on top reads the mdpo options the first file wrote.
  const RunConfig back = load_run_config(d.file("dpo.yaml"), {"loss.type=mdpo"});
  REQUIRE(back.loss.type == "mdpo");
  CHECK(back.loss.options.find("delta")->scalar == "0.2");
  CHECK(back.loss.options.find("min_area")->scalar == "0.1");
  CHECK(back.loss.options.find("sft_weight") == nullptr);  // written for dpo by the --set before
  // A pipeline stage's set: {loss.type: dpo} does the same.
  write_file(d.file("p.yaml"), "name: p\nout_dir: " + d.file("out") + "\nstages:\n  - {name: a, config: " +
                                   d.file("mdpo.yaml") + ", set: {loss.type: dpo}}\n");
  const PipelinePlan plan = load_pipeline(d.file("p.yaml"));
  CHECK(plan.stages.at(0).loss.type == "dpo");
  CHECK(plan.stages.at(0).loss.options.find("beta")->scalar == "0.4");
  CHECK(plan.stages.at(0).loss.options.find("delta") == nullptr);
}
