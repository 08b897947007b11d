// Preference losses against hand-worked values (REFERENCES.md worked checks and ones derived
// here in the comments), and the reward functions.
#include <catch2/catch.hpp>

#include <cmath>

#include "core/config_tree.h"
#include "losses/dpo.h"
#include "losses/grpo.h"
#include "losses/mdpo.h"
#include "losses/rewards.h"

using namespace trialign;
using Catch::Matchers::WithinAbs;

namespace {

// N sequences of per-token log-probs (ragged; padded with mask 0).
SequenceLogps tokens(const std::vector<std::vector<float>>& rows) {
  size_t T = 1;
  for (const auto& r : rows) T = std::max(T, r.size());
  auto lp = torch::zeros({static_cast<int64_t>(rows.size()), static_cast<int64_t>(T)});
  auto mask = torch::zeros_like(lp);
  for (size_t i = 0; i < rows.size(); ++i)
    for (size_t t = 0; t < rows[i].size(); ++t) {
      lp[i][t] = rows[i][t];
      mask[i][t] = 1;
    }
  return {lp.requires_grad_(), mask};
}
// One token per sequence carrying the whole sequence log-prob.
SequenceLogps sums(const std::vector<float>& s) {
  std::vector<std::vector<float>> rows;
  for (float v : s) rows.push_back({v});
  return tokens(rows);
}

std::shared_ptr<PreferenceLossImpl> make(const std::string& type, const std::string& yaml) {
  TypedSpec spec{type, parse_config_string(yaml.empty() ? "{}" : yaml, "test"), "loss"};
  spec.options.kind = ConfigNode::Kind::Map;
  return preference_losses().create_or_throw(spec);
}

double value(const LossOutput& o) { return o.loss.item<double>(); }
double metric(const LossOutput& o, const std::string& k) { return o.metrics.at(k).item<double>(); }

// The worked check: beta 0.1, policy (chosen, rejected) = (-10, -12), reference (-11, -11): D = 2.
PreferenceInputs worked_pair() {
  PreferenceInputs in;
  in.logps["policy/chosen"] = sums({-10});
  in.logps["policy/rejected"] = sums({-12});
  in.logps["reference/chosen"] = sums({-11});
  in.logps["reference/rejected"] = sums({-11});
  return in;
}

}  // namespace

TEST_CASE("dpo: sigmoid, label smoothing, robust and hinge on the worked pair (D = 2, beta 0.1)", "[preference][losses]") {
  const auto in = worked_pair();
  CHECK_THAT(value(make("dpo", "")->forward(in)), WithinAbs(0.598139, 1e-6));  // -log sig(0.2)
  CHECK_THAT(value(make("dpo", "{label_smoothing: 0.1}")->forward(in)), WithinAbs(0.618139, 1e-6));
  CHECK_THAT(value(make("dpo", "{loss_type: robust, label_smoothing: 0.1}")->forward(in)), WithinAbs(0.573139, 1e-6));
  CHECK_THAT(value(make("dpo", "{loss_type: hinge}")->forward(in)), WithinAbs(0.8, 1e-6));
  const auto out = make("dpo", "")->forward(in);
  CHECK_THAT(metric(out, "rewards/chosen"), WithinAbs(0.1, 1e-6));     // 0.1 (-10 + 11)
  CHECK_THAT(metric(out, "rewards/rejected"), WithinAbs(-0.1, 1e-6));  // 0.1 (-12 + 11)
  CHECK_THAT(metric(out, "rewards/margins"), WithinAbs(0.2, 1e-6));
  CHECK_THAT(metric(out, "rewards/accuracies"), WithinAbs(1.0, 1e-9));
  CHECK_THAT(metric(out, "logps/chosen"), WithinAbs(-10, 1e-6));
  // Half of the step: loss and additive metrics halve.
  auto half = in;
  half.share = 0.5;
  CHECK_THAT(value(make("dpo", "")->forward(half)), WithinAbs(0.598139 / 2, 1e-6));
  CHECK_THAT(metric(make("dpo", "")->forward(half), "rewards/chosen"), WithinAbs(0.05, 1e-6));
}

