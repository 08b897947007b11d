// Logging: spdlog to the console and to RUN/train.log; metrics to RUN/metrics.jsonl (one JSON
// object per logged step); a progress line with step/total, rate and ETA.
#pragma once
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>

namespace trialign {

// Sets up the default spdlog logger. With a log_file, lines also go there (appended, so a
// resumed run keeps its history). Non-zero ranks log warnings and errors only.
void init_logging(const std::string& log_file = "", int rank = 0);

class MetricsLog {
 public:
  MetricsLog() = default;
  explicit MetricsLog(const std::string& path);  // appends
  void write(const nlohmann::json& record);
  bool enabled() const { return out_.is_open(); }

 private:
  std::ofstream out_;
};

// On resume from `step`: drops the records of steps after it (they are about to be redone), so
// metrics.jsonl reads as one uninterrupted run.
void truncate_metrics_after(const std::string& path, int64_t step);

std::string format_duration(double seconds);  // "1h02m", "3m12s", "45s"

// Rate and ETA over the steps run in this process (resumed steps do not inflate the rate).
class Progress {
 public:
  Progress(int64_t first_step, int64_t total_steps);
  // "step 120/1000 (12%) | 85.2 samples/s | ETA 3m12s"
  std::string line(int64_t step_done, int64_t samples_per_step) const;
  double elapsed() const;  // wall time since construction, evaluations included

  // While the returned guard lives (an evaluation), the clock behind samples/s and the ETA stops:
  // a minute-long evaluation at step 0 would otherwise read as a training rate a tenth of the real one.
  class Pause {
   public:
    explicit Pause(Progress& p) : p_(p), t0_(std::chrono::steady_clock::now()) {}
    ~Pause() { p_.paused_ += std::chrono::steady_clock::now() - t0_; }
    Pause(const Pause&) = delete;
    Pause& operator=(const Pause&) = delete;

   private:
    Progress& p_;
    std::chrono::steady_clock::time_point t0_;
  };
  Pause pause() { return Pause(*this); }

 private:
  int64_t first_, total_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::duration paused_{0};
};

// A long loop outside the training steps (an evaluation, a reference cache being filled): one
// log line at most every `every_s` seconds, so that a minute-long evaluation is not a minute of
// silence; a loop shorter than that logs nothing.
//   "evaluation: 1200/6545 records (18%) | 181.3 records/s | ETA 29s"
class ProgressLog {
 public:
  ProgressLog(std::string what, std::string unit, int64_t total, double every_s = 15.0);
  void update(int64_t done);

 private:
  std::string what_, unit_;
  int64_t total_;
  double every_s_;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace trialign
