// mDPO (Wang et al. 2024, "mDPO: Conditional Preference Optimization for Multimodal Large
// Language Models"): DPO alone lets a VLM prefer the chosen reply from the text, ignoring the
// image. mDPO adds two terms, all with one beta:
//   L = L_DPO(y+ vs y- | m)
//     + L_CoPO = -log sig(beta [(p(y+|m) - p(y+|m')) - (r(y+|m) - r(y+|m'))])
//     + L_AncPO = -log sig(beta (p(y+|m) - r(y+|m)) - delta)
// where m' is a corrupted image (random resized crop keeping min_area..max_area of the area,
// drawn anew for every forward; corrupt_images() below) and p / r the policy / reference
// sequence log-probs. The corrupted-image passes are requested here (passes()), not by the trainer.
// L_CoPO is left out for pairs marked image_conditional false (PreferenceInputs): a chosen "no"
// about an absent object is as right on the corrupted image, and pushing it down there would
// teach the model to stop denying what it cannot see.
// Extra metrics: rewards/imageless_chosen = beta (p(y+|m') - r(y+|m')), rewards/imageless_margins
// = rewards/chosen - rewards/imageless_chosen, loss/dpo, loss/conditional, loss/anchor.
#pragma once
#include "losses/dpo.h"

namespace trialign {

struct MdpoOptions {
  double beta = 0.1;
  double delta = 0.0;           // anchor margin
  double min_area = 0.01;       // corrupted image: crop area fraction bounds
  double max_area = 0.2;
  template <class V> void fields(V& v) {
    v("beta", beta, positive());
    v("delta", delta);
    v("min_area", min_area, in_range(0.0001, 1.0));
    v("max_area", max_area, in_range(0.0001, 1.0));
  }
};

class MdpoLossImpl : public PreferenceLossImpl {
 public:
  explicit MdpoLossImpl(const MdpoOptions& o) : opt_(o) {}
  std::vector<ResponsePass> passes() const override;
  torch::Tensor corrupt_images(const torch::Tensor& pixels, uint64_t seed) const override;
  LossOutput forward(const PreferenceInputs& in) override;

 private:
  MdpoOptions opt_;
};

}  // namespace trialign
