// SentencePiece tokenizer wrapper. Models trained by `trialign tokenizer train` reserve
// pad=0, unk=1, bos=2, eos=3 and a user-defined `<image>` piece (the image placeholder of later
// stages). Existing models (e.g. a LLaMA tokenizer.model) load too; ids they lack are -1.
// sentencepiece itself is reached through libtrialign_spm.so (src/spm_shim/spm_shim.h explains
// why); it is found next to libtrialign_core.so, or at $TRIALIGN_SPM_LIBRARY.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace trialign {

class Tokenizer {
 public:
  // Throws DataError naming the path when the file is missing or not a sentencepiece model.
  static Tokenizer load(const std::string& path);
  std::vector<int> encode(const std::string& text) const;
  std::string decode(const std::vector<int>& ids) const;
  std::string piece(int id) const;

  int vocab_size() const { return vocab_size_; }
  int pad_id() const { return pad_id_; }  // never -1: falls back to unk (masked anyway)
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  int image_id() const { return image_id_; }  // -1 when the model has no `<image>` piece
  const std::string& path() const { return path_; }

  // What encode() has produced so far (shared by copies of this tokenizer): a tokenizer that does
  // not cover the data's characters (trained on other text, no byte fallback) turns them into
  // unk, which the model can neither read nor learn to write. Trainers and `data check` report it.
  struct Coverage {
    int64_t tokens = 0, unknown = 0;
    std::string example;  // the latest text encoded with an unk in it (at most 80 bytes)
  };
  Coverage coverage() const;
  // The encodes between `before` and now (the example is one of them when any had an unk).
  Coverage coverage_since(const Coverage& before) const;

 private:
  struct CoverageState;
  std::shared_ptr<void> sp_;  // shim handle
  std::shared_ptr<CoverageState> coverage_;
  int vocab_size_ = 0, pad_id_ = 0, bos_id_ = -1, eos_id_ = -1, unk_id_ = 0, image_id_ = -1;
  std::string path_;
};

struct TokenizerTrainOptions {
  std::vector<std::string> manifests;           // JSON/JSONL files
  std::vector<std::string> fields = {"caption"}; // string fields to read from each record
  std::string out_prefix;                        // writes PREFIX.model and PREFIX.vocab
  int vocab_size = 128;
  std::string model_type = "unigram";           // unigram | bpe | word | char
};

// Trains a model on the text of the given fields (LLaVA `conversations[].value` is read when
// "conversations" is listed). Throws DataError when no text is found or sentencepiece fails.
// Returns the number of sentences used.
int64_t train_tokenizer(const TokenizerTrainOptions& opt);

// "" when `c` has no unk; otherwise one line for a log or report: how many tokens of `set` are
// unk, an example text, and what to do about it.
std::string unknown_tokens_note(const Tokenizer::Coverage& c, const std::string& set, const std::string& tokenizer_path);

// [bos] text [eos], truncated to max_len keeping eos, as the CLIP text encoder expects.
std::vector<int64_t> encode_for_text_encoder(const Tokenizer& tok, const std::string& text, int max_len);

}  // namespace trialign
