#include "trainers/report.h"

#include <fmt/format.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/checkpoint.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

const cv::Scalar kPalette[] = {{180, 119, 31}, {14, 127, 255}, {44, 160, 44},   {40, 39, 214},
                               {189, 103, 148}, {75, 86, 140},  {194, 119, 227}, {127, 127, 127},
                               {34, 189, 188},  {207, 190, 23}, {0, 0, 0},       {120, 200, 255},
                               // six more, so the across-stages plot (up to ~18 curves) repeats none
                               {0, 0, 139},     {0, 128, 128},  {128, 0, 0},     {128, 128, 0},
                               {255, 0, 255},   {42, 42, 165}};

std::string tick(double v) {
  const double a = std::abs(v);
  if (a != 0 && (a < 0.01 || a >= 1e5)) return fmt::format("{:.1e}", v);
  return fmt::format("{:.3g}", v);
}

bool ends_with(const std::string& key, const std::string& suffix) {
  return key.size() >= suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_count(const std::string& key) {
  const auto slash = key.rfind('/');
  const std::string last = slash == std::string::npos ? key : key.substr(slash + 1);
  return last == "records" || last == "pairs" || last == "probes";
}

void flatten_into(const nlohmann::json& j, const std::string& prefix, std::map<std::string, double>& out) {
  for (const auto& [k, v] : j.items()) {
    const std::string key = prefix.empty() ? k : prefix + "/" + k;
    if (v.is_object()) flatten_into(v, key, out);
    else if (v.is_number() && !is_count(key)) out[key] = v.get<double>();
  }
}

// The stage's metrics.jsonl: training loss per logged step, and held-out metrics per evaluation.
struct StageCurves {
  PlotSeries loss{"training loss", {}, {}};
  std::map<std::string, PlotSeries> eval;  // flat key -> curve
};
StageCurves read_curves(const std::string& metrics_path) {
  StageCurves c;
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json r;
    try {
      r = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;  // a line cut by a crash: the rest of the file still plots
    }
    if (!r.is_object() || !r.contains("step") || !r["step"].is_number()) continue;
    const double step = r["step"].get<double>();
    if (r.value("split", "") == "train" && r.contains("loss") && r["loss"].is_number()) {
      c.loss.x.push_back(step);
      c.loss.y.push_back(r["loss"].get<double>());
    } else if (r.value("split", "") == "val" && r.contains("eval")) {
      std::map<std::string, double> flat;
      flatten_into(r["eval"], "", flat);
      for (const auto& [k, v] : flat) {
        auto& s = c.eval[k];
        s.name = k;
        s.x.push_back(step);
        s.y.push_back(v);
      }
    }
  }
  return c;
}

// Headline metrics of a stage's evaluation, for the plots (the table has them all).
bool headline(const std::string& key) {
  static const char* keys[] = {"i2t/R@1", "i2t/R@5", "t2i/R@5", "alignment/mutual_knn@10", "alignment/cka",
                               "negatives/all"};
  for (const char* k : keys)
    if (key == k) return true;
  auto ends = [&](const std::string& s) { return ends_with(key, s); };
  return ends("/exact_match") || ends("caption/object_precision") || ends("pope/accuracy") || ends("caption/chair_i") ||
         ends("caption/chair_s") || ends("caption/chair_r") ||
         ends("pope/object/hallucination_rate") || ends("pope/attribute/hallucination_rate") ||
         ends("pope/relation/hallucination_rate") || ends("/likelihood_accuracy");
}

// The summary's metrics: the headline ones, and CHAIR_i split by level.
bool summary_metric(const std::string& key) {
  return headline(key) || ends_with(key, "caption/chair_i/object") || ends_with(key, "caption/chair_i/attribute") ||
         ends_with(key, "probes/pope/yes_ratio");
}

// Neither better nor worse when it moves: how often the model answers "yes" (a model that never
// does has no hallucination rate to speak of, which this row shows beside it).
bool neutral(const std::string& key) { return ends_with(key, "yes_ratio"); }

