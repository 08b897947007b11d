#include "losses/rewards.h"

#include <sstream>

#include "eval/answers.h"

namespace trialign {

std::vector<double> ExactMatchRewardImpl::score(const std::vector<RewardInput>& in) const {
  std::vector<double> out;
  for (const auto& x : in) out.push_back(normalise_reply(x.completion) == normalise_reply(x.answer) ? 1.0 : 0.0);
  return out;
}

std::vector<double> FormatRewardImpl::score(const std::vector<RewardInput>& in) const {
  std::vector<double> out;
  for (const auto& x : in) {
    std::istringstream words(x.completion);
    int64_t n = 0;
    for (std::string w; words >> w;) ++n;
    const bool ok = x.finished && n > 0 && x.completion.find('\n') == std::string::npos && (max_words_ == 0 || n <= max_words_);
    out.push_back(ok ? 1.0 : 0.0);
  }
  return out;
}

std::vector<double> total_rewards(const std::vector<std::pair<std::string, std::shared_ptr<RewardFnImpl>>>& fns,
                                  const std::vector<RewardInput>& in, std::map<std::string, double>* means) {
  std::vector<double> total(in.size(), 0.0);
  for (const auto& [name, fn] : fns) {
    const auto s = fn->score(in);
    if (s.size() != in.size())
      throw std::runtime_error("reward function '" + name + "' returned " + std::to_string(s.size()) + " scores for " +
                               std::to_string(in.size()) + " completions");
    double sum = 0;
    for (size_t i = 0; i < s.size(); ++i) total[i] += fn->weight * s[i], sum += s[i];
    if (means) (*means)[name] = in.empty() ? 0.0 : sum / static_cast<double>(in.size());
  }
  return total;
}

namespace {

double read_weight(ConfigReader& r) {
  double w = 1.0;
  r("weight", w);
  return w;
}

}  // namespace

TRIALIGN_REGISTER(reward_functions(), "exact_match", "1 when the completion equals the answer (normalised), else 0",
                  [](ConfigReader& r) -> std::shared_ptr<RewardFnImpl> {
                    auto f = std::make_shared<ExactMatchRewardImpl>();
                    f->weight = read_weight(r);
                    return f;
                  });

TRIALIGN_REGISTER(reward_functions(), "format",
                  "1 when the completion ends by itself, is one line and has at most max_words words",
                  [](ConfigReader& r) -> std::shared_ptr<RewardFnImpl> {
                    int64_t max_words = 0;
                    r("max_words", max_words, at_least(0));
                    auto f = std::make_shared<FormatRewardImpl>(max_words);
                    f->weight = read_weight(r);
                    return f;
                  });

}  // namespace trialign
