#include "tools/data_check.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <set>

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

Loaded load(const RunConfig& cfg, const std::string& manifest, bool train_set, bool conversations, const Tokenizer& tok,
            int64_t tokens_per_image, int64_t limit) {
  Loaded out;
  if (!cfg.is_vlm()) {
    CaptionDataset ds(manifest, cfg.data, tok, train_set, limit);
    out.usable = ds.size(), out.skipped = ds.skipped();
    for (int64_t i = 0; i < ds.size(); ++i) out.images.emplace_back(ds.where(i), ds.image_path(i));
    return out;
  }
  if (cfg.trainer == "preference" && !conversations) {
    auto loss = preference_losses().create_or_throw(cfg.loss);
    const CompletionSampling* sampling = loss->sampling();
    PreferenceDataset ds(manifest, cfg.data, tok, tokens_per_image,
                         sampling ? PreferenceDataset::Kind::Prompts : PreferenceDataset::Kind::Pairs, train_set, limit,
                         sampling ? sampling->max_new_tokens : 0);
    out.usable = ds.size(), out.skipped = ds.skipped();
    for (int64_t i = 0; i < ds.size(); ++i)
      for (const auto& img : ds.sample(i).images)
        out.images.emplace_back(ds.sample(i).where + " (id " + ds.sample(i).id + ")", img);
    return out;
  }
  ConversationDataset ds(manifest, cfg.data, tok, tokens_per_image, train_set, limit);
  out.usable = ds.size(), out.skipped = ds.skipped();
  for (int64_t i = 0; i < ds.size(); ++i)
    for (const auto& img : ds.sample(i).images)
      out.images.emplace_back(ds.sample(i).where + " (id " + ds.sample(i).id + ")", img);
  return out;
}

}  // namespace

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
  nlohmann::json manifests = nlohmann::json::array(), problems = nlohmann::json::array();
  std::map<std::string, int64_t> counts;
  auto add = [&](const std::string& role, const std::string& message, const std::string& policy) {
    const std::string kind = problem_kind(message);
    problems.push_back({{"set", role}, {"kind", kind}, {"message", message}, {"policy", policy}});
    ++counts[kind];
    r.would_fail = r.would_fail || policy != "skip";
  };
  std::vector<std::pair<std::string, std::pair<std::string, std::string>>> images;  // (role, (where, path))
  for (const auto& s : sources) {
    Loaded l;
    {
      ProblemCollector collector;
      try {
        l = load(cfg, s.path, s.train, s.conversations, tok, tpi, s.limit);
      } catch (const DataError& e) {  // a missing manifest, or nothing usable left
        collector.problems.push_back({s.path, e.what(), "fail"});
      }
      for (const auto& p : collector.problems) add(s.role, p.message, p.policy);
    }
    manifests.push_back({{"set", s.role}, {"path", s.path}, {"usable_records", l.usable}, {"images", l.images.size()}});
    for (auto& im : l.images) images.push_back({s.role, std::move(im)});
  }

  if (decode_images) {
    // Decoding is where a corrupt body behind a valid header shows; a run would meet it mid-way.
    std::set<std::string> seen;
    const auto t0 = std::chrono::steady_clock::now();
    auto last = t0;
    int64_t done = 0;
    const std::string policy = cfg.train.on_bad_batch == "skip" ? "skip" : "fail";
    for (const auto& [role, img] : images) {
      ++done;
      if (!seen.insert(img.second).second) continue;
      try {
        load_image_rgb(img.second);
      } catch (const DataError& e) {
        add(role, img.first + ": " + e.what(), policy);
      }
      const auto now = std::chrono::steady_clock::now();
      if (now - last > std::chrono::seconds(5)) {
        last = now;
        const double s = std::chrono::duration<double>(now - t0).count(), rate = done / std::max(1e-9, s);
        spdlog::info("data check: images {}/{} ({:.0f}%) | {:.0f} images/s | ETA {}", done, images.size(),
                     100.0 * done / images.size(), rate, format_duration((images.size() - done) / std::max(1e-9, rate)));
      }
    }
  }
  r.report = {{"config", cfg.source},
              {"manifests", manifests},
              {"problems", problems},
              {"counts", counts},
              {"images_decoded", decode_images},
              {"would_fail", r.would_fail}};
  return r;
}

std::string data_check_text(const DataCheckResult& r, size_t max_lines) {
  const auto& j = r.report;
  std::string out;
  for (const auto& m : j["manifests"])
    out += fmt::format("{}: {} usable records, {} images ({})\n", m["set"].get<std::string>(),
                       m["usable_records"].get<int64_t>(), m["images"].get<int64_t>(), m["path"].get<std::string>());
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
