// Small helpers shared by the tests: temporary directories and file writing.
#pragma once
#include <sys/wait.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <fstream>
#include <random>
#include <string>
#include <thread>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <map>

#include "core/config_tree.h"
#include "core/run_config.h"
#include "data/shapes_pope.h"
#include "data/shapes_preference.h"
#include "data/shapes_questions.h"
#include "data/shapes_world.h"
#include "data/tokenizer.h"
#include "trainers/common.h"

namespace trialign::test {

// Training options for tests: no progress output.
inline TrainOptions quiet() {
  TrainOptions o;
  o.quiet = true;
  return o;
}

// A run config from `key=value` overrides alone (the tests' tiny configs), validated like a file.
inline RunConfig config_from_overrides(const std::vector<std::string>& sets, const std::string& name) {
  ConfigNode root;
  root.kind = ConfigNode::Kind::Map;
  for (const auto& s : sets) apply_override(root, s);
  return run_config_from_tree(root, name);
}

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

// Runs a shell command; returns its exit code (128 + signal when killed) and, in `out`, what it
// printed on stdout and stderr.
inline int run_command(const std::string& cmd, std::string* out = nullptr) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p);
  std::string text;
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof buf, p)) text.append(buf, n);
  const int status = ::pclose(p);
  if (out) *out = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Trains a small sentencepiece model on a manifest's captions; returns the number of sentences
// read. Writes `prefix`.model.
inline int64_t train_test_tokenizer(const std::string& manifest, const std::string& prefix, int vocab_size) {
  TokenizerTrainOptions o;
  o.manifests = {manifest};
  o.out_prefix = prefix;
  o.vocab_size = vocab_size;
  return train_tokenizer(o);
}

// A tiny shapes world in DIR: 32x32 scenes of at most two objects (seed 4), their caption,
// instruction, VQA, preference and GRPO manifests, and a 64-piece tokenizer DIR/tok.model over
// the captions and conversations.
inline void write_tiny_shapes_corpus(const std::string& dir, int64_t n_train, int64_t n_val) {
  shapes::GeneratorOptions g;
  g.image_size = 32;
  g.max_objects = 2;
  g.seed = 4;
  shapes::write_dataset(dir, n_train, n_val, g);
  shapes::write_instruction_data(dir, n_train, n_val, g);
  shapes::write_preference_data(dir, n_train, n_val, g);
  shapes::write_pope_data(dir, n_val, g);
  TokenizerTrainOptions o;
  o.manifests = {dir + "/train.jsonl", dir + "/train_instruct.jsonl"};
  o.fields = {"caption", "conversations"};
  o.out_prefix = dir + "/tok";
  o.vocab_size = 64;
  train_tokenizer(o);
}

// Waits (up to two minutes) until a training process writing RUN has logged `n` records in
// RUN/metrics.jsonl: it is under way. False on timeout.
inline bool wait_for_logged_steps(const std::string& run, int64_t n) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::ifstream m(run + "/metrics.jsonl");
    std::string l;
    int64_t lines = 0;
    while (std::getline(m, l)) ++lines;
    if (lines >= n) return true;
  }
  return false;
}

// Every tensor of `a` equals (bit for bit) the tensor of the same name in `b`.
inline void check_same_tensors(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b) {
  for (const auto& [name, t] : a) {
    INFO(name);
    REQUIRE(b.count(name));
    CHECK(torch::equal(t, b.at(name)));
  }
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
