#include "losses/preference.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "core/rng.h"

namespace trialign {

const SequenceLogps& PreferenceInputs::at(const std::string& key) const {
  auto it = logps.find(key);
  if (it == logps.end()) {
    std::string have;
    for (const auto& kv : logps) have += (have.empty() ? "" : ", ") + kv.first;
    throw std::invalid_argument("preference loss reads pass '" + key + "' but the trainer ran only [" + have +
                                "]: list it in the loss's passes()");
  }
  return it->second;
}

bool PreferenceLossImpl::needs_reference() const {
  for (const auto& p : passes())
    if (p.model == "reference") return true;
  return false;
}

torch::Tensor PreferenceLossImpl::corrupt_images(const torch::Tensor& pixels, uint64_t seed) const {
  return random_resized_crop(pixels, 0.01, 0.2, seed);
}

torch::Tensor random_resized_crop(const torch::Tensor& pixels, double min_area, double max_area, uint64_t seed) {
  TORCH_CHECK(pixels.dim() == 4, "random_resized_crop: pixels [I, C, S, S] expected, got ", pixels.sizes());
  namespace F = torch::nn::functional;
  const int64_t I = pixels.size(0), H = pixels.size(2), W = pixels.size(3);
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < I; ++i) {
    Rng rng(mix_seed({seed, static_cast<uint64_t>(i)}));
    const double area = rng.uniform(min_area, max_area) * static_cast<double>(H * W);
    const double aspect = std::exp(rng.uniform(std::log(3.0 / 4.0), std::log(4.0 / 3.0)));
    // Box of that area and aspect (w / h), shrunk to fit the image.
    const int64_t w = std::clamp<int64_t>(std::llround(std::sqrt(area * aspect)), 1, W);
    const int64_t h = std::clamp<int64_t>(std::llround(std::sqrt(area / aspect)), 1, H);
    const auto y = static_cast<int64_t>(rng.below(static_cast<uint64_t>(H - h + 1)));
    const auto x = static_cast<int64_t>(rng.below(static_cast<uint64_t>(W - w + 1)));
    auto crop = pixels[i].slice(1, y, y + h).slice(2, x, x + w).unsqueeze(0);  // [1, C, h, w]
    out.push_back(F::interpolate(crop, F::InterpolateFuncOptions()
                                           .size(std::vector<int64_t>{H, W})
                                           .mode(torch::kBilinear)
                                           .align_corners(false)));
  }
  return torch::cat(out);
}

PreferenceLossRegistry& preference_losses() {
  static PreferenceLossRegistry registry("preference loss");
  return registry;
}

RewardRegistry& reward_functions() {
  static RewardRegistry registry("reward function");
  return registry;
}

}  // namespace trialign
