#include "losses/loss.h"

namespace trialign {

ContrastiveLossRegistry& contrastive_losses() {
  static ContrastiveLossRegistry registry("contrastive loss");
  return registry;
}

}  // namespace trialign
