// The safetensors format (Hugging Face): 8-byte little-endian header length N, N bytes of JSON
// {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the raw little-endian tensor bytes. Used for model weights in checkpoints, so they load in
// the Hugging Face ecosystem unchanged.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

namespace trialign {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes tensors (moved to CPU, made contiguous) in the given order. Throws std::runtime_error
// naming the path on I/O failure.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// The header alone (names, dtypes, shapes, offsets), validated as load_safetensors does: what a
// file holds without reading its tensors.
struct TensorEntry {
  std::string name, dtype;  // dtype as the file spells it: F32, BF16, ...
  torch::ScalarType type = torch::kFloat32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets inside the data section
};
struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;  // by name
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0, data_size = 0;
};
SafetensorsHeader read_safetensors_header(const std::string& path);

// Reads every tensor. Throws DataError naming the path and the offending entry for a truncated
// file, a header that is not valid JSON, unknown dtypes, or offsets outside the file.
std::map<std::string, torch::Tensor> load_safetensors(const std::string& path,
                                                      std::map<std::string, std::string>* metadata = nullptr);

// Parameters and buffers of a module by their dotted names.
NamedTensors named_state(const torch::nn::Module& m, const std::string& prefix = "");

// Copies tensors into a module's parameters/buffers by name. Missing, unexpected and mis-shaped
// names are collected; with strict=true any of them throws DataError listing them all.
struct LoadReport {
  std::vector<std::string> missing, unexpected, mismatched;
  int64_t loaded = 0;
};
LoadReport load_state(torch::nn::Module& m, const std::map<std::string, torch::Tensor>& tensors,
                      const std::string& prefix = "", bool strict = true, const std::string& source = "");

}  // namespace trialign
