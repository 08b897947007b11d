#include "tools/data_check.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <set>

#include "core/checkpoint.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/logging.h"
#include "data/caption_dataset.h"
#include "data/conversation_dataset.h"
#include "data/image.h"
#include "data/manifest.h"
#include "data/preference_dataset.h"
#include "data/tokenizer.h"
#include "losses/preference.h"
#include "models/vlm.h"
#include "core/json_text.h"

namespace fs = std::filesystem;

namespace trialign {

std::string problem_kind(const std::string& m) {
  // First match wins: more specific phrases before the general ones.
  static const std::vector<std::pair<const char*, const char*>> table = {
      {"UTF-8", "invalid_utf8"},
      {"malformed JSON", "malformed_json"},
      {"expected a JSON object", "malformed_json"},
      {"cannot open manifest", "missing_file"},
      {"does not exist", "missing_image"},
      {"not an image format", "bad_image"},
      {"not a decodable image", "bad_image"},
      {"cannot be decoded", "bad_image"},
      {"is an empty file", "bad_image"},
      {"is a truncated PNG", "bad_image"},
      {"is a folder, not an image file", "bad_image"},
      {"is not a regular file", "bad_image"},
      {"Mi pixels)", "bad_image"},
      {"cannot be read", "bad_image"},
      {"placeholder", "image_placeholders"},
      {"<image> inside", "image_placeholders"},
      {"unknown role", "unknown_role"},
      {"same reply", "chosen_equals_rejected"},
      {"exceed data.max_seq_len", "too_long"},
      {"no usable", "no_usable_records"},
      {"non-empty list", "empty_conversation"},
      {"missing field", "missing_field"},
      {"missing '", "missing_field"},
      {"must be", "wrong_type"},
      {"needs string fields", "wrong_type"},
      {"empty", "empty_text"},
      {"must end with", "conversation_shape"},
      {"no assistant", "conversation_shape"},
  };
  for (const auto& [phrase, kind] : table)
    if (m.find(phrase) != std::string::npos) return kind;
  return "other";
}

namespace {

// One manifest as the trainer reads it: the locations and image paths of its usable records.
struct Loaded {
  int64_t usable = 0, skipped = 0;
  std::vector<std::pair<std::string, std::string>> images;  // (record location, path)
};

Loaded load_set(const RunConfig& cfg, const std::string& manifest, bool train_set, bool conversations, const Tokenizer& tok,
            int64_t tokens_per_image, int64_t limit) {
  Loaded out;
  if (!cfg.is_vlm()) {
    CaptionDataset ds(manifest, cfg.data, tok, train_set, limit);
    out.usable = ds.size(), out.skipped = ds.skipped(), out.images = image_refs(ds);
    return out;
  }
  if (cfg.trainer == "preference" && !conversations) {
    auto loss = preference_losses().create_or_throw(cfg.loss);
    const CompletionSampling* sampling = loss->sampling();
    PreferenceDataset ds(manifest, cfg.data, tok, tokens_per_image,
                         sampling ? PreferenceDataset::Kind::Prompts : PreferenceDataset::Kind::Pairs, train_set, limit,
                         sampling ? sampling->max_new_tokens : 0);
    out.usable = ds.size(), out.skipped = ds.skipped(), out.images = image_refs(ds);
    return out;
  }
  ConversationDataset ds(manifest, cfg.data, tok, tokens_per_image, train_set, limit);
  out.usable = ds.size(), out.skipped = ds.skipped(), out.images = image_refs(ds);
  return out;
}

template <class Dataset>
ImageRefs sample_images(const Dataset& ds) {
  ImageRefs out;
  for (int64_t i = 0; i < ds.size(); ++i)
    for (const auto& img : ds.sample(i).images) out.emplace_back(ds.sample(i).where + " (id " + ds.sample(i).id + ")", img);
  return out;
}

}  // namespace

ImageRefs image_refs(const CaptionDataset& ds) {
  ImageRefs out;
  for (int64_t i = 0; i < ds.size(); ++i) out.emplace_back(ds.where(i), ds.image_path(i));
  return out;
}
ImageRefs image_refs(const ConversationDataset& ds) { return sample_images(ds); }
ImageRefs image_refs(const PreferenceDataset& ds) { return sample_images(ds); }

namespace {

// images_of(i): the paths record i reads.
template <class Dataset, class ImagesOf>
std::vector<int64_t> records_with(const Dataset& ds, const std::vector<std::string>& images, ImagesOf images_of) {
  std::vector<int64_t> out;
  if (images.empty()) return out;
  const std::set<std::string> bad(images.begin(), images.end());
  for (int64_t i = 0; i < ds.size(); ++i)
    for (const auto& img : images_of(i))
      if (bad.count(img)) {
        out.push_back(i);
        break;
      }
  return out;
}

}  // namespace

std::vector<int64_t> records_reading(const CaptionDataset& ds, const std::vector<std::string>& images) {
  return records_with(ds, images, [&](int64_t i) { return std::vector<std::string>{ds.image_path(i)}; });
}
std::vector<int64_t> records_reading(const ConversationDataset& ds, const std::vector<std::string>& images) {
  return records_with(ds, images, [&](int64_t i) -> const std::vector<std::string>& { return ds.sample(i).images; });
}
std::vector<int64_t> records_reading(const PreferenceDataset& ds, const std::vector<std::string>& images) {
  return records_with(ds, images, [&](int64_t i) -> const std::vector<std::string>& { return ds.sample(i).images; });
}

bool decode_images(const ImageRefs& refs, const std::function<void(const std::string& path, const std::string& problem)>& problem,
                   const std::function<bool()>& stop) {
  // Decoding is where a corrupt body behind a valid header shows; a run would meet it mid-way.
  std::set<std::string> seen;
  ProgressLog progress("checking images", "images", static_cast<int64_t>(refs.size()), 5.0);
  int64_t done = 0;
  for (const auto& [where, path] : refs) {
    if (stop && stop()) return false;
    progress.update(done++);
    if (!seen.insert(path).second) continue;
    try {
      load_image_rgb(path);
    } catch (const DataError& e) {
      problem(path, where + ": " + e.what());
    }
  }
  return true;
}

std::vector<std::string> check_images_before_training(const RunConfig& cfg, const ImageRefs& refs,
                                                      const std::function<bool()>& stop) {
  if (!cfg.data.check_images || refs.empty()) return {};
  // What was checked: every distinct file with its size and modification time.
  std::set<std::string> files;
  for (const auto& r : refs) files.insert(r.second);
  uint32_t sig = 0;
  for (const auto& f : files) {
    std::error_code ec;
    const auto size = fs::file_size(f, ec);
    const auto mtime = fs::last_write_time(f, ec).time_since_epoch().count();
    const std::string line = f + "\t" + std::to_string(size) + "\t" + std::to_string(mtime) + "\n";
    sig = crc32_bytes(line.data(), line.size(), sig);
  }
  const std::string stamp = (fs::path(cfg.run.out_dir) / "image_check.json").string();
  nlohmann::json want = {{"images", files.size()}, {"signature", sig}};
  std::vector<std::string> bad, problems;  // paths; "where: why" lines
  bool checked = false;
  try {
    if (fs::exists(stamp)) {
      const auto j = nlohmann::json::parse(read_text_file(stamp));
      if (j.value("images", nlohmann::json()) == want["images"] && j.value("signature", nlohmann::json()) == sig) {
        for (const auto& p : j.value("undecodable", nlohmann::json::array())) {
          bad.push_back(p.get<std::string>());
          problems.push_back(bad.back() + ": found by an earlier check of the same files");
        }
        checked = true;
      }
    }
  } catch (const std::exception&) {
    bad.clear(), problems.clear();
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (!checked) {
    if (!decode_images(refs, [&](const std::string& path, const std::string& p) { bad.push_back(path), problems.push_back(p); },
                       stop))
      return {};  // nothing recorded
    want["undecodable"] = bad;
    atomic_write_text(stamp, json_text(want) + "\n");  // the same files are not decoded again on a resume
  }
  if (bad.empty()) {
    if (!checked)
      spdlog::info("data.check_images: {} training images decode ({})", files.size(),
                   format_duration(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
    return {};
  }
  if (cfg.train.on_bad_batch == "skip") {
    spdlog::warn("data.check_images: {} of {} training images cannot be decoded (first: {}); train.on_bad_batch: skip "
                 "leaves the records that read them out of training",
                 bad.size(), files.size(), problems.front());
    return bad;
  }
  std::string msg = "data.check_images: " + std::to_string(bad.size()) + " of " + std::to_string(files.size()) +
                    " training images cannot be decoded (fix or remove those records, or set train.on_bad_batch: "
                    "skip to train without them; `trialign data check` lists every problem):";
  for (size_t i = 0; i < problems.size() && i < 20; ++i) msg += "\n  " + problems[i];
  if (problems.size() > 20) msg += "\n  ... and " + std::to_string(problems.size() - 20) + " more";
  throw DataError(msg);
}

DataCheckResult check_data(const RunConfig& cfg, bool decode_images) {
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  const int64_t tpi = cfg.is_vlm() && !cfg.data.drop_images ? visual_tokens_per_image(cfg.model) : 0;
  struct Source {
    std::string role, path;
    bool train, conversations;
    int64_t limit;
  };
  std::vector<Source> sources = {{"data.train", cfg.data.train, true, false, 0}};
  if (!cfg.data.val.empty()) sources.push_back({"data.val", cfg.data.val, false, false, cfg.data.val_limit});
  for (size_t i = 0; i < cfg.eval.sets.size(); ++i)
    sources.push_back({"eval.sets[" + std::to_string(i) + "] (" + cfg.eval.sets[i].name + ")", cfg.eval.sets[i].data, false,
                       true, cfg.eval.sets[i].limit});

  DataCheckResult r;
  nlohmann::json manifests = nlohmann::json::array(), problems = nlohmann::json::array(),
                 notes = nlohmann::json::array();
  std::map<std::string, int64_t> counts;
  auto add = [&](const std::string& role, const std::string& message, const std::string& policy) {
    const std::string kind = problem_kind(message);
    problems.push_back({{"set", role}, {"kind", kind}, {"message", message}, {"policy", policy}});
    ++counts[kind];
    r.would_fail = r.would_fail || policy != "skip";
  };
  std::vector<std::pair<std::string, ImageRefs>> images;  // per set
  for (const auto& s : sources) {
    Loaded l;
    const auto before = tok.coverage();
    {
      ProblemCollector collector;
      try {
        l = load_set(cfg, s.path, s.train, s.conversations, tok, tpi, s.limit);
      } catch (const DataError& e) {  // a missing manifest, or nothing usable left
        collector.problems.push_back({s.path, e.what(), "fail"});
      }
      for (const auto& p : collector.problems) add(s.role, p.message, p.policy);
    }
    const auto coverage = tok.coverage_since(before);
    manifests.push_back({{"set", s.role},
                         {"path", s.path},
                         {"usable_records", l.usable},
                         {"images", l.images.size()},
                         {"tokens", coverage.tokens},
                         {"unknown_tokens", coverage.unknown}});
    // Not a problem the run stops on, but a model that cannot see part of its text: said apart.
    const std::string note = unknown_tokens_note(coverage, s.role, cfg.data.tokenizer);
    if (!note.empty()) notes.push_back(note);
    images.emplace_back(s.role, std::move(l.images));
  }

  if (decode_images) {
    const std::string policy = cfg.train.on_bad_batch == "skip" ? "skip" : "fail";
    for (const auto& [role, refs] : images) trialign::decode_images(refs, [&](const std::string&, const std::string& p) { add(role, p, policy); });
  }
  r.report = {{"config", cfg.source},
              {"manifests", manifests},
              {"problems", problems},
              {"notes", notes},
              {"counts", counts},
              {"images_decoded", decode_images},
              {"would_fail", r.would_fail}};
  return r;
}

std::vector<int64_t> share_left_out_records(const std::vector<int64_t>& left_out, int64_t records) {
  std::vector<int64_t> all = left_out;
  if (dist::world_size() > 1) all = nlohmann::json::parse(dist::broadcast_string(nlohmann::json(left_out).dump())).get<std::vector<int64_t>>();
  if (all.empty()) return all;
  const int64_t kept = records - static_cast<int64_t>(all.size());
  if (kept <= 0)
    throw DataError("data.check_images: none of the " + std::to_string(records) +
                    " training records has images that decode; fix the images (`trialign data check` lists them)");
  spdlog::info("data.check_images: {} of {} training records left out (train.on_bad_batch: skip); training draws from "
               "the other {}",
               all.size(), records, kept);
  return all;
}

std::string data_check_text(const DataCheckResult& r, size_t max_lines) {
  const auto& j = r.report;
  std::string out;
  for (const auto& m : j["manifests"])
    out += fmt::format("{}: {} usable records, {} images ({})\n", m["set"].get<std::string>(),
                       m["usable_records"].get<int64_t>(), m["images"].get<int64_t>(), m["path"].get<std::string>());
  for (const auto& n : j.value("notes", nlohmann::json::array())) out += "note: " + n.get<std::string>() + "\n";
  const auto& problems = j["problems"];
  size_t shown = 0;
  for (const auto& p : problems) {
    if (shown++ == max_lines) {
      out += fmt::format("... and {} more (--json lists all)\n", problems.size() - max_lines);
      break;
    }
    out += fmt::format("[{}{}] {}\n", p["kind"].get<std::string>(), p["policy"] == "skip" ? ", skipped by the config" : "",
                       p["message"].get<std::string>());
  }
  if (problems.empty()) {
    out += std::string("no problems found") + (j["images_decoded"].get<bool>() ? " (every image decoded)" : "") + "\n";
  } else {
    std::string counts;
    for (const auto& [k, v] : j["counts"].items()) counts += fmt::format("{}{} {}", counts.empty() ? "" : ", ", k, v.get<int64_t>());
    out += fmt::format("{} problem(s): {}\n", problems.size(), counts);
    out += r.would_fail ? "the run would stop on these: fix them, or set data.on_bad_record / data.on_too_long / "
                          "train.on_bad_batch to skip them\n"
                        : "the config's policies skip all of them (each is counted in the run's log)\n";
  }
  return out;
}

}  // namespace trialign
