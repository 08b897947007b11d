// Checkpoint directories that never lose work.
//
//   RUN/checkpoints/step_000200/      one directory per save
//       model.safetensors ...          files written by the trainer
//       MANIFEST.json                  format version, trainer, step, size + CRC-32 of every file
//   RUN/checkpoints/latest            text file naming the newest complete directory
//
// A save writes into a hidden temporary directory, fsyncs every file, writes MANIFEST.json last,
// renames the directory into place and only then moves `latest`. A process killed at any point
// leaves the previous checkpoint intact; a directory without a valid MANIFEST is never resumed
// from. On load every file's size and CRC-32 are checked, and a damaged file is named.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace trialign {

constexpr int kCheckpointFormatVersion = 1;

uint32_t crc32_file(const std::string& path);
uint32_t crc32_bytes(const void* data, size_t n, uint32_t crc = 0);

// Writes `text` to `path` through a temporary file + fsync + rename.
void atomic_write_text(const std::string& path, const std::string& text);
// The whole file; throws DataError naming the path when it cannot be read.
std::string read_text_file(const std::string& path);

class CheckpointWriter {
 public:
  // Starts a save of `step` under RUN/checkpoints. Throws std::runtime_error naming the folder
  // when it cannot be created (unwritable output directory).
  CheckpointWriter(const std::string& run_dir, int64_t step, std::string trainer);
  ~CheckpointWriter();  // an uncommitted save is removed

  // Path inside the temporary directory for a file the caller writes itself.
  std::string path(const std::string& name) const;
  void add_json(const std::string& name, const nlohmann::json& j);
  void add_text(const std::string& name, const std::string& text);

  // Checksums, fsyncs, renames into place, updates `latest`, deletes old checkpoints beyond
  // keep_last, except those whose step is a multiple of keep_every (> 0), which stay for good.
  // Returns the final directory.
  std::string commit(int keep_last, int64_t keep_every = 0);

 private:
  std::string root_, tmp_, final_, trainer_;
  int64_t step_;
  bool committed_ = false;
};

struct CheckpointInfo {
  std::string dir;
  int64_t step = 0;
  std::string trainer;
  nlohmann::json manifest;
};

// What a checkpoint is opened for. Resume reads every file; Weights (eval, generate, forward,
// export, init_from) reads all but the training state that only a resume needs (the optimizer's
// moments and the RNG), so damage there does not lock intact weights away, and those files'
// checksums (twice the weights' size for AdamW) are not read.
enum class CheckpointUse { Resume, Weights };

// Verifies MANIFEST.json and the size and checksum of every file `use` reads; throws DataError
// naming the file.
CheckpointInfo verify_checkpoint(const std::string& dir, CheckpointUse use = CheckpointUse::Resume);

// A checkpoint folder as given, or a run folder's newest checkpoint complete for `use`. Throws
// DataError when the path does not exist or holds no such checkpoint.
std::string resolve_checkpoint(const std::string& path, const std::function<void(const std::string&)>& warn = {},
                               CheckpointUse use = CheckpointUse::Resume);

// True when RUN/checkpoints holds any step folder, complete or not (no checksums read).
bool has_checkpoints(const std::string& run_dir);

// Resuming from `step` abandons later checkpoints: renames them to `abandoned-step_...` (with a
// "-2", "-3" suffix when an earlier resume left that name), so that neither `--resume auto` nor
// pruning takes them for the run's future, and points `latest` at the newest one kept. Returns
// "step_... -> abandoned-step_..." per renamed folder; throws DataError when one cannot be renamed.
std::vector<std::string> set_aside_checkpoints_after(const std::string& run_dir, int64_t step);

// Tidies RUN/checkpoints after a process died mid-save: removes temporary folders of processes
// that no longer run, and puts back a complete checkpoint that a re-save of the same step had
// moved aside (`.old-step_N-PID`) when no `step_N` took its place. Called by every writer and by
// the trainers before choosing a checkpoint to resume (the run's owner; readers such as eval
// never change a run folder). Returns what it did, one line each.
std::vector<std::string> recover_checkpoints(const std::string& run_dir);

// Fault injection for crash-safety tests: called with the name of each point a save passes
// ("file", "checksummed", "manifest", "aside" (re-saves only), "renamed", "latest", "pruned"); a test kills its process
// there. Empty by default.
void set_checkpoint_fault_hook(std::function<void(const char* point)> hook);

// The newest complete, verified checkpoint under RUN/checkpoints, or "" when there is none.
// Damaged or partial directories are skipped with a warning through `warn`.
std::string find_latest_checkpoint(const std::string& run_dir,
                                   const std::function<void(const std::string&)>& warn = {},
                                   CheckpointUse use = CheckpointUse::Resume);

}  // namespace trialign
