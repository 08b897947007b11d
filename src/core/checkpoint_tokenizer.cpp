#include "core/checkpoint_tokenizer.h"

#include <filesystem>

#include "core/checkpoint.h"
#include "core/errors.h"

namespace trialign {

nlohmann::json tokenizer_record(const std::string& tokenizer_path) {
  std::error_code ec;
  if (tokenizer_path.empty() || !std::filesystem::is_regular_file(tokenizer_path, ec)) return nullptr;
  return {{"path", tokenizer_path},
          {"bytes", static_cast<int64_t>(std::filesystem::file_size(tokenizer_path))},
          {"crc32", crc32_file(tokenizer_path)}};
}

void check_checkpoint_tokenizer(const std::string& dir, const std::string& tokenizer_path, const std::string& use) {
  const std::string state_path = dir + "/trainer_state.json";
  std::error_code ec;
  if (!std::filesystem::exists(state_path, ec)) return;
  nlohmann::json state;
  try {
    state = nlohmann::json::parse(read_text_file(state_path));
  } catch (const nlohmann::json::exception& e) {
    throw DataError(state_path + ": unreadable (" + e.what() + ")");
  }
  const auto it = state.find("tokenizer");
  if (it == state.end() || !it->is_object()) return;  // written before checkpoints recorded it
  const nlohmann::json now = tokenizer_record(tokenizer_path);
  if (now.is_null()) return;
  const nlohmann::json& then = *it;
  for (const char* key : {"crc32", "bytes"})
    if (!then.contains(key) || !then[key].is_number_integer())
      throw DataError(state_path + ": tokenizer." + key + " must be an integer (the file is damaged; " +
                      "remove its \"tokenizer\" entry to load the checkpoint unchecked)");
  if (then["crc32"].get<int64_t>() == now["crc32"].get<int64_t>() &&
      then["bytes"].get<int64_t>() == now["bytes"].get<int64_t>())
    return;
  auto describe = [](const nlohmann::json& r) {
    return "'" + r.value("path", std::string("?")) + "' (" + std::to_string(r.value("bytes", int64_t{0})) +
           " bytes, crc32 " + std::to_string(r.value("crc32", int64_t{0})) + ")";
  };
  // What to do depends on who names the file: a new run's config, or the checkpoint's own.
  const bool run_config = use == "resume" || use.rfind("init_from", 0) == 0;
  const std::string remedy =
      run_config ? "Point data.tokenizer at the tokenizer it was trained with" +
                       std::string(use == "resume" ? "" : ", or train the stage that wrote '" + dir + "' again with this one")
                 : "The checkpoint's config.yaml names its data.tokenizer: put the file it was trained with back there";
  throw ConfigError(use + ": checkpoint '" + dir + "' was trained with the tokenizer " + describe(then) +
                    ", but the tokenizer here is " + describe(now) +
                    ", another file: the checkpoint's token ids would mean other pieces. " + remedy);
}

}  // namespace trialign
