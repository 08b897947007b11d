#include "tools/interop.h"

#include <spdlog/spdlog.h>

#include <filesystem>
#include <iomanip>
#include <sstream>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/config_tree.h"
#include "core/errors.h"
#include "core/safetensors.h"
#include "core/weight_files.h"
#include "data/image.h"
#include "data/tokenizer.h"
#include "models/hf_interop.h"
#include "models/vlm.h"
#include "trainers/contrastive.h"
#include "trainers/vlm.h"
#include "core/json_text.h"

namespace fs = std::filesystem;

namespace trialign {

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

// Our component of a tensor name, for grouping; Hugging Face files of other layouts group by
// their first name segment.
std::string group_of(const std::string& name) {
  const std::string c = component_of(name);
  if (!c.empty()) return c;
  const auto dot = name.find('.');
  return dot == std::string::npos ? name : name.substr(0, dot);
}

void add_file(nlohmann::json& j, const std::string& file, bool tensors) {
  const auto h = read_safetensors_header(file);
  for (const auto& t : h.tensors) {
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    auto& g = j["components"][group_of(t.name)];
    if (g.is_null()) g = {{"tensors", 0}, {"parameters", int64_t{0}}, {"dtypes", nlohmann::json::array()}};
    g["tensors"] = g["tensors"].get<int>() + 1;
    g["parameters"] = g["parameters"].get<int64_t>() + n;
    if (std::find(g["dtypes"].begin(), g["dtypes"].end(), t.dtype) == g["dtypes"].end()) g["dtypes"].push_back(t.dtype);
    if (tensors) j["tensors"].push_back({{"name", t.name}, {"dtype", t.dtype}, {"shape", t.shape}, {"file", file}});
  }
}

torch::ScalarType dtype_of(const std::string& s) {
  if (s == "fp32") return torch::kFloat32;
  if (s == "bf16") return torch::kBFloat16;
  if (s == "fp16") return torch::kFloat16;
  throw ConfigError("--dtype '" + s + "': use fp32, bf16 or fp16");
}

}  // namespace

RunConfig checkpoint_config_of(const std::string& dir) {
  return run_config_from_tree(parse_config_string(read_text_file(dir + "/config.yaml"), dir + "/config.yaml"),
                              dir + "/config.yaml");
}

nlohmann::json inspect_weights(const std::string& path, bool tensors, bool verify) {
  nlohmann::json j;
  j["components"] = nlohmann::json::object();
  if (tensors) j["tensors"] = nlohmann::json::array();
  if (is_hf_weights(path)) {
    j["kind"] = "huggingface";
    j["path"] = path;
    for (const auto& f : weight_files(path)) {
      j["files"].push_back({{"name", f}, {"bytes", fs::file_size(f)}});
      add_file(j, f, tensors);
    }
    const fs::path dir = fs::is_directory(path) ? fs::path(path) : fs::path(path).parent_path();
    if (fs::exists(dir / "config.json")) {
      try {
        j["config"] = nlohmann::json::parse(read_text_file((dir / "config.json").string()));
      } catch (const nlohmann::json::exception& e) {
        throw DataError((dir / "config.json").string() + ": not valid JSON (" + e.what() + ")");
      }
    }
    return j;
  }
  const std::string dir = resolve_checkpoint(path, [](const std::string& w) { spdlog::warn(w); });
  nlohmann::json m;
  if (verify) {
    m = verify_checkpoint(dir).manifest;
    j["verified"] = true;
  } else {
    try {
      m = nlohmann::json::parse(read_text_file(dir + "/MANIFEST.json"));
    } catch (const nlohmann::json::exception& e) {
      throw DataError(dir + "/MANIFEST.json: damaged manifest (" + e.what() + ")");
    }
  }
  j["kind"] = "checkpoint";
  j["path"] = dir;
  j["step"] = m.value("step", int64_t{0});
  j["trainer"] = m.value("trainer", std::string());
  j["format_version"] = m.value("format_version", 0);
  if (m.contains("files") && m["files"].is_object())
    for (auto it = m["files"].begin(); it != m["files"].end(); ++it)
      j["files"].push_back({{"name", it.key()}, {"bytes", it.value().value("bytes", uint64_t{0})}});
  if (fs::exists(dir + "/trainer_state.json")) {
    try {
      j["trainer_state"] = nlohmann::json::parse(read_text_file(dir + "/trainer_state.json"));
    } catch (const nlohmann::json::exception& e) {
      throw DataError(dir + "/trainer_state.json: not valid JSON (" + e.what() + ")");
    }
  }
  if (fs::exists(dir + "/config.yaml")) {
    const RunConfig cfg = checkpoint_config_of(dir);
    j["config"] = {{"trainer", cfg.trainer}, {"run.name", cfg.run.name}, {"data.train", cfg.data.train},
                   {"data.tokenizer", cfg.data.tokenizer}, {"loss", cfg.loss.type}};
    j["config_yaml"] = read_text_file(dir + "/config.yaml");
  }
  add_file(j, dir + "/model.safetensors", tensors);
  if (fs::exists(dir + "/loss.safetensors")) add_file(j, dir + "/loss.safetensors", tensors);
  return j;
}