TEST_CASE("dpo: ipo on per-token means, reference-free, and the SFT term", "[preference][losses]") {
  PreferenceInputs in;
  // policy chosen mean -2, rejected mean -4; reference chosen mean -2, rejected mean -3:
  // D_mean = (-2 + 4) - (-2 + 3) = 1; ipo = (1 - 1 / 0.2)^2 = 16.
  in.logps["policy/chosen"] = tokens({{-1, -3}});
  in.logps["policy/rejected"] = tokens({{-2, -4, -6}});
  in.logps["reference/chosen"] = tokens({{-2, -2}});
  in.logps["reference/rejected"] = tokens({{-3, -3, -3}});
  CHECK_THAT(value(make("dpo", "{loss_type: ipo}")->forward(in)), WithinAbs(16.0, 1e-5));

  // Reference-free: D = -10 + 12 = 2 as in the worked pair, and no reference pass requested.
  auto free = make("dpo", "{reference_free: true}");
  CHECK(free->passes().size() == 2);
  CHECK_FALSE(free->needs_reference());
  PreferenceInputs only_policy;
  only_policy.logps["policy/chosen"] = sums({-10});
  only_policy.logps["policy/rejected"] = sums({-12});
  CHECK_THAT(value(free->forward(only_policy)), WithinAbs(0.598139, 1e-6));

  // SFT: chosen sum -10 over the step's 2 chosen tokens -> NLL 5, weight 0.5 adds 2.5.
  auto sft_in = worked_pair();
  sft_in.logps["policy/chosen"] = tokens({{-4, -6}});  // sum -10 as before
  sft_in.step_response_tokens = 2;
  const auto out = make("dpo", "{sft_weight: 0.5}")->forward(sft_in);
  CHECK_THAT(metric(out, "sft_nll"), WithinAbs(5.0, 1e-6));  // 10 / 2
  CHECK_THAT(value(out), WithinAbs(0.598139 + 2.5, 1e-6));
}

TEST_CASE("dpo: the gradient of the sigmoid loss is -beta sig(-beta D) on the chosen log-prob", "[preference][losses]") {
  auto in = worked_pair();
  make("dpo", "")->forward(in).loss.backward();
  const double g = -0.1 / (1 + std::exp(0.2));  // -beta * sigmoid(-0.2)
  CHECK_THAT(in.logps["policy/chosen"].token_logps.grad()[0][0].item<double>(), WithinAbs(g, 1e-6));
  CHECK_THAT(in.logps["policy/rejected"].token_logps.grad()[0][0].item<double>(), WithinAbs(-g, 1e-6));
}

TEST_CASE("mdpo: DPO + conditional + anchor on the worked check is 1.863493", "[preference][losses]") {
  auto loss = make("mdpo", "");
  CHECK(loss->passes().size() == 6);
  auto in = worked_pair();
  in.logps["policy/chosen/corrupted"] = sums({-12});
  in.logps["reference/chosen/corrupted"] = sums({-11.5});
  const auto out = loss->forward(in);
  CHECK_THAT(value(out), WithinAbs(1.863493, 1e-6));
  CHECK_THAT(metric(out, "loss/dpo"), WithinAbs(0.598139, 1e-6));          // -log sig(0.2)
  CHECK_THAT(metric(out, "loss/conditional"), WithinAbs(0.620957, 1e-6));  // -log sig(0.1 (2 - 0.5))
  CHECK_THAT(metric(out, "loss/anchor"), WithinAbs(0.644397, 1e-6));       // -log sig(0.1)
  CHECK_THAT(metric(out, "rewards/imageless_chosen"), WithinAbs(-0.05, 1e-6));  // 0.1 (-12 + 11.5)
  CHECK_THAT(metric(out, "rewards/imageless_margins"), WithinAbs(0.15, 1e-6));
  // A pass the trainer did not run is named in the error.
  PreferenceInputs missing = worked_pair();
  CHECK_THROWS_WITH(loss->forward(missing), Catch::Contains("policy/chosen/corrupted"));
}

