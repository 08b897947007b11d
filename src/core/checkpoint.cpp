#include "core/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/errors.h"
#include "core/json_text.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

const std::array<uint32_t, 256>& crc_table() {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

std::function<void(const char*)>& fault_hook() {
  static std::function<void(const char*)> hook;
  return hook;
}
void fault_point(const char* point) {
  if (fault_hook()) fault_hook()(point);
}

// ".tmp-step_00000002-1234" or "latest.tmp.1234" -> 1234; -1 when the name has no pid.
long pid_of(const std::string& name) {
  const auto dash = name.find_last_of("-.");
  if (dash == std::string::npos) return -1;
  try {
    return std::stol(name.substr(dash + 1));
  } catch (const std::exception&) {
    return -1;
  }
}
bool process_alive(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

}  // namespace

uint32_t crc32_bytes(const void* data, size_t n, uint32_t crc) {
  const auto& t = crc_table();
  crc = ~crc;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) crc = t[(crc ^ p[i]) & 0xff] ^ (crc >> 8);
  return ~crc;
}

uint32_t crc32_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError("cannot read '" + path + "'");
  std::vector<char> buf(1 << 20);
  uint32_t crc = 0;
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    crc = crc32_bytes(buf.data(), static_cast<size_t>(in.gcount()), crc);
  }
  return crc;
}

void atomic_write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write '" + tmp + "' (is the directory writable?)");
    out << text;
    out.flush();
    if (!out) {
      out.close();
      std::error_code ignored;
      fs::remove(tmp, ignored);  // a partial copy is of no use to anyone
      throw std::runtime_error("write failed for '" + tmp + "' (disk full?)");
    }
  }
  fsync_path(tmp, false);
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw std::runtime_error("cannot rename '" + tmp + "' to '" + path + "': " + ec.message());
  fsync_path(fs::path(path).parent_path().string(), true);
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw DataError("cannot read '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void set_checkpoint_fault_hook(std::function<void(const char* point)> hook) { fault_hook() = std::move(hook); }

std::vector<std::string> recover_checkpoints(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::vector<std::string> done;
  std::error_code ec;
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(root, ec)) entries.push_back(e.path());
  for (const auto& p : entries) {
    const std::string name = p.filename().string();
    const bool tmp = name.rfind(".tmp-", 0) == 0 || name.rfind("latest.tmp.", 0) == 0;
    const bool old = name.rfind(".old-", 0) == 0;
    if (!(tmp || old) || process_alive(pid_of(name))) continue;
    if (old) {
      // ".old-step_00000002-1234": the complete previous save of that step.
      const std::string step = name.substr(5, name.rfind('-') - 5);
      if (!fs::exists(root / step)) {
        fs::rename(p, root / step, ec);
        if (!ec) {
          done.push_back("restored " + (root / step).string() + " (a re-save of that step was interrupted)");
          continue;
        }
      }
    }
    fs::remove_all(p, ec);
    if (!ec) done.push_back("removed " + p.string() + " (left by an interrupted save)");
  }
  return done;
}

CheckpointWriter::CheckpointWriter(const std::string& run_dir, int64_t step, std::string trainer)
    : root_((fs::path(run_dir) / "checkpoints").string()), trainer_(std::move(trainer)), step_(step) {
  recover_checkpoints(run_dir);
  final_ = (fs::path(root_) / step_name(step)).string();
  tmp_ = (fs::path(root_) / (".tmp-" + step_name(step) + "-" + std::to_string(::getpid()))).string();
  std::error_code ec;
  fs::remove_all(tmp_, ec);
  fs::create_directories(tmp_, ec);
  if (ec || !fs::is_directory(tmp_))
    throw std::runtime_error("cannot create checkpoint folder '" + tmp_ + "': " + ec.message() +
                             " (is run.out_dir writable?)");
}

CheckpointWriter::~CheckpointWriter() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(tmp_, ec);
  }
}

std::string CheckpointWriter::path(const std::string& name) const { return (fs::path(tmp_) / name).string(); }

void CheckpointWriter::add_json(const std::string& name, const nlohmann::json& j) { add_text(name, json_text(j, 2) + "\n"); }

void CheckpointWriter::add_text(const std::string& name, const std::string& text) {
  std::ofstream out(path(name), std::ios::binary | std::ios::trunc);
  out << text;
  out.flush();
  if (!out) throw std::runtime_error("cannot write '" + path(name) + "' (disk full?)");
  fault_point("file");
}

