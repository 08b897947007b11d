#include "eval/answers.h"

#include <cctype>

namespace trialign {

std::string normalise_reply(const std::string& s) {
  std::string out;
  for (char c : s) out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  auto strip = [&] {
    while (!out.empty() && std::isspace(static_cast<unsigned char>(out.back()))) out.pop_back();
    size_t i = 0;
    while (i < out.size() && std::isspace(static_cast<unsigned char>(out[i]))) ++i;
    out.erase(0, i);
  };
  strip();
  if (!out.empty() && out.back() == '.') out.pop_back();
  strip();
  return out;
}

}  // namespace trialign