TEST_CASE("mdpo: pairs marked image_conditional false drop only the conditional term", "[preference][losses]") {
  // Two copies of the worked pair; the second is a "no" that stays right on the corrupted image.
  PreferenceInputs in;
  in.logps["policy/chosen"] = sums({-10, -10});
  in.logps["policy/rejected"] = sums({-12, -12});
  in.logps["reference/chosen"] = sums({-11, -11});
  in.logps["reference/rejected"] = sums({-11, -11});
  in.logps["policy/chosen/corrupted"] = sums({-12, -12});
  in.logps["reference/chosen/corrupted"] = sums({-11.5, -11.5});
  in.image_conditional = torch::tensor({1.0f, 0.0f});
  const auto out = make("mdpo", "")->forward(in);
  // pair 1: 0.598139 + 0.620957 + 0.644397 = 1.863493; pair 2: 0.598139 + 0 + 0.644397 = 1.242536
  CHECK_THAT(value(out), WithinAbs((1.863493 + 1.242536) / 2, 1e-6));
  CHECK_THAT(metric(out, "loss/conditional"), WithinAbs(0.620957 / 2, 1e-6));
  CHECK_THAT(metric(out, "loss/dpo"), WithinAbs(0.598139, 1e-6));
  // and no gradient reaches the second pair's corrupted-image log-prob
  out.loss.backward();
  const auto g = in.logps["policy/chosen/corrupted"].token_logps.grad();
  CHECK(g[0][0].item<double>() > 0);  // d loss / d x > 0: descent lowers the corrupted log-prob
  CHECK(g[1][0].item<double>() == 0.0);
}

TEST_CASE("mdpo: the corrupted image keeps 1-20% of the area and is reproducible", "[preference][losses]") {
  // A 20x20 image whose pixel value is 100 * row + column: the resized crop's extreme values give
  // the rows and columns it spans.
  auto rows = torch::arange(20, torch::kFloat32).view({20, 1}) * 100;
  auto grid = (rows + torch::arange(20, torch::kFloat32).view({1, 20})).view({1, 1, 20, 20}).expand({8, 3, 20, 20}).contiguous();
  auto loss = make("mdpo", "");
  const auto a = loss->corrupt_images(grid, 7), b = loss->corrupt_images(grid, 7), c = loss->corrupt_images(grid, 8);
  CHECK(a.sizes() == grid.sizes());
  CHECK(torch::equal(a, b));
  CHECK_FALSE(torch::equal(a, c));
  for (int64_t i = 0; i < 8; ++i) {
    const auto img = a[i][0];
    const double lo = img.min().item<double>(), hi = img.max().item<double>();
    const int64_t h = static_cast<int64_t>(std::lround(std::floor(hi / 100) - std::floor(lo / 100))) + 1;
    const int64_t w = static_cast<int64_t>(std::lround(std::fmod(hi, 100.0) - std::fmod(lo, 100.0))) + 1;
    INFO("crop " << i << ": " << h << " x " << w);
    // 1%..20% of 400 pixels is 4..80, with rounding of each side to whole pixels.
    CHECK(h * w >= 2);
    CHECK(h * w <= 90);
    CHECK(h <= 11);  // aspect 3/4..4/3 at 80 pixels: sides at most sqrt(80 * 4/3) ~ 10.3
    CHECK(w <= 11);
  }
}

