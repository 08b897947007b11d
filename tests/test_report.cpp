// What a person reads: the pipeline report (every metric after every stage in one table, plots
// drawn from the stages' metrics logs), and the progress lines of long evaluations.
#include <catch2/catch.hpp>

#include <opencv2/imgcodecs.hpp>

#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <sstream>

#include "core/checkpoint.h"
#include "core/logging.h"
#include "pipeline_fixtures.h"
#include "test_helpers.h"
#include "trainers/report.h"

using namespace trialign;
using trialign::test::TempDir;
using trialign::test::write_file;
namespace fs = std::filesystem;

TEST_CASE("pipeline report: a table of every metric per stage, curves from metrics.jsonl", "[report]") {
  TempDir d("report");
  const auto plan = test::demo_plan(d.path.string(), {{"s1", "contrastive"}, {"s3", "finetune"}, {"s4", "preference"}});
  PipelineResult r;
  r.stages["s1"]["eval"] = {{"i2t/R@5", 0.9}, {"alignment/mutual_knn@10", 0.25}, {"pairs", 100}};
  r.stages["s3"]["eval"]["vqa"] = {{"exact_match", 0.75}, {"records", 8}};
  r.stages["s3"]["eval"]["probes"] = {{"pope/accuracy", 0.5}, {"pope/object/hallucination_rate", 0.5}, {"probes", 16},
                                      {"pope/yes_ratio", 0.75}};
  r.stages["s4"]["eval"]["vqa"] = {{"exact_match", 0.8}};
  r.stages["s4"]["eval"]["probes"] = {{"pope/accuracy", 0.625}, {"pope/object/hallucination_rate", 0.25},
                                      {"pope/yes_ratio", 0.5}};
  // Stage 1's log: an evaluation at step 0 (eval.at_start), three training steps, two more
  // evaluations, and a line cut off by a crash.
  write_file(d.file("s1/metrics.jsonl"),
             R"({"step": 0, "split": "val", "eval": {"i2t/R@5": 0.125, "alignment/mutual_knn@10": 0.05}}
{"step": 1, "split": "train", "loss": 2.0}
{"step": 2, "split": "train", "loss": 1.5}
{"step": 2, "split": "val", "eval": {"i2t/R@5": 0.5, "alignment/mutual_knn@10": 0.1}}
{"step": 3, "split": "train", "loss": 1.0}
{"step": 3, "split": "val", "eval": {"i2t/R@5": 0.9, "alignment/mutual_knn@10": 0.25}}
{"step": 4, "split": "tra)");

  const std::string path = write_pipeline_report(plan, r);
  CHECK(path == d.file("report.md"));
  const std::string md = read_text_file(path);
  // s1 evaluated at step 0, so it has a start column (the model it was handed) before its final one.
  CHECK_THAT(md, Catch::Contains(
                     "| metric | s1 start | s1 (contrastive) | s3 (finetune) | s4 (preference) |\n|---|---:|---:|---:|---:|\n"));
  CHECK_THAT(md, Catch::Contains("| i2t/R@5 | 0.125 | 0.900 | - | - |\n"));
  // The summary before the table: each stage against its start column, else the column before it
  // (s4 against s3), on the headline metrics; a hallucination rate that falls is "better".
  CHECK_THAT(md, Catch::Contains("## What each stage changed\n"));
  CHECK_THAT(md, Catch::Contains("| s1 (contrastive) | alignment/mutual_knn@10 | 0.050 | 0.250 | +0.200 (better) |\n| s1 "
                                 "(contrastive) | i2t/R@5 | 0.125 | 0.900 | +0.775 (better) |\n"));
  CHECK_THAT(md, Catch::Contains("| s4 (preference) | vqa/exact_match | 0.750 | 0.800 | +0.050 (better) |\n"));
  CHECK_THAT(md, Catch::Contains("| s4 (preference) | probes/pope/object/hallucination_rate | 0.500 | 0.250 | -0.250 (better) |\n"));
  CHECK_THAT(md, Catch::Contains("| s4 (preference) | probes/pope/yes_ratio | 0.750 | 0.500 | -0.250 |\n"));  // neutral
  CHECK_THAT(md, !Catch::Contains("\n| s3 (finetune) | "));  // no row: nothing in common with s1's column
  CHECK(md.find("## What each stage changed") < md.find("## Every metric"));
  CHECK_THAT(md, Catch::Contains("| alignment/mutual_knn@10 | 0.050 | 0.250 | - | - |\n"));
  CHECK_THAT(md, Catch::Contains("| vqa/exact_match | - | - | 0.750 | 0.800 |\n"));
  CHECK_THAT(md, Catch::Contains("| probes/pope/object/hallucination_rate | - | - | 0.500 | 0.250 |\n"));
  CHECK_THAT(md, !Catch::Contains("records") && !Catch::Contains("probes/probes") && !Catch::Contains("| pairs"));
  CHECK_THAT(md, Catch::Contains("![s1 training loss](report/s1_loss.png)"));
  CHECK_THAT(md, Catch::Contains("![s1 held-out metrics](report/s1_eval.png)"));
  CHECK_THAT(md, Catch::Contains("![metrics after each stage](report/stages.png)"));

  for (const char* f : {"report/s1_loss.png", "report/s1_eval.png", "report/stages.png"}) {
    INFO(f);
    const cv::Mat img = cv::imread(d.file(f));
    REQUIRE_FALSE(img.empty());
    // The first series' colour (BGR 180, 119, 31) is on the canvas: a curve was drawn.
    int64_t curve = 0;
    for (int y = 0; y < img.rows; ++y)
      for (int x = 0; x < img.cols; ++x) curve += img.at<cv::Vec3b>(y, x) == cv::Vec3b(180, 119, 31);
    CHECK(curve > 50);
  }
  CHECK(cv::imread(d.file("report/s1_loss.png")).cols == 760);  // the default width
  CHECK_FALSE(fs::exists(d.file("report/s3_loss.png")));  // no log for s3 here

  const auto flat = flatten_eval({{"vqa", {{"exact_match", 0.5}, {"records", 3}}}, {"loss", 1.25}});
  CHECK(flat == std::map<std::string, double>{{"vqa/exact_match", 0.5}, {"loss", 1.25}});
}

TEST_CASE("progress lines of a long loop: count, share, rate and ETA, at most one per interval", "[report][logging]") {
  std::ostringstream os;
  auto previous = spdlog::default_logger();
  auto capture = std::make_shared<spdlog::logger>("capture", std::make_shared<spdlog::sinks::ostream_sink_mt>(os));
  capture->set_pattern("%v");
  spdlog::set_default_logger(capture);
  {
    ProgressLog hourly("evaluation", "records", 10, 3600.0);
    hourly.update(5);  // inside its interval: nothing
    ProgressLog every("evaluation", "records", 10, 0.0);
    every.update(4);
    every.update(10);  // finished: the caller reports the result, not a progress line
  }
  spdlog::set_default_logger(previous);
  const std::string text = os.str();
  CHECK(std::count(text.begin(), text.end(), '\n') == 1);
  CHECK_THAT(text, Catch::StartsWith("evaluation: 4/10 records (40%) | ") && Catch::Contains(" records/s | ETA "));
}
