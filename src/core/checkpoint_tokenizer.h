// A checkpoint's token ids mean the pieces of the tokenizer it was trained with. Another model
// file of the same size (retrained on new data, say) loads without complaint and silently maps
// ids to other words, so checkpoints record which file it was and loads check it.
#pragma once
#include <nlohmann/json.hpp>

#include <string>

namespace trialign {

// {"path", "bytes", "crc32"} of the sentencepiece model file, for trainer_state.json's
// "tokenizer"; null when the run has no tokenizer (an empty path).
nlohmann::json tokenizer_record(const std::string& tokenizer_path);

// Throws ConfigError when checkpoint `dir` recorded its tokenizer and `tokenizer_path` is another
// file (other size or CRC-32). `use` names what loads the checkpoint ("resume", "init_from
// language_model", "eval", "generate", "export", "forward"); the message says what to do for it.
// Not checked: checkpoints written before the record, and a missing tokenizer file (loading the
// tokenizer reports that).
void check_checkpoint_tokenizer(const std::string& dir, const std::string& tokenizer_path, const std::string& use);

}  // namespace trialign