TEST_CASE("grpo: group-normalised advantages and the k3 KL (worked checks)", "[preference][losses]") {
  const auto r = torch::tensor({1.f, 0.f, 0.f, 1.f});
  const auto a = grpo_advantages(r, 4, "group");
  CHECK_THAT(a[0].item<double>(), WithinAbs(0.865875, 1e-6));
  CHECK_THAT(a[1].item<double>(), WithinAbs(-0.865875, 1e-6));
  CHECK_THAT(grpo_advantages(r, 4, "none")[0].item<double>(), WithinAbs(0.5, 1e-9));
  // Batch scaling over two groups [1,0,0,1], [1,1,1,0]: std over all eight 0.517549.
  const auto ab = grpo_advantages(torch::tensor({1.f, 0.f, 0.f, 1.f, 1.f, 1.f, 1.f, 0.f}), 4, "batch");
  CHECK_THAT(ab[0].item<double>(), WithinAbs(0.965905, 1e-5));
  CHECK_THAT(ab[4].item<double>(), WithinAbs(0.482953, 1e-5));
  CHECK_THAT(ab[7].item<double>(), WithinAbs(-1.448858, 1e-5));

  // Completions of 1, 2, 2, 1 tokens, policy log-prob -1.0 and reference -1.2 on every token:
  // k3 = exp(-0.2) + 0.2 - 1 = 0.0187308, and with ratio 1 each token costs -A_i + beta k3.
  PreferenceInputs in;
  in.logps["policy/completion"] = tokens({{-1}, {-1, -1}, {-1, -1}, {-1}});
  in.logps["reference/completion"] = tokens({{-1.2f}, {-1.2f, -1.2f}, {-1.2f, -1.2f}, {-1.2f}});
  in.rewards = r;
  in.group_size = 4;
  in.step_response_tokens = 6;
  const double A = 0.8658754, k3 = 0.0187308, beta = 0.04;
  // grpo: sequence means -A_i + beta k3, averaged: the advantages cancel.
  CHECK_THAT(value(make("grpo", "{beta: 0.04}")->forward(in)), WithinAbs(beta * k3, 1e-7));
  // dapo / bnpo: token sum (-(A - 2A - 2A + A) + 6 beta k3) / 6 = A / 3 + beta k3.
  CHECK_THAT(value(make("grpo", "{beta: 0.04, loss_type: dapo}")->forward(in)), WithinAbs(A / 3 + beta * k3, 1e-6));
  CHECK_THAT(value(make("grpo", "{beta: 0.04, loss_type: bnpo}")->forward(in)), WithinAbs(A / 3 + beta * k3, 1e-6));
  // dr_grpo: the same sum over 4 sequences x max_new_tokens 4.
  CHECK_THAT(value(make("grpo", "{beta: 0.04, loss_type: dr_grpo, max_new_tokens: 4}")->forward(in)),
             WithinAbs((2 * A + 6 * beta * k3) / 16, 1e-6));
  const auto out = make("grpo", "{beta: 0.04}")->forward(in);
  CHECK_THAT(metric(out, "kl"), WithinAbs(k3, 1e-6));
  CHECK_THAT(metric(out, "reward/mean"), WithinAbs(0.5, 1e-9));
  CHECK_THAT(metric(out, "completion_length"), WithinAbs(1.5, 1e-9));
  CHECK_THAT(metric(out, "clip_ratio"), WithinAbs(0.0, 1e-9));
  // beta 0: no reference pass at all.
  CHECK_FALSE(make("grpo", "")->needs_reference());
  CHECK(make("grpo", "{group_size: 8}")->sampling()->group_size == 8);
}

TEST_CASE("grpo: the policy gradient of each token is -A_i / length_i / sequences (grpo aggregation)", "[preference][losses]") {
  PreferenceInputs in;
  in.logps["policy/completion"] = tokens({{-1}, {-1, -1}, {-1, -1}, {-1}});
  in.rewards = torch::tensor({1.f, 0.f, 0.f, 1.f});
  in.group_size = 4;
  make("grpo", "")->forward(in).loss.backward();
  const auto g = in.logps["policy/completion"].token_logps.grad();
  const double A = 0.8658754;
  CHECK_THAT(g[0][0].item<double>(), WithinAbs(-A / 1 / 4, 1e-6));
  CHECK_THAT(g[1][1].item<double>(), WithinAbs(A / 2 / 4, 1e-6));
  CHECK_THAT(g[0][1].item<double>(), WithinAbs(0.0, 1e-9));  // padding
}

TEST_CASE("rewards: exact match after normalisation, format, weighted sum", "[preference][rewards]") {
  std::vector<RewardInput> in = {{"q", "Red.", true, "red", "colour"},
                                 {"q", "blue", true, "red", "colour"},
                                 {"q", "red circle", true, "red", ""},
                                 {"q", "red", false, "red", ""}};
  CHECK(ExactMatchRewardImpl().score(in) == std::vector<double>{1, 0, 0, 1});
  CHECK(FormatRewardImpl(1).score(in) == std::vector<double>{1, 1, 0, 0});  // one word, ended by itself
  CHECK(FormatRewardImpl(0).score(in) == std::vector<double>{1, 1, 1, 0});
  auto exact = std::make_shared<ExactMatchRewardImpl>();
  auto format = std::make_shared<FormatRewardImpl>(1);
  format->weight = 0.5;
  std::map<std::string, double> means;
  const auto total = total_rewards({{"exact_match", exact}, {"format", format}}, in, &means);
  CHECK(total == std::vector<double>{1.5, 0.5, 0, 1});
  CHECK_THAT(means["exact_match"], WithinAbs(0.5, 1e-12));
  CHECK_THAT(means["format"], WithinAbs(0.5, 1e-12));
  CHECK(reward_functions().contains("exact_match"));
  CHECK(preference_losses().names() == std::vector<std::string>{"dpo", "grpo", "mdpo"});
}
