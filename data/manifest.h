// Manifest files: a JSON list of objects, or JSONL (one object per line; blank lines allowed).
// Each record remembers where it came from ("train.jsonl:12" or "train.json[#12]") so every later
// error can name the exact record.
#pragma once
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace trialign {

struct ManifestRecord {
  nlohmann::json json;  // the object as written
  std::string where;    // "path:line" (JSONL) or "path[#index]" (JSON list)
  std::string id;       // the record's "id" field, or "#index" when absent
};

// Throws DataError naming file:line (and the parser's message) for malformed JSON, a top level
// that is neither a list nor JSONL objects, or a missing file.
std::vector<ManifestRecord> read_manifest(const std::string& path);

// Accessors that throw DataError naming the record and field.
std::string require_string(const ManifestRecord& r, const char* field);

// Problems found while validating records; with policy "skip" they are counted, with "fail" the
// first ones are reported together in one DataError.
struct RecordProblems {
  std::vector<std::string> messages;
  int64_t skipped = 0;
  // Set by the dataset when not one record loaded: every record failing points at a file of
  // another kind (a preference file given to eval, say), which the error then says first.
  bool none_usable = false;
  void add(const ManifestRecord& r, const std::string& what) { messages.push_back(r.where + " (id " + r.id + "): " + what); }
  // policy "fail": throws DataError listing up to 20 problems; "skip": returns the count.
  void finish(const std::string& manifest, const std::string& policy,
              const std::string& hint = "fix them, or set data.on_bad_record: skip to skip and count them") const;
};

// `trialign data check`: while a ProblemCollector exists (one at a time), RecordProblems::finish
// hands it every problem instead of failing or skipping, and read_manifest records a malformed
// JSONL line and goes on to the next: one pass over the data lists every problem.
struct CollectedProblem {
  std::string manifest, message;
  std::string policy;  // what a run would do: "fail" or "skip"
};
class ProblemCollector {
 public:
  ProblemCollector();
  ~ProblemCollector();
  ProblemCollector(const ProblemCollector&) = delete;
  ProblemCollector& operator=(const ProblemCollector&) = delete;
  std::vector<CollectedProblem> problems;
};

}  // namespace trialign
