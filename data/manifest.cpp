#include "data/manifest.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/errors.h"

namespace trialign {

namespace {

std::string record_id(const nlohmann::json& j, size_t index) {
  if (j.is_object()) {
    auto it = j.find("id");
    if (it != j.end()) return it->is_string() ? it->get<std::string>() : it->dump();
  }
  return "#" + std::to_string(index);
}

// Line of a byte offset, for JSON-list parse errors.
size_t line_of(const std::string& text, size_t byte) {
  size_t line = 1;
  for (size_t i = 0; i < byte && i < text.size(); ++i) line += text[i] == '\n';
  return line;
}

}  // namespace

namespace {
ProblemCollector* g_collector = nullptr;
}

ProblemCollector::ProblemCollector() {
  if (g_collector) throw std::logic_error("one ProblemCollector at a time");
  g_collector = this;
}
ProblemCollector::~ProblemCollector() { g_collector = nullptr; }

std::vector<ManifestRecord> read_manifest(const std::string& path) {
  if (std::filesystem::is_directory(path))  // an ifstream opens a folder and reads nothing
    throw DataError("manifest '" + path + "' is a folder; name the .json or .jsonl file in it (data.train, data.val, "
                    "eval.sets[].data or --data)");
  std::ifstream in(path, std::ios::binary);
  if (!in)
    throw DataError("cannot open manifest '" + path + "': check the path (data.train, data.val, eval.sets[].data or --data)");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  std::vector<ManifestRecord> out;

  // A UTF-8 byte order mark (Windows editors, Python's utf-8-sig) before a JSON list: the list
  // is still one (the JSON parser skips the mark itself).
  const size_t bom = text.compare(0, 3, "\xEF\xBB\xBF") == 0 ? 3 : 0;
  size_t first = text.find_first_not_of(" \t\r\n", bom);
  if (first == std::string::npos) return out;  // empty manifest
  if (text[first] == '[') {
    nlohmann::json doc;
    try {
      doc = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
      throw DataError(path + ":" + std::to_string(line_of(text, e.byte)) + ": malformed JSON: " + e.what());
    } catch (const nlohmann::json::exception& e) {  // out_of_range: a number such as 1e400
      throw DataError(path + ": malformed JSON: " + e.what());
    }
    for (size_t i = 0; i < doc.size(); ++i) {
      if (!doc[i].is_object())
        throw DataError(path + "[#" + std::to_string(i) + "]: expected a JSON object per record, got " +
                        std::string(doc[i].type_name()));
      std::string id = record_id(doc[i], i);
      out.push_back({std::move(doc[i]), path + "[#" + std::to_string(i) + "]", std::move(id)});
    }
    return out;
  }

  std::istringstream lines(text);
  std::string line;
  size_t lineno = 0;
  while (std::getline(lines, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    std::string problem;
    try {
      j = nlohmann::json::parse(line);
      if (!j.is_object()) problem = path + ":" + std::to_string(lineno) + ": expected a JSON object, got " + j.type_name();
    } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for a number such as 1e400
      problem = path + ":" + std::to_string(lineno) + ": malformed JSON line: " + e.what();
    }
    if (!problem.empty()) {
      if (!g_collector) throw DataError(problem);
      g_collector->problems.push_back({path, problem, "fail"});
      continue;
    }
    std::string id = record_id(j, out.size());
    out.push_back({std::move(j), path + ":" + std::to_string(lineno), std::move(id)});
  }
  return out;
}

std::string require_string(const ManifestRecord& r, const char* field) {
  auto it = r.json.find(field);
  if (it == r.json.end()) throw DataError(r.where + " (id " + r.id + "): missing field '" + field + "'");
  if (!it->is_string())
    throw DataError(r.where + " (id " + r.id + "): field '" + field + "' must be a string, got " + it->type_name());
  return it->get<std::string>();
}

void RecordProblems::finish(const std::string& manifest, const std::string& policy, const std::string& hint) const {
  if (g_collector) {
    for (const auto& m : messages) g_collector->problems.push_back({manifest, m, policy});
    return;
  }
  if (messages.empty() || policy == "skip") return;
  std::string all = manifest + ": " + std::to_string(messages.size()) + " bad record" +
                    (messages.size() == 1 ? "" : "s") + " (" + hint + ")";
  if (none_usable && messages.size() > 1)
    all = manifest + ": not one record is usable, so this is probably another kind of file than this command reads " +
          "(captions for stage 1, conversations for stages 2-3 and eval, prompt/chosen/rejected pairs or prompt/answer " +
          "records for preference training; docs/user-guide.md, \"Data formats\"). " + all;
  for (size_t i = 0; i < messages.size() && i < 20; ++i) all += "\n  " + messages[i];
  if (messages.size() > 20) all += "\n  ... and " + std::to_string(messages.size() - 20) + " more";
  throw DataError(all);
}

}  // namespace trialign