std::string inspect_text(const nlohmann::json& j) {
  std::ostringstream o;
  if (j["kind"] == "checkpoint") {
    o << "checkpoint  " << j["path"].get<std::string>() << "\n";
    o << "trainer     " << j["trainer"].get<std::string>() << "   step " << j["step"].get<int64_t>() << "   format "
      << j["format_version"].get<int>() << (j.value("verified", false) ? "   checksums verified" : "") << "\n";
    if (j.contains("config"))
      for (auto it = j["config"].begin(); it != j["config"].end(); ++it)
        o << "  " << std::left << std::setw(16) << it.key() << it.value().get<std::string>() << "\n";
  } else {
    o << "Hugging Face weights  " << j["path"].get<std::string>() << "\n";
    if (j.contains("config") && j["config"].contains("architectures"))
      o << "  architectures   " << json_text(j["config"]["architectures"]) << "\n";
  }
  o << "files\n";
  for (const auto& f : j["files"])
    o << "  " << std::left << std::setw(44) << f["name"].get<std::string>() << std::right << std::setw(14)
      << f["bytes"].get<uint64_t>() << " bytes\n";
  o << "components\n";
  int64_t total = 0;
  for (auto it = j["components"].begin(); it != j["components"].end(); ++it) {
    const auto& g = it.value();
    total += g["parameters"].get<int64_t>();
    std::string dtypes;
    for (const auto& d : g["dtypes"]) dtypes += (dtypes.empty() ? "" : ",") + d.get<std::string>();
    o << "  " << std::left << std::setw(20) << it.key() << std::right << std::setw(6) << g["tensors"].get<int>()
      << " tensors " << std::setw(12) << g["parameters"].get<int64_t>() << " values  " << dtypes << "\n";
  }
  o << "  total " << total << " values (" << std::fixed << std::setprecision(2) << total / 1e6 << "M)\n";
  if (j.contains("tensors") && j["tensors"].is_array()) {
    o << "tensors\n";
    for (const auto& t : j["tensors"])
      o << "  " << std::left << std::setw(60) << t["name"].get<std::string>() << " " << std::setw(5)
        << t["dtype"].get<std::string>() << " " << shape_str(t["shape"].get<std::vector<int64_t>>()) << "\n";
  }
  return o.str();
}

