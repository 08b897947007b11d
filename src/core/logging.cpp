#include "core/logging.h"
#include "core/checkpoint.h"
#include "core/errors.h"
#include "core/json_text.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

namespace trialign {

void init_logging(const std::string& log_file, int rank) {
  std::vector<spdlog::sink_ptr> sinks;
  sinks.push_back(std::make_shared<spdlog::sinks::stderr_color_sink_mt>());
  if (!log_file.empty() && rank == 0) {
    try {
      sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(log_file, /*truncate=*/false));
    } catch (const spdlog::spdlog_ex& e) {
      throw std::runtime_error("cannot open log file '" + log_file + "': " + e.what());
    }
  }
  auto logger = std::make_shared<spdlog::logger>("trialign", sinks.begin(), sinks.end());
  logger->set_pattern(rank == 0 ? "[%Y-%m-%d %H:%M:%S] [%^%l%$] %v"
                                : "[%Y-%m-%d %H:%M:%S] [rank " + std::to_string(rank) + "] [%^%l%$] %v");
  logger->set_level(rank == 0 ? spdlog::level::info : spdlog::level::warn);
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

MetricsLog::MetricsLog(const std::string& path) : out_(path, std::ios::app) {
  if (!out_) throw std::runtime_error("cannot open metrics file '" + path + "'");
}

void MetricsLog::write(const nlohmann::json& record) {
  if (!out_.is_open()) return;
  out_ << json_text(record) << '\n';
  out_.flush();
}

void truncate_metrics_after(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  bool dropped = false;
  while (std::getline(in, line)) {
    try {
      auto j = nlohmann::json::parse(line);
      if (j.value("step", int64_t{0}) <= step) kept += line + "\n";
      else dropped = true;
    } catch (const nlohmann::json::exception&) {
      dropped = true;  // a line cut by a crash mid-write: drop it
    }
  }
  in.close();
  if (!dropped) return;
  // Written whole beside it, synced, then renamed over it: a full disk or a crash leaves the old
  // history in place, never a part of it.
  try {
    atomic_write_text(path, kept);
  } catch (const std::exception& e) {
    throw DataError("cannot drop the records after step " + std::to_string(step) + " from " + path + " (" + e.what() +
                    "); the file is unchanged. Free space or fix the folder's permissions, then resume again");
  }
}

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e8) return "?";
  char buf[32];
  const long t = static_cast<long>(s + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
  else if (t >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

Progress::Progress(int64_t first_step, int64_t total_steps)
    : first_(first_step), total_(total_steps), start_(std::chrono::steady_clock::now()) {}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string Progress::line(int64_t step_done, int64_t samples_per_step) const {
  const double el = elapsed() - std::chrono::duration<double>(paused_).count();
  const int64_t done_here = step_done - first_;
  const double steps_per_s = done_here > 0 && el > 0 ? done_here / el : 0;
  const double eta = steps_per_s > 0 ? (total_ - step_done) / steps_per_s : -1;
  char buf[160];
  std::snprintf(buf, sizeof buf, "step %lld/%lld (%d%%) | %.1f samples/s | ETA %s",
                static_cast<long long>(step_done), static_cast<long long>(total_),
                static_cast<int>(100.0 * step_done / std::max<int64_t>(1, total_)), steps_per_s * samples_per_step,
                format_duration(eta).c_str());
  return buf;
}

ProgressLog::ProgressLog(std::string what, std::string unit, int64_t total, double every_s)
    : what_(std::move(what)),
      unit_(std::move(unit)),
      total_(total),
      every_s_(every_s),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

void ProgressLog::update(int64_t done) {
  const auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_).count() < every_s_ || done >= total_) return;
  last_ = now;
  const double el = std::chrono::duration<double>(now - start_).count();
  const double rate = el > 0 ? done / el : 0;
  spdlog::info("{}: {}/{} {} ({}%) | {:.1f} {}/s | ETA {}", what_, done, total_, unit_,
               static_cast<int>(100.0 * done / std::max<int64_t>(1, total_)), rate, unit_,
               format_duration(rate > 0 ? (total_ - done) / rate : -1));
}

}  // namespace trialign