std::string CheckpointWriter::commit(int keep_last, int64_t keep_every) {
  nlohmann::json manifest;
  manifest["format_version"] = kCheckpointFormatVersion;
  manifest["trainer"] = trainer_;
  manifest["step"] = step_;
  nlohmann::json files = nlohmann::json::object();
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(tmp_)) entries.push_back(e.path());
  std::sort(entries.begin(), entries.end());
  for (const auto& p : entries) {
    if (!fs::is_regular_file(p)) continue;
    fsync_path(p.string(), false);
    files[p.filename().string()] = {{"bytes", fs::file_size(p)}, {"crc32", crc32_file(p.string())}};
  }
  manifest["files"] = files;
  fault_point("checksummed");
  atomic_write_text(path("MANIFEST.json"), json_text(manifest, 2) + "\n");
  fsync_path(tmp_, true);
  fault_point("manifest");

  std::error_code ec;
  // A re-save of the same step: move the old one aside first, so a kill at any point leaves a
  // complete checkpoint under the step name or beside it.
  const std::string old = (fs::path(root_) / (".old-" + step_name(step_) + "-" + std::to_string(::getpid()))).string();
  const bool replacing = fs::exists(final_);
  if (replacing) {
    fs::rename(final_, old, ec);
    if (ec) throw std::runtime_error("cannot move the previous '" + final_ + "' aside: " + ec.message());
    fault_point("aside");
  }
  fs::rename(tmp_, final_, ec);
  if (ec) throw std::runtime_error("cannot move checkpoint into place at '" + final_ + "': " + ec.message());
  fsync_path(root_, true);
  committed_ = true;
  fault_point("renamed");
  atomic_write_text((fs::path(root_) / "latest").string(), fs::path(final_).filename().string() + "\n");
  fault_point("latest");
  if (replacing) fs::remove_all(old, ec);

  // Prune: of the checkpoints up to this step keep the newest keep_last (this one included), and
  // every milestone (step a multiple of keep_every) for good.
  std::vector<std::pair<std::string, int64_t>> steps;
  for (const auto& e : fs::directory_iterator(root_)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || name.rfind("step_", 0) != 0 || name > step_name(step_)) continue;
    int64_t s = -1;
    try {
      s = std::stoll(name.substr(5));
    } catch (const std::exception&) {
    }
    steps.emplace_back(e.path().string(), s);
  }
  std::sort(steps.begin(), steps.end());
  for (size_t i = 0; i + static_cast<size_t>(std::max(1, keep_last)) < steps.size(); ++i) {
    const auto& [dir, s] = steps[i];
    const bool milestone = keep_every > 0 && s > 0 && s % keep_every == 0;
    if (dir != final_ && !milestone) fs::remove_all(dir, ec);
  }
  fault_point("pruned");
  return final_;
}

namespace {
void check_manifest(const std::string& dir, const std::string& mpath, const nlohmann::json& m, CheckpointInfo& info,
                    CheckpointUse use);
}

CheckpointInfo verify_checkpoint(const std::string& dir, CheckpointUse use) {
  const std::string mpath = (fs::path(dir) / "MANIFEST.json").string();
  std::ifstream in(mpath);
  if (!in) throw DataError("checkpoint '" + dir + "' is incomplete: no MANIFEST.json (interrupted save?)");
  nlohmann::json m;
  try {
    in >> m;
  } catch (const nlohmann::json::exception& e) {
    throw DataError(mpath + ": damaged manifest: " + e.what());
  }
  CheckpointInfo info;
  info.dir = dir;
  info.manifest = m;
  try {
    check_manifest(dir, mpath, m, info, use);
  } catch (const nlohmann::json::exception& e) {
    throw DataError(mpath + ": damaged manifest: " + e.what());
  }
  return info;
}