std::vector<std::string> export_checkpoint(const std::string& checkpoint, const std::string& out_dir,
                                           const std::string& dtype, uint64_t max_shard_bytes) {
  const auto type = dtype_of(dtype);
  const std::string dir = resolve_checkpoint(checkpoint, [](const std::string& w) { spdlog::warn(w); }, CheckpointUse::Weights);
  const auto info = verify_checkpoint(dir, CheckpointUse::Weights);
  std::error_code ec;
  if (fs::exists(out_dir, ec) && !fs::is_empty(out_dir, ec))
    throw ConfigError("export: '" + out_dir + "' exists and is not empty; choose a new folder");
  RunConfig cfg = checkpoint_config_of(dir);
  check_checkpoint_tokenizer(dir, cfg.data.tokenizer, "export");  // the export copies that file
  auto tensors = load_safetensors(dir + "/model.safetensors");
  // Vocabulary sizes taken from the tokenizer at training time are read back from the weights.
  if (tensors.count("model.embed_tokens.weight") && cfg.model.llm.vocab_size == 0)
    cfg.model.llm.vocab_size = static_cast<int>(tensors.at("model.embed_tokens.weight").size(0));
  if (tensors.count("text_model.embeddings.token_embedding.weight") && cfg.model.text.vocab_size == 0)
    cfg.model.text.vocab_size = static_cast<int>(tensors.at("text_model.embeddings.token_embedding.weight").size(0));
  // config.json is written from config.yaml: a config.yaml that no longer describes the weights
  // (edited by hand) would export a folder no loader can use. Loaded strictly, as eval does.
  try {
    RunConfig probe = cfg;
    auto model = build_model_with_weights(probe, {});
    load_state(*model, tensors, "", /*strict=*/true, dir + "/model.safetensors");
  } catch (const DataError& e) {
    throw DataError("export: " + dir + "/config.yaml does not describe the weights it sits with: " + e.what());
  }
  // Provenance without the checkpoint's path, so that exporting the same checkpoint from
  // anywhere writes the same bytes: its trainer, step and model.safetensors' CRC-32 (as its
  // MANIFEST.json records it).
  const std::map<std::string, std::string> meta = {
      {"format", "pt"},
      {"trialign_trainer", info.trainer},
      {"trialign_step", std::to_string(info.step)},
      {"trialign_model_crc32", std::to_string(info.manifest.at("files").at("model.safetensors").at("crc32").get<uint32_t>())}};
  auto cast = [&](const torch::Tensor& t) { return t.is_floating_point() ? t.to(type) : t; };
  std::vector<std::string> written;
  auto write_folder = [&](const std::string& sub, const NamedTensors& part, const nlohmann::json& config) {
    for (const auto& f : save_weights(sub, part, max_shard_bytes, meta)) written.push_back(f);
    auto c = config;
    if (c.contains("torch_dtype")) c["torch_dtype"] = type == torch::kFloat32 ? "float32" : type == torch::kBFloat16 ? "bfloat16" : "float16";
    atomic_write_text(sub + "/config.json", json_text(c, 2) + "\n");
    written.push_back(sub + "/config.json");
  };
  auto copy_tokenizer = [&](const std::string& sub) {
    if (cfg.data.tokenizer.empty() || !fs::exists(cfg.data.tokenizer)) return;
    fs::copy_file(cfg.data.tokenizer, sub + "/tokenizer.model", fs::copy_options::overwrite_existing);
    written.push_back(sub + "/tokenizer.model");
  };
  auto component_part = [&](const std::string& comp) {
    NamedTensors part;
    const auto prefixes = component_prefixes(comp);
    for (const auto& [n, t] : tensors)
      for (const auto& p : prefixes)
        if (n.rfind(p, 0) == 0) {
          part.emplace_back(n, cast(t));
          break;
        }
    return part;
  };
  if (!cfg.is_vlm() && cfg.model.vision.pooling != "cls") {
    // A CLIPModel's image embedding is its pooled CLS state, so no CLIPModel reproduces this
    // one's; the tower itself is an ordinary CLIPVisionModel (pooling has no weights), and it is
    // what a LLaVA-style stage 2 reads. Unless it has overlapping patches: then this throws.
    const nlohmann::json tower_config = hf_config_json("vision_model", cfg);
    spdlog::warn("export: model.vision.pooling is {}, which a Hugging Face CLIPModel cannot describe (it embeds images "
                 "by their CLS state): writing the vision tower alone as {}/vision_model (CLIPVisionModel); the text "
                 "tower and projections stay in {}/model.safetensors for init_from",
                 cfg.model.vision.pooling, out_dir, dir);
    write_folder((fs::path(out_dir) / "vision_model").string(), component_part("vision_model"), tower_config);
    return written;
  }
  if (!cfg.is_vlm()) {
    NamedTensors all;
    for (const auto& [n, t] : tensors) all.emplace_back(n, cast(t));
    // CLIPModel keeps the temperature (log scale) as a parameter of the model; here the loss owns it.
    if (fs::exists(dir + "/loss.safetensors"))
      for (const auto& [n, t] : load_safetensors(dir + "/loss.safetensors"))
        if (n == "logit_scale" || n == "logit_bias") all.emplace_back(n, cast(t));
    auto config = hf_config_json("clip", cfg);
    write_folder(out_dir, all, config);
    copy_tokenizer(out_dir);
    return written;
  }
  for (const std::string comp : {"vision_model", "mm_projector", "language_model"}) {
    if (comp == "vision_model" && cfg.model.vision.kernel() != cfg.model.vision.patch_size) {
      // No Hugging Face config describes overlapping patches; the projector and the language
      // model are still ordinary Hugging Face components, so they are written without it.
      spdlog::warn("export: vision_model left out: model.vision.patch_kernel_size is {} (overlapping patches), which "
                   "a Hugging Face CLIPVisionConfig cannot describe; init_from reads it from {}/model.safetensors",
                   cfg.model.vision.kernel(), dir);
      continue;
    }
    const std::string sub = (fs::path(out_dir) / comp).string();
    write_folder(sub, component_part(comp), hf_config_json(comp, cfg));
    if (comp == "language_model") copy_tokenizer(sub);
  }
  return written;
}

