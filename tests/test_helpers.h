// Small helpers shared by the tests: temporary directories and file writing.
#pragma once
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <string>

#include "data/tokenizer.h"

namespace trialign::test {

// A fresh directory under the system temp dir, removed when the object goes away.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / ("trialign-test-" + tag + "-" + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

inline void write_file(const std::string& path, const std::string& text) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path, std::ios::binary) << text;
}

inline std::string source_dir() { return TRIALIGN_SOURCE_DIR; }

// Trains a small sentencepiece model on a manifest's captions; returns the number of sentences
// read. Writes `prefix`.model.
inline int64_t train_test_tokenizer(const std::string& manifest, const std::string& prefix, int vocab_size) {
  TokenizerTrainOptions o;
  o.manifests = {manifest};
  o.out_prefix = prefix;
  o.vocab_size = vocab_size;
  return train_tokenizer(o);
}

// The message of the E that f throws, or "" when it throws none.
template <class E>
std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "";
}

}  // namespace trialign::test
