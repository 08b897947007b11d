// Built-in GRPO reward functions (registry: reward_functions(), config list `rewards:`):
//   exact_match  1 when the completion equals the record's answer after normalise_reply
//                (lower case, spaces and a final period trimmed), else 0
//   format       1 when the completion ended on its own (end-of-sequence before max_new_tokens),
//                is one line, and has at most max_words words (0 = any number), else 0
// Every reward takes `weight` (default 1); the reward of a completion is the weighted sum.
#pragma once
#include "losses/preference.h"

namespace trialign {

class ExactMatchRewardImpl : public RewardFnImpl {
 public:
  std::vector<double> score(const std::vector<RewardInput>& in) const override;
};

class FormatRewardImpl : public RewardFnImpl {
 public:
  explicit FormatRewardImpl(int64_t max_words) : max_words_(max_words) {}
  std::vector<double> score(const std::vector<RewardInput>& in) const override;

 private:
  int64_t max_words_;
};

// Weighted sum of every function's scores, plus each function's mean (by type) for the logs.
std::vector<double> total_rewards(const std::vector<std::pair<std::string, std::shared_ptr<RewardFnImpl>>>& fns,
                                  const std::vector<RewardInput>& in, std::map<std::string, double>* means);

}  // namespace trialign