WeightSource parse_weight_source(const std::string& arg) {
  const auto eq = arg.find('=');
  if (eq == std::string::npos || eq == 0 || eq + 1 == arg.size())
    throw ConfigError("--weights '" + arg + "': expected COMPONENT=PATH, e.g. language_model=hf/llama");
  return {arg.substr(0, eq), arg.substr(eq + 1)};
}

std::shared_ptr<torch::nn::Module> build_model_with_weights(RunConfig& cfg, const std::vector<WeightSource>& sources) {
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  torch::manual_seed(cfg.run.seed);
  std::shared_ptr<torch::nn::Module> model;
  if (cfg.is_vlm()) model = build_vlm_model(cfg, tok).ptr();
  else model = build_clip_model(cfg, tok).ptr();
  const auto components = model_components(cfg.is_vlm());
  for (const auto& s : sources)
    if (std::find(components.begin(), components.end(), s.component) == components.end()) {
      std::string list;
      for (const auto& c : components) list += (list.empty() ? "" : ", ") + c;
      throw ConfigError("--weights " + s.component + "=" + s.path + ": '" + s.component + "' is not a component of " +
                        (cfg.is_vlm() ? "a vision-language" : "a contrastive") + " model (trainer " + cfg.trainer +
                        "); its components are " + list);
    }
  for (const auto& s : sources) init_components(*model, InitFrom{s.path, {s.component}}, cfg.model, cfg.data.tokenizer);
  model->eval();
  return model;
}

std::string import_weights(RunConfig cfg, const std::vector<WeightSource>& sources, const std::string& out_dir) {
  if (sources.empty()) throw ConfigError("import: give at least one --weights COMPONENT=PATH");
  if (has_checkpoints(out_dir))
    throw ConfigError("import: '" + out_dir + "' already holds checkpoints; choose a new folder");
  // NaN or inf in the weights given is refused as they load (load_component names the tensors).
  auto model = build_model_with_weights(cfg, sources);
  std::vector<std::string> loaded, seeded;
  for (const auto& s : sources) loaded.push_back(s.component);
  for (const auto& c : model_components(cfg.is_vlm()))
    if (std::find(loaded.begin(), loaded.end(), c) == loaded.end()) seeded.push_back(c);
  if (!seeded.empty()) {
    std::string list;
    for (const auto& c : seeded) list += (list.empty() ? "" : ", ") + c;
    spdlog::warn("import: {} not given: they keep the seeded random initialisation (run.seed {})", list, cfg.run.seed);
  }
  CheckpointWriter w(out_dir, 0, "import");
  save_safetensors(w.path("model.safetensors"), named_state(*model), {{"format", "pt"}});
  w.add_text("config.yaml", resolved_yaml(cfg));
  nlohmann::json record = nlohmann::json::array();
  for (const auto& s : sources) record.push_back({{"component", s.component}, {"path", s.path}});
  w.add_json("import.json", record);
  return w.commit(1);
}

std::shared_ptr<torch::nn::Module> load_checkpoint_model(const std::string& checkpoint, RunConfig* cfg_out) {
  const std::string dir = resolve_checkpoint(checkpoint, [](const std::string& w) { spdlog::warn(w); }, CheckpointUse::Weights);
  verify_checkpoint(dir, CheckpointUse::Weights);
  RunConfig cfg = checkpoint_config_of(dir);
  check_checkpoint_tokenizer(dir, cfg.data.tokenizer, "forward");
  auto model = build_model_with_weights(cfg, {});
  load_state(*model, load_safetensors(dir + "/model.safetensors"), "", true, dir + "/model.safetensors");
  model->eval();
  if (cfg_out) *cfg_out = cfg;
  return model;
}