// Hallucination rates and losses fall when a model improves; the other summary metrics rise.
bool lower_is_better(const std::string& key) {
  return key.find("hallucination_rate") != std::string::npos || key.find("chair_") != std::string::npos ||
         ends_with(key, "loss");
}

}  // namespace

void draw_line_plot(const std::string& path, const std::string& title, const std::string& x_label,
                    const std::vector<PlotSeries>& series_in, int width, int height,
                    const std::vector<std::string>& x_names) {
  std::vector<PlotSeries> series;
  for (const auto& s : series_in)
    if (!s.x.empty() && s.x.size() == s.y.size()) series.push_back(s);
  cv::Mat img(height, width, CV_8UC3, cv::Scalar(255, 255, 255));
  const int left = 70, right = 250, top = 40, bottom = 50;
  const cv::Rect area(left, top, width - left - right, height - top - bottom);
  const auto font = cv::FONT_HERSHEY_SIMPLEX;
  cv::putText(img, title, {left, 25}, font, 0.55, {0, 0, 0}, 1, cv::LINE_AA);
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const auto& s : series)
    for (size_t i = 0; i < s.x.size(); ++i)
      if (std::isfinite(s.y[i])) {
        x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
        y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
      }
  cv::rectangle(img, area, {0, 0, 0}, 1);
  if (x0 > x1) {
    cv::putText(img, "no data", {area.x + 10, area.y + 30}, font, 0.5, {0, 0, 0}, 1, cv::LINE_AA);
  } else {
    if (!x_names.empty()) x0 = -0.25, x1 = static_cast<double>(x_names.size()) - 0.75;
    if (x1 == x0) x0 -= 0.5, x1 += 0.5;
    if (y1 == y0) y0 -= 0.5, y1 += 0.5;
    const double pad = 0.05 * (y1 - y0);
    y0 -= pad, y1 += pad;
    auto px = [&](double x, double y) {
      return cv::Point(area.x + static_cast<int>(std::lround((x - x0) / (x1 - x0) * area.width)),
                       area.y + area.height - static_cast<int>(std::lround((y - y0) / (y1 - y0) * area.height)));
    };
    for (int t = 0; t <= 4; ++t) {  // light grid with value labels
      const double yv = y0 + (y1 - y0) * t / 4, xv = x0 + (x1 - x0) * t / 4;
      const auto py = px(x0, yv), pxx = px(xv, y0);
      cv::line(img, {area.x, py.y}, {area.x + area.width, py.y}, {225, 225, 225}, 1);
      cv::putText(img, tick(yv), {5, py.y + 4}, font, 0.4, {60, 60, 60}, 1, cv::LINE_AA);
      if (x_names.empty())
        cv::putText(img, tick(xv), {pxx.x - 12, area.y + area.height + 16}, font, 0.4, {60, 60, 60}, 1, cv::LINE_AA);
    }
    for (size_t i = 0; i < x_names.size(); ++i) {
      const auto p = px(static_cast<double>(i), y0);
      cv::line(img, {p.x, area.y}, {p.x, area.y + area.height}, {235, 235, 235}, 1);
      cv::putText(img, x_names[i], {p.x - 4 * static_cast<int>(x_names[i].size()), area.y + area.height + 16}, font, 0.4,
                  {60, 60, 60}, 1, cv::LINE_AA);
    }
    cv::rectangle(img, area, {0, 0, 0}, 1);
    for (size_t k = 0; k < series.size(); ++k) {
      const auto colour = kPalette[k % (sizeof kPalette / sizeof kPalette[0])];
      const auto& s = series[k];
      std::vector<cv::Point> pts;
      for (size_t i = 0; i < s.x.size(); ++i)
        if (std::isfinite(s.y[i])) pts.push_back(px(s.x[i], s.y[i]));
      if (pts.size() > 1) cv::polylines(img, pts, false, colour, 2, cv::LINE_AA);
      if (pts.size() <= 12)
        for (const auto& p : pts) cv::circle(img, p, 3, colour, cv::FILLED, cv::LINE_AA);
      const int ly = top + 14 + static_cast<int>(k) * 18;
      cv::line(img, {width - right + 10, ly - 4}, {width - right + 30, ly - 4}, colour, 2);
      std::string name = s.name.size() > 30 ? "..." + s.name.substr(s.name.size() - 27) : s.name;
      cv::putText(img, name, {width - right + 36, ly}, font, 0.38, {0, 0, 0}, 1, cv::LINE_AA);
    }
  }
  cv::putText(img, x_label, {area.x + area.width / 2 - 20, height - 12}, font, 0.45, {0, 0, 0}, 1, cv::LINE_AA);
  if (!cv::imwrite(path, img)) throw std::runtime_error("cannot write plot '" + path + "'");
}

