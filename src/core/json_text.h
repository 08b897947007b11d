// JSON text of anything that may hold a user's bytes (paths, record text, generated replies).
#pragma once
#include <string>

#include <nlohmann/json.hpp>

namespace trialign {

// nlohmann's plain dump() throws on a string that is not valid UTF-8 (a Latin-1 file name, a
// reply decoded from byte-fallback pieces); such bytes are written as U+FFFD instead, so a report
// about a bad byte can still be written. indent -1: one line.
inline std::string json_text(const nlohmann::json& j, int indent = -1) {
  return j.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace trialign