std::map<std::string, torch::Tensor> forward_outputs(torch::nn::Module& module, const RunConfig& cfg,
                                                     const ForwardInputs& in) {
  if (in.image.empty() && in.tokens.empty() && in.text.empty())
    throw ConfigError("forward: give --image, --tokens or --text");
  if (!in.tokens.empty() && !in.text.empty()) throw ConfigError("forward: give --tokens or --text, not both");
  torch::NoGradGuard ng;
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  std::map<std::string, torch::Tensor> out;
  torch::Tensor pixels;
  if (!in.image.empty()) {
    pixels = image_transform(load_image_rgb(in.image), cfg.data, /*train=*/false, 0).unsqueeze(0);
    out["pixel_values"] = pixels;
  }
  std::vector<int64_t> ids = in.tokens;
  if (!in.text.empty()) {
    if (!cfg.is_vlm()) {
      ids = encode_for_text_encoder(tok, in.text, cfg.model.text.max_position_embeddings);
    } else {
      if (tok.bos_id() >= 0) ids.push_back(tok.bos_id());
      for (int id : tok.encode(in.text)) ids.push_back(id);
    }
  }
  const int64_t vocab = cfg.is_vlm() ? dynamic_cast<VlmModelImpl&>(module).llm->config().vocab_size
                                     : cfg.model.text.vocab_size;
  for (auto id : ids)
    if (id < 0 || (vocab > 0 && id >= vocab))
      throw ConfigError("forward: token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                        std::to_string(vocab) + ")");
  if (!ids.empty()) out["input_ids"] = torch::tensor(ids, torch::kInt64).unsqueeze(0);

  if (!cfg.is_vlm()) {
    auto& clip = dynamic_cast<ClipModelImpl&>(module);
    if (pixels.defined()) out["image_embeds"] = clip.encode_image(pixels);
    if (!ids.empty()) {
      if (static_cast<int>(ids.size()) > cfg.model.text.max_position_embeddings)
        throw ConfigError("forward: " + std::to_string(ids.size()) + " tokens exceed model.text.max_position_embeddings (" +
                          std::to_string(cfg.model.text.max_position_embeddings) + ")");
      out["text_embeds"] = clip.encode_text(out["input_ids"], torch::tensor({static_cast<int64_t>(ids.size())}));
    }
    return out;
  }
  auto& vlm = dynamic_cast<VlmModelImpl&>(module);
  if (pixels.defined()) {
    out["image_features"] = select_vision_features(vlm.vision_model->forward(pixels, true), cfg.model.vision_feature_layer);
    out["image_tokens"] = vlm.mm_projector->forward(out["image_features"]);
  }
  if (!ids.empty()) {
    const int64_t images = tok.image_id() >= 0 ? std::count(ids.begin(), ids.end(), tok.image_id()) : 0;
    const int64_t positions = static_cast<int64_t>(ids.size()) + images * (vlm.tokens_per_image() - 1);
    if (positions > cfg.model.llm.max_position_embeddings)
      throw ConfigError("forward: " + std::to_string(ids.size()) + " tokens (" + std::to_string(positions) +
                        " positions with the image's visual tokens) exceed model.llm.max_position_embeddings (" +
                        std::to_string(cfg.model.llm.max_position_embeddings) + ")");
    const bool has_placeholder = images > 0;
    if (has_placeholder) {
      if (!pixels.defined()) throw ConfigError("forward: the tokens hold <image> but no --image was given");
      if (images > 1)
        throw ConfigError("forward: the tokens hold " + std::to_string(images) + " <image> placeholders (id " +
                          std::to_string(tok.image_id()) + ") but --image gives one image; keep one placeholder");
      const auto inputs = vlm.build_inputs(pixels, {ids}, {std::vector<int64_t>(ids.size(), -100)}, tok.image_id());
      out["logits"] = vlm.llm->logits(vlm.llm->forward_hidden(inputs.embeds, inputs.attention_mask));
    } else {
      out["logits"] = vlm.llm->forward(out["input_ids"]);
    }
  }
  return out;
}

}  // namespace trialign
