// How a generated reply is compared with a reference answer (exact-match VQA, GRPO rewards).
#pragma once
#include <string>

namespace trialign {

// Lower case, surrounding spaces and a final period removed.
std::string normalise_reply(const std::string& s);

}  // namespace trialign
