// `trialign data check CONFIG`: every record a run would read (data.train, data.val, eval.sets)
// validated the way the trainer validates it, every image decoded, and every problem listed
// with its file:line, record id and kind, before any training starts.
#pragma once
#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <utility>
#include <vector>

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

// (record location, path) of every image the usable records of a dataset read.
using ImageRefs = std::vector<std::pair<std::string, std::string>>;
class CaptionDataset;
class ConversationDataset;
class PreferenceDataset;
ImageRefs image_refs(const CaptionDataset& ds);
ImageRefs image_refs(const ConversationDataset& ds);
ImageRefs image_refs(const PreferenceDataset& ds);
// The indices of the records of a dataset that read any of `images` (paths as in image_refs).
std::vector<int64_t> records_reading(const CaptionDataset& ds, const std::vector<std::string>& images);
std::vector<int64_t> records_reading(const ConversationDataset& ds, const std::vector<std::string>& images);
std::vector<int64_t> records_reading(const PreferenceDataset& ds, const std::vector<std::string>& images);

// Decodes each distinct image once, logging progress (count, rate, ETA) on long lists; calls
// `problem` with the image's path and "location: message" for each that fails. Returns false when `stop` (asked
// before each image) said to stop first.
bool decode_images(const ImageRefs& refs, const std::function<void(const std::string& path, const std::string& problem)>& problem,
                   const std::function<bool()>& stop = {});

// data.check_images, before the first step (rank 0): decode_images over the training images,
// skipped when RUN/image_check.json records the same files (paths, sizes, modification times)
// as already checked (it keeps the failures too). Failures: one DataError listing them
// (train.on_bad_batch: stop), or a warning with their count, and their paths returned (skip:
// the trainer leaves the records that read them out of training). `stop` (a stop signal) ends
// the check early with nothing recorded; the caller decides what to do.
std::vector<std::string> check_images_before_training(const RunConfig& cfg, const ImageRefs& refs,
                                                      const std::function<bool()>& stop = {});

// Rank 0's `left_out` (records_reading of what check_images_before_training returned), on every
// rank, and logged with the count training draws from. Collective: every rank calls it, after
// the check. Throws DataError when no record of the `records` is left.
std::vector<int64_t> share_left_out_records(const std::vector<int64_t>& left_out, int64_t records);

// The report as lines a person reads: per manifest, the problems (first `max_lines`), counts by kind.
std::string data_check_text(const DataCheckResult& r, size_t max_lines = 50);

}  // namespace trialign
