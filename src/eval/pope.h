// Yes/no probe scoring (POPE, Li et al. 2023): a reply is "yes" or "no" by its first word after
// normalisation; anything else is unparsed and counts as wrong. For probes whose true answer is
// "no" (the thing asked about is absent or false), a "yes" is a hallucination.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

namespace trialign {

struct YesNoCounts {
  int64_t tp = 0;        // answer yes, said yes
  int64_t fn = 0;        // answer yes, said no
  int64_t fp = 0;        // answer no, said yes: a hallucination
  int64_t tn = 0;        // answer no, said no
  int64_t unparsed = 0;  // neither (counted in total, never right)
  void add(const std::string& reply, const std::string& answer);
  void merge(const YesNoCounts& o);
  int64_t total() const { return tp + fn + fp + tn + unparsed; }
  // accuracy, precision (of "yes"), recall (of yes probes), f1, yes_ratio (share of "yes"
  // replies), hallucination_rate (share of no probes answered "yes"), unparsed (share).
  nlohmann::json metrics() const;

 private:
  int64_t unparsed_yes_ = 0, unparsed_no_ = 0;  // unparsed replies by the probe's true answer
};

// "yes" / "no" / "" for a reply.
std::string yes_no_of(const std::string& reply);

// A probe's reply as the counts above read it, for `eval --predictions`: {"said": "yes" | "no" |
// "" (unparsed), "hallucination": a "yes" to a probe whose answer is "no"}. Exact match can call
// "yes, it is" wrong where the probe score counts it as a "yes".
nlohmann::json yes_no_prediction(const std::string& reply, const std::string& answer);

}  // namespace trialign
