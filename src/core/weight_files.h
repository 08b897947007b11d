// Weights as the Hugging Face ecosystem stores them: one `model.safetensors`, or shards
// `model-00001-of-00003.safetensors` ... with `model.safetensors.index.json` mapping every tensor
// name to its shard ({"metadata": {"total_size": N}, "weight_map": {name: file}}).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "core/safetensors.h"

namespace trialign {

// The safetensors files behind `path`: a .safetensors file, an index .json, or a folder holding
// model.safetensors.index.json or model.safetensors (or exactly one *.safetensors). Throws
// DataError naming the path and what was expected.
std::vector<std::string> weight_files(const std::string& path);

// Every tensor of every shard. With an index, each name it lists must be in the shard it names
// and no tensor may appear twice; violations are DataErrors naming the index and the tensor.
std::map<std::string, torch::Tensor> load_weights(const std::string& path);

// Writes tensors into `dir` (created) as model.safetensors, or, when they exceed max_shard_bytes
// (> 0), as numbered shards plus model.safetensors.index.json. Tensors are never split across
// shards. Returns the files written.
std::vector<std::string> save_weights(const std::string& dir, const NamedTensors& tensors, uint64_t max_shard_bytes = 0,
                                      const std::map<std::string, std::string>& metadata = {});

// True when `path` looks like Hugging Face weights rather than a trialign checkpoint or run folder.
bool is_hf_weights(const std::string& path);

}  // namespace trialign
