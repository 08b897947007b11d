#include "core/safetensors.h"

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>

#include "core/errors.h"

namespace trialign {

namespace {

struct DtypeInfo {
  const char* name;
  torch::ScalarType type;
};
const DtypeInfo kDtypes[] = {
    {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}, {"F64", torch::kFloat64},
    {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},     {"I8", torch::kInt8},
    {"U8", torch::kUInt8},    {"BOOL", torch::kBool},
};

const char* dtype_name(torch::ScalarType t) {
  for (const auto& d : kDtypes)
    if (d.type == t) return d.name;
  throw std::runtime_error(std::string("safetensors: unsupported dtype ") + c10::toString(t));
}

}  // namespace

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header;
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t0] : tensors) {
    auto t = t0.detach().to(torch::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(t);
  }
  std::string h = header.dump();
  while (h.size() % 8) h.push_back(' ');  // keeps the data 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write '" + path + "' (check the directory exists and is writable)");
  uint64_t n = h.size();
  unsigned char le[8];
  for (int i = 0; i < 8; ++i) le[i] = static_cast<unsigned char>((n >> (8 * i)) & 0xff);
  out.write(reinterpret_cast<const char*>(le), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const auto& t : data)
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.numel() * t.element_size()));
  out.flush();
  if (!out) throw std::runtime_error("write failed for '" + path + "' (disk full?)");
}

SafetensorsHeader read_safetensors_header(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw DataError("cannot open safetensors file '" + path + "'");
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  if (size < 8) throw DataError(path + ": truncated safetensors file (" + std::to_string(size) + " bytes)");
  unsigned char le[8];
  in.read(reinterpret_cast<char*>(le), 8);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(le[i]) << (8 * i);
  if (n > size - 8 || n > (100ull << 20))
    throw DataError(path + ": safetensors header length " + std::to_string(n) + " exceeds the file size");
  std::string h(n, '\0');
  in.read(h.data(), static_cast<std::streamsize>(n));
  if (!in) throw DataError(path + ": read failed (truncated file?)");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(h);
  } catch (const nlohmann::json::exception& e) {
    throw DataError(path + ": safetensors header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) throw DataError(path + ": safetensors header must be a JSON object");
  SafetensorsHeader out;
  out.data_start = 8 + n;
  out.data_size = size - 8 - n;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (it.value().is_object())
        for (auto m = it.value().begin(); m != it.value().end(); ++m)
          if (m.value().is_string()) out.metadata[m.key()] = m.value().get<std::string>();
      continue;
    }
    const auto& e = it.value();
    const std::string where = path + ": tensor '" + it.key() + "'";
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      throw DataError(where + ": entry needs dtype, shape and data_offsets");
    if (!e["dtype"].is_string()) throw DataError(where + ": dtype must be a string");
    TensorEntry t;
    t.name = it.key();
    t.dtype = e["dtype"].get<std::string>();
    const DtypeInfo* info = nullptr;
    for (const auto& d : kDtypes)
      if (t.dtype == d.name) info = &d;
    if (!info) throw DataError(where + ": unsupported dtype '" + t.dtype + "'");
    t.type = info->type;
    uint64_t numel = 1;
    if (!e["shape"].is_array()) throw DataError(where + ": shape must be a list");
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned()) throw DataError(where + ": shape entries must be non-negative integers");
      const uint64_t v = d.get<uint64_t>();
      if (v > (1ull << 40) || (v && numel > (1ull << 62) / v)) throw DataError(where + ": shape too large");
      t.shape.push_back(static_cast<int64_t>(v));
      numel *= v;
    }
    const auto& off = e["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw DataError(where + ": data_offsets must be [begin, end]");
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    const uint64_t elem = torch::elementSize(info->type);
    if (numel > out.data_size / elem)
      throw DataError(where + ": shape needs " + std::to_string(numel) + " elements, more than the " +
                      std::to_string(out.data_size) + "-byte data section holds");
    if (t.begin > t.end || t.end > out.data_size)
      throw DataError(where + ": data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                      "] outside the " + std::to_string(out.data_size) + "-byte data section (truncated file?)");
    if (t.end - t.begin != numel * elem)
      throw DataError(where + ": " + std::to_string(t.end - t.begin) + " bytes do not match shape and dtype (" +
                      std::to_string(numel * elem) + " expected)");
    out.tensors.push_back(std::move(t));
  }
  return out;
}

std::map<std::string, torch::Tensor> load_safetensors(const std::string& path,
                                                      std::map<std::string, std::string>* metadata) {
  const SafetensorsHeader header = read_safetensors_header(path);
  if (metadata)
    for (const auto& [k, v] : header.metadata) (*metadata)[k] = v;
  // Each tensor is read straight into its own storage: no second copy of the file in memory.
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError("cannot open safetensors file '" + path + "'");
  std::map<std::string, torch::Tensor> out;
  for (const auto& e : header.tensors) {
    auto t = torch::empty(e.shape, torch::TensorOptions().dtype(e.type));
    if (e.end > e.begin) {
      in.seekg(static_cast<std::streamoff>(header.data_start + e.begin));
      in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
      if (!in) throw DataError(path + ": tensor '" + e.name + "': read failed (truncated file?)");
    }
    out.emplace(e.name, t);
  }
  return out;
}

NamedTensors named_state(const torch::nn::Module& m, const std::string& prefix) {
  NamedTensors out;
  for (const auto& p : m.named_parameters(true)) out.emplace_back(prefix + p.key(), p.value());
  for (const auto& b : m.named_buffers(true)) out.emplace_back(prefix + b.key(), b.value());
  return out;
}

LoadReport load_state(torch::nn::Module& m, const std::map<std::string, torch::Tensor>& tensors,
                      const std::string& prefix, bool strict, const std::string& source) {
  LoadReport rep;
  torch::NoGradGuard ng;
  std::map<std::string, bool> seen;
  for (const auto& [name, t] : tensors)
    if (name.compare(0, prefix.size(), prefix) == 0) seen[name] = false;
  auto assign = [&](const std::string& name, torch::Tensor& dst) {
    auto it = tensors.find(prefix + name);
    if (it == tensors.end()) return rep.missing.push_back(prefix + name);
    seen[prefix + name] = true;
    if (it->second.sizes() != dst.sizes()) {
      std::ostringstream os;
      os << prefix << name << " (file " << it->second.sizes() << ", model " << dst.sizes() << ")";
      return rep.mismatched.push_back(os.str());
    }
    dst.copy_(it->second.to(dst.device(), dst.scalar_type()));
    ++rep.loaded;
  };
  for (auto& p : m.named_parameters(true)) assign(p.key(), p.value());
  for (auto& b : m.named_buffers(true)) assign(b.key(), b.value());
  for (const auto& [name, used] : seen)
    if (!used) rep.unexpected.push_back(name);
  if (strict && (!rep.missing.empty() || !rep.unexpected.empty() || !rep.mismatched.empty())) {
    std::string msg = (source.empty() ? std::string("weights") : source) + " do not match the model:";
    auto list = [&](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      msg += std::string("\n  ") + what + " (" + std::to_string(v.size()) + "):";
      for (size_t i = 0; i < v.size() && i < 10; ++i) msg += " " + v[i];
      if (v.size() > 10) msg += " ...";
    };
    list("missing", rep.missing);
    list("unexpected", rep.unexpected);
    list("mis-shaped", rep.mismatched);
    throw DataError(msg);
  }
  return rep;
}

}  // namespace trialign