std::map<std::string, double> flatten_eval(const nlohmann::json& eval) {
  std::map<std::string, double> out;
  if (eval.is_object()) flatten_into(eval, "", out);
  return out;
}

std::string write_pipeline_report(const PipelinePlan& plan, const PipelineResult& result) {
  const fs::path root(plan.pipeline.out_dir), pics = root / "report";
  std::error_code ec;
  fs::create_directories(pics, ec);
  std::vector<std::string> names;
  std::map<std::string, StageCurves> curves;  // stage -> its metrics.jsonl, read once for table and plots
  std::vector<std::string> rows;              // metric keys in first-seen order
  // Table columns: a stage evaluated at step 0 (eval.at_start) gets a column for the model it was
  // handed as well, so the table itself shows what the stage changed (retrieval rising through
  // stage 1; stage 3's start column is stage 2's model on stage 3's question sets).
  std::vector<std::pair<std::string, std::map<std::string, double>>> columns;  // header -> metric -> value
  std::vector<std::string> plot_names;  // the columns' short names under the across-stages plot
  auto add_column = [&](std::string header, std::string short_name, std::map<std::string, double> values) {
    columns.emplace_back(std::move(header), std::move(values));
    plot_names.push_back(std::move(short_name));
  };
  for (size_t i = 0; i < plan.pipeline.stages.size(); ++i) {
    const std::string& name = plan.pipeline.stages[i].name;
    names.push_back(name);
    const auto metrics = root / name / "metrics.jsonl";
    if (fs::exists(metrics)) curves[name] = read_curves(metrics.string());
    const std::string header = name + " (" + plan.stages[i].trainer + ")";
    if (!result.stages.contains(name)) {  // not run yet: a column of "-"
      add_column(header, name, {});
      continue;
    }
    if (auto c = curves.find(name); c != curves.end()) {
      std::map<std::string, double> start;
      for (const auto& [k, s] : c->second.eval)
        if (!s.x.empty() && s.x.front() == 0) start[k] = s.y.front();
      if (!start.empty()) add_column(name + " start", "start", std::move(start));
    }
    auto final_eval = flatten_eval(result.stages[name].value("eval", nlohmann::json()));
    for (const auto& [k, v] : final_eval)
      if (std::find(rows.begin(), rows.end(), k) == rows.end()) rows.push_back(k);
    add_column(header, name, std::move(final_eval));
  }

  std::string md = "# Report: pipeline " + plan.pipeline.name + "\n\n";
  // What each stage changed, on its headline metrics: against its own start column where it has
  // one (the same held-out sets, scored on the model it was handed), else the column before it.
  std::string changes;
  for (size_t c = 1; c < columns.size(); ++c) {
    if (plot_names[c] == "start") continue;  // a start column is a "before", not a stage's result
    const auto& before = columns[c - 1].second;
    for (const auto& r : rows) {
      if (!summary_metric(r) || !before.count(r) || !columns[c].second.count(r)) continue;
      const double a = before.at(r), b = columns[c].second.at(r), delta = b - a;
      const bool better = lower_is_better(r) ? delta < 0 : delta > 0;
      changes += fmt::format("| {} | {} | {:.3f} | {:.3f} | {:+.3f}{} |\n", columns[c].first, r, a, b, delta,
                             delta == 0 || neutral(r) ? "" : better ? " (better)" : " (worse)");
    }
  }
  if (!changes.empty())
    md += "## What each stage changed\n\nHeadline held-out metrics of each stage against its own start (the "
          "model it was handed, on the same sets) where it evaluated at step 0, else against the column before "
          "it. A change of about one over the square root of a set's size is within the noise of that set; "
          "a hallucination rate of 0 from a model that says nothing (an empty caption, a \"yes\" ratio of 0) "
          "is no achievement.\n\n"
          "| stage | metric | before | after | change |\n|---|---|---:|---:|---|\n" +
          changes + "\n## Every metric\n\n";
  md += "Held-out metrics after every stage (from each stage's final evaluation; `-` = not measured by that "
        "stage). A \"start\" column is a stage's evaluation at step 0, of the model it was handed. Written by "
        "`trialign run`; the final numbers are also in `pipeline.json`.\n\n";
  md += "| metric |";
  for (const auto& c : columns) md += " " + c.first + " |";
  md += "\n|---|";
  for (size_t i = 0; i < columns.size(); ++i) md += "---:|";
  md += "\n";
  for (const auto& r : rows) {
    md += "| " + r + " |";
    for (const auto& c : columns)
      md += c.second.count(r) ? " " + fmt::format("{:.3f}", c.second.at(r)) + " |" : " - |";
    md += "\n";
  }

  // Headline metrics measured in two or more of the table's columns, one curve each over the
  // columns (a stage's start, then its end), so a stage's effect is the step between the two
  // points on the same held-out set; a metric in one column alone is in its stage's plot below.
  std::vector<PlotSeries> across;
  for (const auto& r : rows) {
    if (!headline(r)) continue;
    // A probe set's exact match is its yes/no accuracy: plotted once.
    const auto slash = r.rfind("/exact_match");
    if (slash != std::string::npos && std::find(rows.begin(), rows.end(), r.substr(0, slash) + "/pope/accuracy") != rows.end())
      continue;
    PlotSeries s{r, {}, {}};
    for (size_t i = 0; i < columns.size(); ++i)
      if (columns[i].second.count(r)) s.x.push_back(static_cast<double>(i)), s.y.push_back(columns[i].second.at(r));
    if (s.x.size() >= 2) across.push_back(s);
  }
  if (!across.empty()) {
    draw_line_plot((pics / "stages.png").string(), "held-out metrics at the start and end of each stage", "stage",
                   across, 900, 460, plot_names);
    md += "\n## Across stages\n\n![metrics after each stage](report/stages.png)\n\n";
  }

  md += "## Per stage\n\n";
  for (size_t i = 0; i < names.size(); ++i) {
    const auto found = curves.find(names[i]);
    if (found == curves.end()) continue;
    const StageCurves& c = found->second;
    md += "### " + names[i] + " (" + plan.stages[i].trainer + ")\n\n";
    if (!c.loss.x.empty()) {
      const std::string f = names[i] + "_loss.png";
      draw_line_plot((pics / f).string(), names[i] + ": training loss", "step", {c.loss});
      md += "![" + names[i] + " training loss](report/" + f + ")\n";
    }
    std::vector<PlotSeries> held;
    for (const auto& [k, s] : c.eval)
      if (headline(k) && s.x.size() >= 2) held.push_back(s);
    if (!held.empty()) {
      const std::string f = names[i] + "_eval.png";
      draw_line_plot((pics / f).string(), names[i] + ": held-out metrics during training", "step", held);
      md += "![" + names[i] + " held-out metrics](report/" + f + ")\n";
    }
    md += "\n";
  }
  const std::string path = (root / "report.md").string();
  atomic_write_text(path, md);
  return path;
}

}  // namespace trialign
