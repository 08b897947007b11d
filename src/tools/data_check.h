// `trialign data check CONFIG`: every record a run would read (data.train, data.val, eval.sets)
// validated the way the trainer validates it, every image decoded, and every problem listed
// with its file:line, record id and kind, before any training starts.
#pragma once
#include <nlohmann/json.hpp>

#include <string>

#include "core/run_config.h"

namespace trialign {

struct DataCheckResult {
  nlohmann::json report;  // {"manifests": [...], "problems": [...], "counts": {kind: n}, "would_fail": bool}
  bool would_fail = false;  // a problem the config's policies would not skip (the run would stop)
};

// The kind of a problem from its message: malformed_json, invalid_utf8, missing_file,
// missing_image, bad_image, missing_field, wrong_type, empty_conversation, empty_text,
// image_placeholders, unknown_role, conversation_shape, chosen_equals_rejected, too_long,
// no_usable_records, other.
std::string problem_kind(const std::string& message);

// decode_images: also decode every image (catches corrupt files whose header looks fine).
DataCheckResult check_data(const RunConfig& cfg, bool decode_images);

// The report as lines a person reads: per manifest, the problems (first `max_lines`), counts by kind.
std::string data_check_text(const DataCheckResult& r, size_t max_lines = 50);

}  // namespace trialign
