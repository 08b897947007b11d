// A pipeline's report: OUT/report.md with every held-out metric after every stage, and PNG plots
// in OUT/report/ (each stage's training loss and held-out metrics over its steps, and headline
// metrics across stages), drawn with OpenCV so no plotting stack is needed.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "trainers/pipeline.h"

namespace trialign {

// One curve of a line plot.
struct PlotSeries {
  std::string name;
  std::vector<double> x, y;
};

// Draws the series (a grid with value labels, a legend, one colour each) into a PNG of
// width x height pixels. With x_names, x is an index and tick i is labelled x_names[i]. Series
// without points are left out; throws std::runtime_error naming the path when the file cannot
// be written.
void draw_line_plot(const std::string& path, const std::string& title, const std::string& x_label,
                    const std::vector<PlotSeries>& series, int width = 760, int height = 420,
                    const std::vector<std::string>& x_names = {});

// Every numeric held-out metric of a stage's final evaluation as flat keys ("vqa/exact_match",
// "i2t/R@5"); counts (records, pairs, probes) are left out.
std::map<std::string, double> flatten_eval(const nlohmann::json& eval);

// Writes OUT/report.md and OUT/report/*.png for a pipeline's result; returns the report's path.
std::string write_pipeline_report(const PipelinePlan& plan, const PipelineResult& result);

}  // namespace trialign
