#include "losses/loss.h"

namespace trialign {

ContrastiveLossRegistry& contrastive_losses() {
  static ContrastiveLossRegistry registry("contrastive loss");
  return registry;
}

LmLossRegistry& lm_losses() {
  static LmLossRegistry registry("language-model loss");
  return registry;
}

}  // namespace trialign
