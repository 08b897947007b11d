// Error types the library throws; only main() turns them into exit codes.
#pragma once
#include <stdexcept>
#include <string>

namespace trialign {

// Exit codes shared by every subcommand (documented in docs/user-guide.md).
enum ExitCode : int {
  kExitOk = 0,
  kExitRuntime = 1,   // unexpected failure while running
  kExitConfig = 2,    // bad config, bad command line, bad input data
  kExitInterrupted = 75,  // stopped by SIGTERM/SIGINT after writing a checkpoint (EX_TEMPFAIL)
};

// A mistake in a config file, a --set override or the command line. The message names the
// file:line and dotted key of every problem found, one per line.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A bad input record or file (manifest, image, tokenizer, weights). The message names the
// file:line or record id.
struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// A stop signal (SIGTERM/SIGINT) that came before the first training step: while the training
// images were checked, reference log-probs cached or the evaluation before the first step ran.
// Nothing was trained and no checkpoint written; main() exits with kExitInterrupted.
struct StoppedBeforeTraining : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace trialign
