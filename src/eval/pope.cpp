#include "eval/pope.h"

#include "eval/answers.h"

namespace trialign {

std::string yes_no_of(const std::string& reply) {
  const std::string r = normalise_reply(reply);
  const auto end = r.find_first_of(" ,.!");
  const std::string first = r.substr(0, end);
  return first == "yes" || first == "no" ? first : "";
}

nlohmann::json yes_no_prediction(const std::string& reply, const std::string& answer) {
  const std::string said = yes_no_of(reply);
  return {{"said", said}, {"hallucination", answer != "yes" && said == "yes"}};
}

void YesNoCounts::add(const std::string& reply, const std::string& answer) {
  const std::string said = yes_no_of(reply);
  const bool truth = answer == "yes";
  if (said.empty()) ++unparsed;
  else if (truth) ++(said == "yes" ? tp : fn);
  else ++(said == "yes" ? fp : tn);
  // An unparsed reply to a yes probe also misses it (recall's denominator is every yes probe).
  if (said.empty() && truth) ++unparsed_yes_;
  if (said.empty() && !truth) ++unparsed_no_;
}

void YesNoCounts::merge(const YesNoCounts& o) {
  tp += o.tp, fn += o.fn, fp += o.fp, tn += o.tn, unparsed += o.unparsed;
  unparsed_yes_ += o.unparsed_yes_, unparsed_no_ += o.unparsed_no_;
}

nlohmann::json YesNoCounts::metrics() const {
  auto ratio = [](double a, double b) { return b > 0 ? a / b : 0.0; };
  const double n = static_cast<double>(total());
  const double precision = ratio(tp, tp + fp);
  const double recall = ratio(tp, tp + fn + unparsed_yes_);
  return {{"accuracy", ratio(tp + tn, n)},
          {"precision", precision},
          {"recall", recall},
          {"f1", ratio(2 * precision * recall, precision + recall)},
          {"yes_ratio", ratio(tp + fp, n)},
          {"hallucination_rate", ratio(fp, fp + tn + unparsed_no_)},
          {"unparsed", ratio(unparsed, n)},
          {"probes", total()}};
}

}  // namespace trialign
