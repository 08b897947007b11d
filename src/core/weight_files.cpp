#include "core/weight_files.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <set>

#include "core/checkpoint.h"
#include "core/errors.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// weight_map of an index file: tensor name -> shard path (resolved next to the index).
std::map<std::string, std::string> read_index(const std::string& index) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text_file(index));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(index + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
    throw DataError(index + ": a safetensors index needs a \"weight_map\" object {tensor name: shard file}");
  std::map<std::string, std::string> out;
  const fs::path dir = fs::path(index).parent_path();
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) throw DataError(index + ": weight_map[\"" + it.key() + "\"] must be a file name");
    out[it.key()] = (dir / it.value().get<std::string>()).string();
  }
  return out;
}

}  // namespace

std::vector<std::string> weight_files(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw DataError("weights '" + path + "' do not exist");
  if (fs::is_directory(path, ec)) {
    if (fs::exists(fs::path(path) / "model.safetensors.index.json"))
      return weight_files((fs::path(path) / "model.safetensors.index.json").string());
    if (fs::exists(fs::path(path) / "model.safetensors")) return {(fs::path(path) / "model.safetensors").string()};
    std::vector<std::string> found;
    for (const auto& e : fs::directory_iterator(path))
      if (ends_with(e.path().string(), ".safetensors")) found.push_back(e.path().string());
    if (found.size() == 1) return found;
    throw DataError("weights folder '" + path + "' holds no model.safetensors.index.json or model.safetensors" +
                    (found.empty() ? std::string() : " (and " + std::to_string(found.size()) +
                                                         " other .safetensors files: name one, or add an index)"));
  }
  if (ends_with(path, ".json")) {
    std::set<std::string> shards;
    for (const auto& [name, file] : read_index(path)) shards.insert(file);
    for (const auto& f : shards)
      if (!fs::exists(f)) throw DataError(path + ": shard '" + f + "' does not exist");
    return {shards.begin(), shards.end()};
  }
  return {path};
}

std::map<std::string, torch::Tensor> load_weights(const std::string& path) {
  const auto files = weight_files(path);
  std::map<std::string, torch::Tensor> out;
  std::map<std::string, std::string> origin;
  for (const auto& f : files)
    for (auto& [name, t] : load_safetensors(f)) {
      if (origin.count(name)) throw DataError("tensor '" + name + "' is in both '" + origin[name] + "' and '" + f + "'");
      origin[name] = f;
      out.emplace(name, std::move(t));
    }
  std::string index;
  if (fs::is_directory(path) && fs::exists(fs::path(path) / "model.safetensors.index.json"))
    index = (fs::path(path) / "model.safetensors.index.json").string();
  else if (ends_with(path, ".json"))
    index = path;
  if (!index.empty())
    for (const auto& [name, file] : read_index(index)) {
      auto it = origin.find(name);
      if (it == origin.end() || fs::path(it->second) != fs::path(file))
        throw DataError(index + ": lists tensor '" + name + "' in '" + file + "', but that shard does not hold it");
    }
  return out;
}

std::vector<std::string> save_weights(const std::string& dir, const NamedTensors& tensors, uint64_t max_shard_bytes,
                                      const std::map<std::string, std::string>& metadata) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error("cannot create '" + dir + "': " + ec.message());
  // Greedy packing in the given order (keeps layers together).
  std::vector<NamedTensors> shards(1);
  uint64_t bytes = 0, total = 0;
  for (const auto& nt : tensors) {
    const uint64_t b = static_cast<uint64_t>(nt.second.numel()) * nt.second.element_size();
    if (max_shard_bytes > 0 && bytes > 0 && bytes + b > max_shard_bytes) {
      shards.emplace_back();
      bytes = 0;
    }
    shards.back().push_back(nt);
    bytes += b;
    total += b;
  }
  std::vector<std::string> written;
  if (shards.size() == 1) {
    const std::string f = (fs::path(dir) / "model.safetensors").string();
    save_safetensors(f, tensors, metadata);
    return {f};
  }
  nlohmann::ordered_json map = nlohmann::ordered_json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    const std::string f = (fs::path(dir) / name).string();
    save_safetensors(f, shards[i], metadata);
    for (const auto& nt : shards[i]) map[nt.first] = name;
    written.push_back(f);
  }
  nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", map}};
  const std::string idx = (fs::path(dir) / "model.safetensors.index.json").string();
  atomic_write_text(idx, index.dump(2) + "\n");
  written.push_back(idx);
  return written;
}

bool is_hf_weights(const std::string& path) {
  std::error_code ec;
  if (!fs::is_directory(path, ec)) return ends_with(path, ".safetensors") || ends_with(path, ".json");
  if (fs::exists(fs::path(path) / "MANIFEST.json") || fs::exists(fs::path(path) / "checkpoints")) return false;
  return fs::exists(fs::path(path) / "model.safetensors") || fs::exists(fs::path(path) / "model.safetensors.index.json");
}

}  // namespace trialign