namespace {

// Read by a resume only (trainers/resume_state.h); optimizer.pt is the older optimizer format.
bool resume_only(const std::string& file) {
  return file == "optimizer.safetensors" || file == "optimizer.pt" || file == "rng.safetensors";
}

void check_manifest(const std::string& dir, const std::string& mpath, const nlohmann::json& m, CheckpointInfo& info,
                    CheckpointUse use) {
  if (!m.is_object() || !m.contains("format_version") || !m["format_version"].is_number_integer())
    throw DataError(mpath + ": no format_version");
  if (m["format_version"].get<int>() > kCheckpointFormatVersion)
    throw DataError(mpath + ": checkpoint format " + std::to_string(m["format_version"].get<int>()) +
                    " is newer than this build reads (" + std::to_string(kCheckpointFormatVersion) +
                    "); update trialign");
  info.step = m.value("step", int64_t{0});
  info.trainer = m.value("trainer", std::string());
  if (!m.contains("files") || !m["files"].is_object() || m["files"].empty()) throw DataError(mpath + ": no file list");
  for (auto it = m["files"].begin(); it != m["files"].end(); ++it) {
    if (use == CheckpointUse::Weights && resume_only(it.key())) continue;
    const std::string f = (fs::path(dir) / it.key()).string();
    std::error_code ec;
    if (!fs::is_regular_file(f, ec)) throw DataError("checkpoint file '" + f + "' is missing");
    const uint64_t want = it.value().value("bytes", uint64_t{0});
    if (fs::file_size(f) != want)
      throw DataError("checkpoint file '" + f + "' has " + std::to_string(fs::file_size(f)) + " bytes, expected " +
                      std::to_string(want) + " (truncated or damaged)");
    if (crc32_file(f) != it.value().value("crc32", uint32_t{0}))
      throw DataError("checkpoint file '" + f + "' fails its checksum (damaged); resume from an older checkpoint");
  }
}

}  // namespace

bool has_checkpoints(const std::string& run_dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(fs::path(run_dir) / "checkpoints", ec))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) return true;
  return false;
}

std::vector<std::string> set_aside_checkpoints_after(const std::string& run_dir, int64_t step) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::vector<std::string> moved;
  std::error_code ec;
  std::vector<fs::path> later;
  std::string newest_kept;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || name.rfind("step_", 0) != 0) continue;
    // Same ordering as pruning: zero-padded names compare like their steps.
    if (name <= step_name(step)) newest_kept = std::max(newest_kept, name);
    else later.push_back(e.path());
  }
  std::sort(later.begin(), later.end());
  for (const auto& path : later) {
    const std::string name = path.filename().string();
    // A second resume from an early step finds the first one's abandoned-step_X already there.
    fs::path aside = root / ("abandoned-" + name);
    for (int k = 2; fs::exists(aside, ec); ++k) aside = root / ("abandoned-" + name + "-" + std::to_string(k));
    fs::rename(path, aside, ec);
    // Left where it is, the abandoned future would be what the next --resume auto continues.
    if (ec)
      throw DataError("cannot rename " + path.string() + " (newer than the resumed step " + std::to_string(step) +
                      ") to " + aside.filename().string() + ": " + ec.message() +
                      "; move it out of the checkpoints folder, then resume again");
    moved.push_back(name + " -> " + aside.filename().string());
  }
  // `latest` names the newest checkpoint: no longer one of those just set aside.
  const fs::path latest = root / "latest";
  if (!moved.empty() && fs::exists(latest, ec)) {
    if (newest_kept.empty()) fs::remove(latest, ec);
    else atomic_write_text(latest.string(), newest_kept + "\n");
  }
  return moved;
}

std::string resolve_checkpoint(const std::string& path, const std::function<void(const std::string&)>& warn,
                               CheckpointUse use) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw DataError("checkpoint or run folder '" + path + "' does not exist");
  if (fs::exists(fs::path(path) / "MANIFEST.json", ec)) return path;
  const std::string latest = find_latest_checkpoint(path, warn, use);
  if (latest.empty())
    throw DataError("'" + path + "' is neither a checkpoint folder nor a run folder with a complete checkpoint");
  return latest;
}

std::string find_latest_checkpoint(const std::string& run_dir,
                                   const std::function<void(const std::string&)>& warn, CheckpointUse use) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return "";
  std::vector<std::string> steps;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) steps.push_back(e.path().string());
  std::sort(steps.rbegin(), steps.rend());
  for (const auto& d : steps) {
    try {
      verify_checkpoint(d, use);
      return d;
    } catch (const DataError& e) {
      if (warn) warn(std::string("skipping checkpoint: ") + e.what());
    }
  }
  return "";
}

}  // namespace trialign
