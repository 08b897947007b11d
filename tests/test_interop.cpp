// Weights in and out: export -> import round trips, Hugging Face files written by hand (sharded,
// LLaVA names, fp16) landing in the right parameters, `inspect` and `forward` through the command
// line, and SIGTERM through the command line (checkpoint, exit 75, resume).
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <thread>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/errors.h"
#include "core/json_text.h"
#include "core/safetensors.h"
#include "core/weight_files.h"
#include "data/manifest.h"
#include "data/tokenizer.h"
#include "models/hf_interop.h"
#include "test_helpers.h"
#include "tools/interop.h"
#include "trainers/contrastive.h"
#include "trainers/vlm.h"

using namespace trialign;
using trialign::test::message_of;
using trialign::test::quiet;
using trialign::test::TempDir;
using trialign::test::write_file;
namespace fs = std::filesystem;

namespace {

// Tiny shapes world with YAML configs for a stage-1 and a stage-3 model.
struct Corpus {
  TempDir dir{"interop"};
  Corpus() {
    test::write_tiny_shapes_corpus(dir.file("data"), 16, 4);
    write_file(dir.file("vlm.yaml"), R"(
trainer: finetune
run: {threads: 1, seed: 5, precision: fp32}
data: {image_size: 32, max_seq_len: 320, on_too_long: truncate, workers: 1, tokenizer: )" + dir.file("data/tok.model") +
                                         ", train: " + dir.file("data/train_instruct.jsonl") + R"(}
model:
  vision: {image_size: 32, patch_size: 8, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}
  projector: {type: mlp2x_gelu, spatial_merge: 2}
  llm: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 320}
train: {batch_size: 4, log_every: 1, steps: 2}
optim: {lr: 1.0e-2}
schedule: {warmup_steps: 0}
)");
    write_file(dir.file("clip.yaml"), R"(
trainer: contrastive
run: {threads: 1, seed: 5, precision: fp32}
data: {image_size: 32, max_text_len: 24, workers: 1, tokenizer: )" + dir.file("data/tok.model") +
                                          ", train: " + dir.file("data/train.jsonl") + R"(}
model:
  vision: {image_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}
  text: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 24}
  projection_dim: 8
train: {batch_size: 8, log_every: 1, steps: 2}
eval: {recall_at: [1]}
)");
  }
  RunConfig config(const std::string& file, const std::string& out, std::vector<std::string> sets = {}) const {
    sets.push_back("run.out_dir=" + dir.file(out));
    return load_run_config(dir.file(file), sets);
  }
};

// Runs the trialign binary; returns its exit code, output (stdout + stderr) in `out`. Under
// `timeout`, so a refusal that regresses into a hang (e.g. a 100,000-thread pool, which ignores
// SIGTERM: hence -k) fails the test with 124/137 instead of stalling the suite.
int run_cli(const std::string& args, std::string* out = nullptr) {
  return test::run_command("timeout -k 10 300 " + std::string(TRIALIGN_BINARY) + " " + args, out);
}

}  // namespace

TEST_CASE("export -> import: every tensor comes back identical, sharded or not, stage 1 and stages 2-3",
          "[interop][slow]") {
  Corpus c;
  SECTION("stages 2-3: three component folders, the language model sharded") {
    const auto trained = train_vlm(c.config("vlm.yaml", "run"), quiet());
    const std::string exp = c.dir.file("exported");
    const auto files = export_checkpoint(c.dir.file("run"), exp, "fp32", /*max_shard_bytes=*/4096);
    CHECK(fs::exists(exp + "/language_model/model.safetensors.index.json"));
    CHECK(weight_files(exp + "/language_model").size() >= 2);  // shards
    CHECK(fs::exists(exp + "/vision_model/config.json"));
    CHECK(fs::exists(exp + "/language_model/tokenizer.model"));
    const auto cfgjson = nlohmann::json::parse(read_text_file(exp + "/language_model/config.json"));
    CHECK(cfgjson["architectures"][0] == "LlamaForCausalLM");
    // The same checkpoint exported from another folder: the same bytes (no path is recorded).
    const std::string moved_run = c.dir.file("moved_run");
    fs::copy(trained.checkpoint, moved_run, fs::copy_options::recursive);
    export_checkpoint(moved_run, c.dir.file("exported_again"), "fp32", 4096);
    for (const auto& f : files) {
      const std::string rel = fs::relative(f, exp).string();
      INFO(rel);
      CHECK(crc32_file(c.dir.file("exported_again") + "/" + rel) == crc32_file(f));
    }
    CHECK(cfgjson["num_key_value_heads"] == 1);
    CHECK(cfgjson["vocab_size"] > 0);

    // Imported with another seed: only loaded weights can make the tensors equal.
    const std::string ckpt = import_weights(c.config("vlm.yaml", "unused", {"run.seed=77"}),
                                            {{"vision_model", exp + "/vision_model"},
                                             {"mm_projector", exp + "/mm_projector"},
                                             {"language_model", exp + "/language_model/model.safetensors.index.json"}},
                                            c.dir.file("imported"));
    const auto a = load_safetensors(trained.checkpoint + "/model.safetensors");
    const auto b = load_safetensors(ckpt + "/model.safetensors");
    CHECK(a.size() == b.size());
    test::check_same_tensors(a, b);

    // One NaN in the given weights: refused at import, naming the tensor, and nothing written.
    const std::string bad = c.dir.file("bad_vision");
    fs::copy(exp + "/vision_model", bad, fs::copy_options::recursive);
    const std::string bad_file = weight_files(bad).front();
    const auto loaded = load_safetensors(bad_file);
    NamedTensors tensors(loaded.begin(), loaded.end());
    auto& bad_tensor = tensors.front().second;
    REQUIRE(bad_tensor.is_floating_point());
    bad_tensor.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
    save_safetensors(bad_file, tensors);
    CHECK_THAT(message_of<DataError>([&] {
                 import_weights(c.config("vlm.yaml", "unused"), {{"vision_model", bad}}, c.dir.file("imported_bad"));
               }),
               Catch::Contains("component 'vision_model' holds NaN or infinite values in 1 tensor(s): "
                                     "vision_model.embeddings.class_embedding"));
    CHECK_FALSE(has_checkpoints(c.dir.file("imported_bad")));
    // A component the model does not have (a typo, or a stage-1 name for a VLM) is named with the list.
    CHECK_THAT(message_of<ConfigError>([&] {
                 import_weights(c.config("vlm.yaml", "unused"), {{"text_model", bad}}, c.dir.file("imported_bad"));
               }),
               Catch::Contains("--weights text_model=" + bad + ": 'text_model' is not a component of a vision-language "
                               "model (trainer finetune); its components are vision_model, mm_projector, language_model"));
    CHECK_FALSE(has_checkpoints(c.dir.file("imported_bad")));

    // The same outputs through `trialign forward`, from the checkpoint and from config + weights.
    const std::string image = c.dir.file("data/images/val/000000.png");
    std::string log;
    REQUIRE(run_cli("forward " + trained.checkpoint + " --tokens 2,5,4,7 --image " + image + " --out " +
                        c.dir.file("f1.safetensors"),
                    &log) == 0);
    REQUIRE(run_cli("forward --config " + c.dir.file("vlm.yaml") + " --weights vision_model=" + exp +
                        "/vision_model --weights mm_projector=" + exp + "/mm_projector --weights language_model=" + exp +
                        "/language_model --tokens 2,5,4,7 --image " + image + " --out " + c.dir.file("f2.safetensors"),
                    &log) == 0);
    const auto f1 = load_safetensors(c.dir.file("f1.safetensors")), f2 = load_safetensors(c.dir.file("f2.safetensors"));
    test::check_same_tensors(f1, f2);
    // Two <image> placeholders and one --image: named by the command, not by an internal function.
    const std::string image_id = std::to_string(Tokenizer::load(c.dir.file("data/tok.model")).image_id());
    CHECK(run_cli("forward " + trained.checkpoint + " --tokens 2," + image_id + "," + image_id + ",7 --image " + image +
                      " --out " + c.dir.file("f9.safetensors"),
                  &log) == 2);
    CHECK_THAT(log, Catch::Contains("forward: the tokens hold 2 <image> placeholders (id " + image_id +
                                    ") but --image gives one image"));
    // An empty --tokens (or an empty item in the list) is an error, not token 0.
    for (const std::string tokens : {"''", "2,,7", "2,7,"}) {
      CHECK(run_cli("forward " + trained.checkpoint + " --tokens " + tokens + " --out " + c.dir.file("f10.safetensors"), &log) == 2);
      CHECK_THAT(log, Catch::Contains("': an empty token id; give comma-separated integers, e.g. --tokens 1,15,27"));
    }
    CHECK(run_cli("forward " + trained.checkpoint + " --tokens 2,x7 --out " + c.dir.file("f10.safetensors"), &log) == 2);
    CHECK_THAT(log, Catch::Contains("--tokens '2,x7': 'x7' is not a token id"));
    CHECK(!fs::exists(c.dir.file("f10.safetensors")));
    // A checkpoint trained on a larger machine (run.threads 100000 there) still runs here: its
    // thread count is not the model's. The copy's MANIFEST is updated so the edit verifies.
    const std::string moved = c.dir.file("from_big_machine");
    fs::copy(trained.checkpoint, moved, fs::copy_options::recursive);
    std::string yaml = read_text_file(moved + "/config.yaml");
    const std::string saved = "  threads: 1\n";  // run: {threads: 1} above
    const size_t at = yaml.find(saved);
    REQUIRE(at != std::string::npos);
    yaml.replace(at, saved.size(), "  threads: 100000\n");
    test::write_file(moved + "/config.yaml", yaml);
    auto manifest = nlohmann::json::parse(read_text_file(moved + "/MANIFEST.json"));
    manifest["files"]["config.yaml"] = {{"bytes", fs::file_size(moved + "/config.yaml")},
                                        {"crc32", crc32_file(moved + "/config.yaml")}};
    test::write_file(moved + "/MANIFEST.json", manifest.dump(2));
    REQUIRE(run_cli("forward " + moved + " --tokens 2,5,4,7 --image " + image + " --out " + c.dir.file("f3.safetensors"),
                    &log) == 0);
    test::check_same_tensors(f1, load_safetensors(c.dir.file("f3.safetensors")));
    // A config.yaml edited so it no longer describes the weights: export refuses it (it would
    // write a config.json that contradicts the tensors beside it).
    const std::string edited = c.dir.file("edited_config");
    fs::copy(trained.checkpoint, edited, fs::copy_options::recursive);
    yaml = read_text_file(edited + "/config.yaml");
    const size_t inter = yaml.find("intermediate_size: ");
    REQUIRE(inter != std::string::npos);
    yaml.replace(inter, yaml.find('\n', inter) - inter, "intermediate_size: 999");
    test::write_file(edited + "/config.yaml", yaml);
    manifest = nlohmann::json::parse(read_text_file(edited + "/MANIFEST.json"));
    manifest["files"]["config.yaml"] = {{"bytes", fs::file_size(edited + "/config.yaml")},
                                        {"crc32", crc32_file(edited + "/config.yaml")}};
    test::write_file(edited + "/MANIFEST.json", manifest.dump(2));
    CHECK_THAT(message_of<DataError>([&] { export_checkpoint(edited, c.dir.file("exported_edited"), "fp32", 0); }),
               Catch::Contains("export: " + edited + "/config.yaml does not describe the weights it sits with"));
    // A preference file given to eval: not one record is a conversation, and the error says so first.
    REQUIRE(run_cli("eval " + trained.checkpoint + " --data " + c.dir.file("data/val_pref.jsonl"), &log) == 2);
    CHECK_THAT(log, Catch::Contains("not one record is usable, so this is probably another kind of file"));
    // Token 4 is <image> in the test tokenizer: it expands to the image's 4 visual tokens.
    CHECK(f1.at("logits").sizes() == torch::IntArrayRef({1, 7, cfgjson["vocab_size"].get<int64_t>()}));
    CHECK(f1.at("image_tokens").sizes() == torch::IntArrayRef({1, 4, 16}));
    CHECK(f1.at("image_features").sizes() == torch::IntArrayRef({1, 16, 16}));

    // The yes/no probes and captions through `trialign eval`: every probe scored, per level and sampling.
    REQUIRE(run_cli("eval " + trained.checkpoint + " --data " + c.dir.file("data/val_pope.jsonl") + " --out " +
                        c.dir.file("pope.json"),
                    &log) == 0);
    const auto pope = nlohmann::json::parse(read_text_file(c.dir.file("pope.json")))["data"];
    int64_t probes = 0;
    for (const auto& r : read_manifest(c.dir.file("data/val_pope.jsonl"))) probes += r.json.contains("answer");
    CHECK(probes > 0);
    CHECK(pope["pope/probes"] == probes);
    CHECK(pope.contains("pope/object/random/accuracy"));
    CHECK(pope.contains("pope/relation/hallucination_rate"));
    const double acc = pope["pope/accuracy"], unparsed = pope["pope/unparsed"];
    CHECK(acc + unparsed <= 1.0);
    REQUIRE(run_cli("eval " + trained.checkpoint + " --data " + c.dir.file("data/val.jsonl") + " --out " +
                        c.dir.file("captions.json"),
                    &log) == 0);
    const auto captions = nlohmann::json::parse(read_text_file(c.dir.file("captions.json")))["data"];
    CHECK(captions.contains("caption/chair_i"));
    CHECK(captions.contains("caption/chair_s"));
    // --suite keeps the records of the named suites: the probes of a mixed manifest alone, and a
    // suite with no record in the data is exit 2 naming it.
    std::string mixed = read_text_file(c.dir.file("data/val_pope.jsonl"));
    const std::string vqa = read_text_file(c.dir.file("data/val_vqa.jsonl"));
    mixed += vqa.substr(0, vqa.find('\n') + 1);
    test::write_file(c.dir.file("data/mixed.jsonl"), mixed);
    REQUIRE(run_cli("eval " + trained.checkpoint + " --suite pope --data " + c.dir.file("data/mixed.jsonl") +
                        " --out " + c.dir.file("only_pope.json"),
                    &log) == 0);
    const auto only = nlohmann::json::parse(read_text_file(c.dir.file("only_pope.json")))["data"];
    CHECK(only["records"] == probes);
    CHECK(only["pope/probes"] == probes);
    CHECK(only["pope/accuracy"] == pope["pope/accuracy"]);
    CHECK(run_cli("eval " + trained.checkpoint + " --suite chair --data " + c.dir.file("data/val_pope.jsonl"), &log) == 2);
    CHECK_THAT(log, Catch::Contains("no record of suite chair in the data"));
    CHECK(run_cli("eval " + trained.checkpoint + " --suite retrieval", &log) == 2);
    CHECK_THAT(log, Catch::Contains("--suite 'retrieval': a finetune checkpoint has the suites vqa, pope, chair"));
  }
  SECTION("stages 2-3 with overlapping patches: projector and language model export, the tower is left out") {
    const auto trained = train_vlm(c.config("vlm.yaml", "run", {"model.vision.patch_kernel_size=16"}), quiet());
    const std::string exp = c.dir.file("exported");
    const auto files = export_checkpoint(c.dir.file("run"), exp, "fp32", 0);
    CHECK_FALSE(fs::exists(exp + "/vision_model"));
    for (const auto& f : files) CHECK(f.find("vision_model") == std::string::npos);
    // What was written is the checkpoint's, tensor for tensor.
    const auto ckpt = load_safetensors(trained.checkpoint + "/model.safetensors");
    int64_t compared = 0;
    for (const std::string comp : {"mm_projector", "language_model"})
      for (const auto& [name, t] : load_safetensors(exp + "/" + comp + "/model.safetensors")) {
        INFO(name);
        CHECK(torch::equal(t, ckpt.at(name)));
        ++compared;
      }
    int64_t outside_tower = 0;
    for (const auto& [name, t] : ckpt) outside_tower += name.rfind("vision_model.", 0) != 0;
    CHECK(compared == outside_tower);
  }
  SECTION("stage 1: one CLIPModel folder with logit_scale, in bf16 and fp32") {
    const auto trained = train_contrastive(c.config("clip.yaml", "run"), quiet());
    const std::string exp = c.dir.file("exported");
    export_checkpoint(trained.checkpoint, exp, "fp32", 0);
    const auto cfgjson = nlohmann::json::parse(read_text_file(exp + "/config.json"));
    CHECK(cfgjson["architectures"][0] == "CLIPModel");
    CHECK(cfgjson["vision_config"]["patch_size"] == 8);
    // Overlapping patches have no Hugging Face CLIP form: export refuses them, and importing a
    // non-overlapping tower into a config that has them names the key.
    const auto overlapping = c.config("clip.yaml", "unused", {"model.vision.patch_kernel_size=16"});
    CHECK_THROWS_WITH(hf_config_json("clip", overlapping),
                      Catch::Contains("model.vision.patch_kernel_size is 16") && Catch::Contains("cannot describe overlapping"));
    const auto diff = check_hf_config(exp, "vision_model", overlapping.model);
    REQUIRE(diff.size() == 1);
    CHECK_THAT(diff[0], Catch::Contains("model.vision.patch_kernel_size: the run config has 16"));
    CHECK(check_hf_config(exp, "vision_model", c.config("clip.yaml", "unused").model).empty());
    // Max pooling has no weights: the tower alone exports and imports, a whole CLIPModel does not.
    const auto pooled = c.config("clip.yaml", "unused", {"model.vision.pooling=max"});
    CHECK_THROWS_WITH(hf_config_json("clip", pooled), Catch::Contains("model.vision.pooling is max"));
    CHECK(hf_config_json("vision_model", pooled)["architectures"][0] == "CLIPVisionModel");
    CHECK(check_hf_config(exp, "vision_model", pooled.model).empty());
    const auto file = load_safetensors(exp + "/model.safetensors");
    CHECK(torch::equal(file.at("logit_scale"), load_safetensors(trained.checkpoint + "/loss.safetensors").at("logit_scale")));
    std::vector<WeightSource> all;
    for (const auto& comp : model_components(false)) all.push_back({comp, exp});
    all[0].path = exp + "/model.safetensors";  // a file works as well as its folder
    const std::string ckpt = import_weights(c.config("clip.yaml", "unused", {"run.seed=77"}), all, c.dir.file("imported"));
    const auto a = load_safetensors(trained.checkpoint + "/model.safetensors");
    const auto b = load_safetensors(ckpt + "/model.safetensors");
    CHECK(a.size() == b.size());
    test::check_same_tensors(a, b);

    export_checkpoint(trained.checkpoint, c.dir.file("bf16"), "bf16", 0);
    const auto half = load_safetensors(c.dir.file("bf16/model.safetensors"));
    const auto& w = a.at("visual_projection.weight");
    CHECK(half.at("visual_projection.weight").scalar_type() == torch::kBFloat16);
    CHECK(torch::equal(half.at("visual_projection.weight"), w.to(torch::kBFloat16)));
    CHECK_THROWS_WITH(export_checkpoint(trained.checkpoint, exp, "fp32", 0), Catch::Contains("is not empty"));
  }
  SECTION("stage 1 with max pooling: the vision tower alone, as a CLIPVisionModel") {
    const auto trained = train_contrastive(c.config("clip.yaml", "pooled", {"model.vision.pooling=max"}), quiet());
    const std::string exp = c.dir.file("exported_pooled");
    export_checkpoint(trained.checkpoint, exp, "fp32", 0);
    CHECK_FALSE(fs::exists(exp + "/model.safetensors"));
    const auto cfgjson = nlohmann::json::parse(read_text_file(exp + "/vision_model/config.json"));
    CHECK(cfgjson["architectures"][0] == "CLIPVisionModel");
    const auto tower = load_safetensors(exp + "/vision_model/model.safetensors");
    int64_t in_tower = 0;
    for (const auto& [name, t] : load_safetensors(trained.checkpoint + "/model.safetensors"))
      if (name.rfind("vision_model.", 0) == 0) {
        ++in_tower;
        CHECK(torch::equal(tower.at(name), t));
      }
    CHECK(static_cast<int64_t>(tower.size()) == in_tower);
    // With overlapping patches as well, the tower has no Hugging Face form either: refused, nothing written.
    const auto both = train_contrastive(
        c.config("clip.yaml", "pooled_overlapping", {"model.vision.pooling=max", "model.vision.patch_kernel_size=16"}),
        quiet());
    CHECK_THROWS_WITH(export_checkpoint(both.checkpoint, c.dir.file("exported_both"), "fp32", 0),
                      Catch::Contains("model.vision.patch_kernel_size is 16"));
    CHECK_FALSE(fs::exists(c.dir.file("exported_both")));
  }
}

namespace {

// Safetensors bytes built by hand from (name, dtype, shape, raw bytes), independent of the
// framework's writer: 8-byte little-endian header length, the JSON header, the data.
struct HandTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};
std::string hand_safetensors(const std::vector<HandTensor>& ts) {
  std::string header = "{", data;
  for (size_t i = 0; i < ts.size(); ++i) {
    std::string shape;
    for (size_t d = 0; d < ts[i].shape.size(); ++d) shape += (d ? "," : "") + std::to_string(ts[i].shape[d]);
    header += (i ? "," : "") + std::string("\"") + ts[i].name + "\":{\"dtype\":\"" + ts[i].dtype + "\",\"shape\":[" +
              shape + "],\"data_offsets\":[" + std::to_string(data.size()) + "," +
              std::to_string(data.size() + ts[i].bytes.size()) + "]}";
    data += ts[i].bytes;
  }
  header += "}";
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((uint64_t(header.size()) >> (8 * i)) & 0xff));
  return out + header + data;
}

// Value k + ((i % 7) - 3) / 8 for element i of tensor number k: exact in fp16 and fp32.
torch::Tensor pattern(const std::vector<int64_t>& shape, int k) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  auto i = torch::arange(n, torch::kFloat32);
  return (k + (torch::fmod(i, 7) - 3) / 8).reshape(shape);
}
std::string raw_bytes(const torch::Tensor& t) {
  auto c = t.contiguous();
  return std::string(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel() * c.element_size()));
}

}  // namespace

TEST_CASE("Hugging Face weights written by hand: LLaVA names, two shards (fp32 + fp16), an index, into the right parameters",
          "[interop]") {
  Corpus c;
  RunConfig cfg = c.config("vlm.yaml", "unused");
  const auto tok = Tokenizer::load(cfg.data.tokenizer);
  VlmModel model = build_vlm_model(cfg, tok);
  std::vector<std::pair<std::string, std::vector<int64_t>>> lm;  // our name, shape
  for (const auto& [name, t] : named_state(*model))
    if (component_of(name) == "language_model") lm.emplace_back(name, t.sizes().vec());
  REQUIRE(lm.size() == 2 + 2 * 9 + 1);  // embed, norm, lm_head + 9 per layer

  // LLaVA (Hugging Face) names: language_model.model.* / language_model.lm_head.*; the first half
  // in an F32 shard, the rest in an F16 shard; plus tensors the loader must leave alone.
  auto write_model = [&](const std::string& folder, const std::string& skip, const std::string& reshape,
                         const std::string& config_json) {
    std::vector<HandTensor> s1, s2;
    std::string map;
    for (size_t k = 0; k < lm.size(); ++k) {
      const auto& [name, shape0] = lm[k];
      if (name == skip) continue;
      auto shape = shape0;
      if (name == reshape) shape[0] += 1;
      const std::string hf = "language_model." + name;
      const bool first = k < lm.size() / 2;
      auto t = pattern(shape, static_cast<int>(k));
      (first ? s1 : s2).push_back({hf, first ? "F32" : "F16", shape, raw_bytes(first ? t : t.to(torch::kHalf))});
      map += std::string(map.empty() ? "" : ",") + "\"" + hf + "\":\"" + (first ? "a.safetensors" : "b.safetensors") + "\"";
    }
    s2.push_back({"language_model.model.layers.0.self_attn.rotary_emb.inv_freq", "F32", {4}, std::string(16, '\0')});
    s2.push_back({"vision_tower.vision_model.post_layernorm.weight", "F32", {2}, std::string(8, '\0')});
    map += ",\"language_model.model.layers.0.self_attn.rotary_emb.inv_freq\":\"b.safetensors\"";
    map += ",\"vision_tower.vision_model.post_layernorm.weight\":\"b.safetensors\"";
    write_file(folder + "/a.safetensors", hand_safetensors(s1));
    write_file(folder + "/b.safetensors", hand_safetensors(s2));
    write_file(folder + "/model.safetensors.index.json", "{\"metadata\": {}, \"weight_map\": {" + map + "}}");
    if (!config_json.empty()) write_file(folder + "/config.json", config_json);
  };
  const std::string llava_config =
      R"({"model_type": "llava", "text_config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}})";

  write_model(c.dir.file("hf"), "", "", llava_config);
  std::string layout;
  std::vector<std::string> names;
  for (const auto& [n, t] : named_state(*model)) names.push_back(n);
  map_hf_names(load_weights(c.dir.file("hf")), "language_model", names, &layout);
  CHECK_THAT(layout, Catch::Contains("language_model.model.*"));
  const auto vision_before = model->vision_model->post_layernorm->weight.clone();
  init_components(*model, InitFrom{c.dir.file("hf"), {"language_model"}}, cfg.model, cfg.data.tokenizer);
  std::map<std::string, torch::Tensor> state;
  for (const auto& [n, t] : named_state(*model)) state[n] = t;
  for (size_t k = 0; k < lm.size(); ++k) {
    INFO(lm[k].first);
    CHECK(torch::equal(state.at(lm[k].first), pattern(lm[k].second, static_cast<int>(k))));
  }
  // Spot checks with values worked by hand: tensor 0 (registration order) is the embedding, its
  // element 1 is 0 + (1 - 3) / 8; tensor 20 is lm_head.weight, its element 10 is 20 + (3 - 3) / 8.
  CHECK(lm[0].first == "model.embed_tokens.weight");
  CHECK(state.at("model.embed_tokens.weight").flatten()[1].item<float>() == -0.25f);
  CHECK(lm[20].first == "lm_head.weight");
  CHECK(state.at("lm_head.weight").flatten()[10].item<float>() == 20.0f);
  CHECK(torch::equal(model->vision_model->post_layernorm->weight, vision_before));  // other components untouched

  SECTION("what does not fit is named") {
    write_model(c.dir.file("missing"), "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight", "");
    CHECK_THROWS_WITH(init_components(*model, InitFrom{c.dir.file("missing"), {"language_model"}}, cfg.model, cfg.data.tokenizer),
                      Catch::Contains("missing (1): model.layers.1.mlp.up_proj.weight") &&
                          Catch::Contains("mis-shaped (1): model.layers.0.self_attn.k_proj.weight (file [9, 16], model [8, 16])"));
    write_model(c.dir.file("theta"), "", "",
                R"({"model_type": "llama", "hidden_size": 16, "rope_theta": 500000.0, "num_hidden_layers": 3})");
    CHECK_THROWS_WITH(init_components(*model, InitFrom{c.dir.file("theta"), {"language_model"}}, cfg.model, cfg.data.tokenizer),
                      Catch::Contains("model.llm.rope_theta: config.json has 500000.0, the run config 10000") &&
                          Catch::Contains("model.llm.num_hidden_layers: config.json has 3"));
    // Another decoder architecture, and a size written as a string: named, not loaded as LLaMA.
    write_model(c.dir.file("mistral"), "", "", R"({"model_type": "mistral", "hidden_size": 16, "sliding_window": 64})");
    CHECK_THROWS_WITH(
        init_components(*model, InitFrom{c.dir.file("mistral"), {"language_model"}}, cfg.model, cfg.data.tokenizer),
        Catch::Contains("model_type: config.json has \"mistral\"; trialign's language model is LLaMA"));
    // The original LLaVA's config.json: model_type llava beside LLaMA's own fields; no text_config.
    write_model(c.dir.file("original"), "", "", R"({"model_type": "llava", "hidden_size": 16, "num_hidden_layers": 2})");
    CHECK_NOTHROW(
        init_components(*model, InitFrom{c.dir.file("original"), {"language_model"}}, cfg.model, cfg.data.tokenizer));
    write_model(c.dir.file("strings"), "", "", R"({"model_type": "llama", "hidden_size": "16"})");
    CHECK_THROWS_WITH(
        init_components(*model, InitFrom{c.dir.file("strings"), {"language_model"}}, cfg.model, cfg.data.tokenizer),
        Catch::Contains("model.llm.hidden_size: config.json's hidden_size is \"16\", not a number"));
    // Weights stored as integers, or holding a NaN: refused with the tensor's name.
    std::map<std::string, torch::Tensor> good;
    for (const auto& [n, t] : named_state(*model))
      if (component_of(n) == "language_model") good[n] = t.detach().clone();
    auto ints = good;
    ints["model.norm.weight"] = ints["model.norm.weight"].to(torch::kInt32);
    CHECK_THROWS_WITH(load_component(*model, ints, "language_model", "w.safetensors"),
                      Catch::Contains("mis-shaped (1): model.norm.weight (stored as Int, a floating-point weight expected)"));
    auto nan = good;
    nan["model.layers.1.mlp.up_proj.weight"] = nan["model.layers.1.mlp.up_proj.weight"].clone();
    nan["model.layers.1.mlp.up_proj.weight"].view(-1)[3] = std::nanf("");
    CHECK_THROWS_WITH(load_component(*model, nan, "language_model", "w.safetensors"),
                      Catch::Contains("w.safetensors: component 'language_model' holds NaN or infinite values in 1 "
                                      "tensor(s): model.layers.1.mlp.up_proj.weight"));
    CHECK(load_component(*model, good, "language_model", "w.safetensors") == static_cast<int64_t>(good.size()));
    // An index naming a shard that does not hold the tensor.
    write_model(c.dir.file("badindex"), "", "", "");
    std::string idx = read_text_file(c.dir.file("badindex/model.safetensors.index.json"));
    const auto at = idx.find("a.safetensors");
    idx.replace(at, 13, "b.safetensors");
    write_file(c.dir.file("badindex/model.safetensors.index.json"), idx);
    CHECK_THROWS_WITH(load_weights(c.dir.file("badindex")), Catch::Contains("but that shard does not hold it"));
  }
}

TEST_CASE("inspect reads a checkpoint without loading it and names a damaged file", "[interop][cli]") {
  Corpus c;
  const auto trained = train_contrastive(c.config("clip.yaml", "run"), quiet());
  std::string out;
  REQUIRE(run_cli("inspect " + c.dir.file("run") + " --json --tensors --verify", &out) == 0);
  const auto j = nlohmann::json::parse(out);
  CHECK(j["kind"] == "checkpoint");
  CHECK(j["trainer"] == "contrastive");
  CHECK(j["step"] == 2);
  CHECK(j["verified"] == true);
  const auto weights = load_safetensors(trained.checkpoint + "/model.safetensors");
  int64_t vision = 0;
  for (const auto& [n, t] : weights)
    if (n.rfind("vision_model.", 0) == 0) vision += t.numel();
  CHECK(j["components"]["vision_model"]["parameters"] == vision);
  CHECK(j["components"]["logit_scale"]["parameters"] == 1);  // from loss.safetensors
  CHECK(j["tensors"].size() == weights.size() + 1);

  {  // one flipped byte: named by --verify, exit code 2
    std::fstream f(trained.checkpoint + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-3, std::ios::end);
    f.put('\x7f');
  }
  CHECK(run_cli("inspect " + trained.checkpoint + " --verify", &out) == 2);
  CHECK_THAT(out, Catch::Contains(trained.checkpoint + "/model.safetensors' fails its checksum"));
}

TEST_CASE("SIGTERM through the command line: the step finishes, a checkpoint is written, exit code 75, resume continues",
          "[interop][cli][slow]") {
  Corpus c;
  const std::string run = c.dir.file("run"), log = c.dir.file("train.out");
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::freopen(log.c_str(), "w", stdout);
    std::freopen(log.c_str(), "a", stderr);
    const std::string cfg = c.dir.file("clip.yaml"), out = "run.out_dir=" + run, steps = "train.steps=100000";
    ::execl(TRIALIGN_BINARY, TRIALIGN_BINARY, "train", cfg.c_str(), "--set", out.c_str(), "--set", steps.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait for training to be under way (a few logged steps), then ask it to stop.
  REQUIRE(test::wait_for_logged_steps(run, 3));
  ::kill(pid, SIGTERM);
  int status = 0;
  ::waitpid(pid, &status, 0);
  INFO(read_text_file(log));
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 75);
  const std::string ckpt = find_latest_checkpoint(run);
  REQUIRE_FALSE(ckpt.empty());
  const auto info = verify_checkpoint(ckpt);
  CHECK(info.step >= 3);
  CHECK_THAT(read_text_file(log), Catch::Contains("continue with --resume auto"));
  // Said when the signal arrived, before the checkpoint was written.
  const std::string said = read_text_file(log);
  const auto ack = said.find("trialign: stop requested: training finishes its current step");
  REQUIRE(ack != std::string::npos);
  CHECK(ack < said.find("stop requested: checkpoint"));
  // Resume to two steps further (a safe change of train.steps).
  std::string out;
  CHECK(run_cli("train " + c.dir.file("clip.yaml") + " --set run.out_dir=" + run + " --set train.steps=" +
                    std::to_string(info.step + 2) + " --resume auto",
                &out) == 0);
  CHECK(verify_checkpoint(find_latest_checkpoint(run)).step == info.step + 2);
}

TEST_CASE("checkpoints record their tokenizer: resume, init_from and eval refuse another file", "[interop][checkpoint]") {
  Corpus c;
  const std::string tok = c.dir.file("data/tok.model");
  train_vlm(c.config("vlm.yaml", "a"), quiet());
  const std::string ckpt = resolve_checkpoint(c.dir.file("a"));
  const auto state = nlohmann::json::parse(read_text_file(ckpt + "/trainer_state.json"));
  CHECK(state.at("tokenizer").at("path") == tok);
  CHECK(state.at("tokenizer").at("crc32").get<uint32_t>() == crc32_file(tok));
  CHECK(state.at("tokenizer").at("bytes").get<int64_t>() == static_cast<int64_t>(fs::file_size(tok)));

  // A byte-identical copy elsewhere is the same tokenizer; one trained with other options is not.
  fs::copy_file(tok, c.dir.file("copy.model"));
  CHECK_NOTHROW(check_checkpoint_tokenizer(ckpt, c.dir.file("copy.model"), "eval"));
  // The silent case: the same number of pieces, other pieces (BPE instead of unigram).
  TokenizerTrainOptions o;
  o.manifests = {c.dir.file("data/train.jsonl"), c.dir.file("data/train_instruct.jsonl")};
  o.fields = {"caption", "conversations"};
  o.out_prefix = c.dir.file("other");
  o.vocab_size = 64;
  o.model_type = "bpe";
  train_tokenizer(o);
  const std::string other = c.dir.file("other.model");
  // The same manifests and options give the same bytes, so a tokenizer regenerated on another
  // machine passes the checksum a checkpoint records. Two processes: the temporary corpus path
  // sentencepiece once recorded in the model carried the process id.
  const std::string again = "tokenizer train --manifest " + o.manifests[0] + " " + o.manifests[1] +
                            " --field caption conversations --vocab-size 64 --model-type bpe --out " + o.out_prefix;
  const uint32_t first = crc32_file(other);
  REQUIRE(run_cli(again + " --overwrite") == 0);
  CHECK(crc32_file(other) == first);
  // Nor does the file depend on how --out is spelled or where it points (a space included).
  fs::create_directories(c.dir.file("with space"));
  const std::string elsewhere = c.dir.file("with space") + "/../with space/t3";
  REQUIRE(run_cli(again.substr(0, again.find(" --out ")) + " --out '" + elsewhere + "'") == 0);
  CHECK(crc32_file(c.dir.file("with space/t3.model")) == first);
  CHECK(read_text_file(c.dir.file("with space/t3.vocab")).rfind("<pad>\t0\n<unk>\t0\n", 0) == 0);
  REQUIRE(Tokenizer::load(other).vocab_size() == Tokenizer::load(tok).vocab_size());
  CHECK_THAT(message_of<ConfigError>([&] { check_checkpoint_tokenizer(ckpt, other, "eval"); }),
             Catch::Contains("eval: checkpoint '" + ckpt + "' was trained with the tokenizer '" + tok + "'") &&
                 Catch::Contains("but the tokenizer here is '" + other + "'") &&
                 Catch::Contains("put the file it was trained with back there"));

  // init_from: the language model's embeddings are indexed by token ids, the vision tower is not.
  RunConfig cfg = c.config("vlm.yaml", "b", {"data.tokenizer=" + other});
  VlmModel model = build_vlm_model(cfg, Tokenizer::load(other));
  CHECK_NOTHROW(init_components(*model, InitFrom{c.dir.file("a"), {"vision_model", "mm_projector"}}, cfg.model, other));
  CHECK_THAT(message_of<ConfigError>([&] {
               init_components(*model, InitFrom{c.dir.file("a"), {"vision_model", "language_model"}}, cfg.model, other);
             }),
             Catch::Contains("init_from language_model: checkpoint '" + ckpt + "' was trained with the tokenizer") &&
                 Catch::Contains("Point data.tokenizer at the tokenizer it was trained with, or train the stage that wrote"));

  // eval --predictions, while the tokenizer is still the right one: a line per question.
  std::string out;
  const std::string pred = c.dir.file("pred.jsonl");
  REQUIRE(run_cli("eval " + c.dir.file("a") + " --data " + c.dir.file("data/val_vqa.jsonl") + " --predictions " + pred,
                  &out) == 0);
  std::ifstream lines(pred);
  std::string line;
  int64_t n = 0, right = 0;
  while (std::getline(lines, line)) {
    const auto p = nlohmann::json::parse(line);
    CHECK(p.at("set") == "data");
    CHECK(p.at("where") == c.dir.file("data/val_vqa.jsonl") + ":" + std::to_string(n + 1));
    right += p.at("right").get<bool>();
    ++n;
  }
  std::ifstream questions(c.dir.file("data/val_vqa.jsonl"));
  int64_t records = 0;
  while (std::getline(questions, line)) records += !line.empty();
  CHECK(n == records);
  const auto printed = nlohmann::json::parse(out.substr(out.find("{\n")));
  CHECK(printed.at("data").at("exact_match").get<double>() == Approx(static_cast<double>(right) / n));
  // A record whose image is missing stops the evaluation, naming data.on_bad_record; eval --set
  // takes that key (and the other evaluation keys), never the model's.
  std::string with_bad = read_text_file(c.dir.file("data/val_vqa.jsonl"));
  const std::string first_line = with_bad.substr(0, with_bad.find('\n') + 1);
  nlohmann::json broken = nlohmann::json::parse(first_line);
  broken["id"] = "lost-image";
  broken["image"] = "no/such.png";
  with_bad += json_text(broken) + "\n";
  write_file(c.dir.file("data/with_bad.jsonl"), with_bad);
  const std::string bad_eval = "eval " + c.dir.file("a") + " --data " + c.dir.file("data/with_bad.jsonl");
  CHECK(run_cli(bad_eval, &out) == 2);
  CHECK_THAT(out, Catch::Contains("lost-image") && Catch::Contains("data.on_bad_record"));
  REQUIRE(run_cli(bad_eval + " --set data.on_bad_record=skip", &out) == 0);
  const auto skipped = nlohmann::json::parse(out.substr(out.find("{\n")));
  CHECK(skipped.at("data").at("exact_match").get<double>() == Approx(static_cast<double>(right) / n));
  CHECK(run_cli(bad_eval + " --set model.llm.hidden_size=8", &out) == 2);
  CHECK_THAT(out, Catch::Contains("eval --set model.llm.hidden_size: an evaluation takes the checkpoint's model"));
  // Damaged training state (the optimizer's moments) stops a resume, not an evaluation of the
  // intact weights, nor init_from or export.
  const std::string optim_file = ckpt + "/optimizer.safetensors";
  const std::string optim_bytes = read_text_file(optim_file);
  const int64_t ckpt_step = verify_checkpoint(ckpt).step;
  write_file(optim_file, std::string(optim_bytes.size(), 'x'));
  REQUIRE(run_cli("eval " + c.dir.file("a") + " --data " + c.dir.file("data/val_vqa.jsonl"), &out) == 0);
  CHECK(nlohmann::json::parse(out.substr(out.find("{\n"))).at("data").at("exact_match").get<double>() ==
        Approx(static_cast<double>(right) / n));
  CHECK_NOTHROW(init_components(*model, InitFrom{c.dir.file("a"), {"vision_model"}}, cfg.model, other));
  CHECK(run_cli("export " + c.dir.file("a") + " --out " + c.dir.file("exported_damaged_optimizer"), &out) == 0);
  CHECK(run_cli("train " + ckpt + "/config.yaml --set run.out_dir=" + c.dir.file("a") + " --set train.steps=" +
                    std::to_string(ckpt_step + 1) + " --resume " + ckpt,
                &out) == 2);
  CHECK_THAT(out, Catch::Contains(optim_file + "' fails its checksum"));
  write_file(optim_file, optim_bytes);

  // Files the commands write never land inside a checkpoint: its model.safetensors stays as it was.
  const std::string model_file = ckpt + "/model.safetensors";
  const uint32_t model_crc = crc32_file(model_file);
  CHECK(run_cli("eval " + c.dir.file("a") + " --data " + c.dir.file("data/val_vqa.jsonl") + " --out " + model_file,
                &out) == 2);
  CHECK_THAT(out, Catch::Contains("--out " + model_file + ": " + ckpt + " is a checkpoint (it has MANIFEST.json)"));
  CHECK(run_cli("eval " + c.dir.file("a") + " --data " + c.dir.file("data/val_vqa.jsonl") + " --predictions " + ckpt +
                    "/optimizer.safetensors",
                &out) == 2);
  CHECK_THAT(out, Catch::Contains("--predictions " + ckpt + "/optimizer.safetensors: " + ckpt + " is a checkpoint"));
  CHECK(run_cli("forward " + c.dir.file("a") + " --tokens 2,5 --out " + model_file, &out) == 2);
  CHECK_THAT(out, Catch::Contains("is a checkpoint (it has MANIFEST.json)"));
  CHECK(crc32_file(model_file) == model_crc);
  // ...nor over a folder, into a folder that does not exist, or twice into one file: all refused
  // before any work.
  CHECK(run_cli("eval " + c.dir.file("a") + " --data " + c.dir.file("data/val_vqa.jsonl") + " --out " + c.dir.file("data"),
                &out) == 2);
  CHECK_THAT(out, Catch::Contains("--out " + c.dir.file("data") + " is a folder; give a file path"));
  CHECK(run_cli("eval " + c.dir.file("a") + " --out " + c.dir.file("nowhere/r.json"), &out) == 2);
  CHECK_THAT(out, Catch::Contains("the folder " + c.dir.file("nowhere") + " does not exist"));
  CHECK(run_cli("eval " + c.dir.file("a") + " --out " + c.dir.file("r.json") + " --predictions " + c.dir.file("./r.json"),
                &out) == 2);
  CHECK_THAT(out, Catch::Contains("--out and --predictions both name"));
  CHECK_FALSE(fs::exists(c.dir.file("r.json")));
  // Training with a checkpoint folder as run.out_dir is refused before anything is written there.
  const uint32_t config_crc = crc32_file(ckpt + "/config.yaml");
  CHECK(run_cli("train " + ckpt + "/config.yaml --set run.out_dir=" + ckpt, &out) == 2);
  CHECK_THAT(out, Catch::Contains("run.out_dir '" + ckpt + "' is a checkpoint folder (it holds MANIFEST.json)"));
  CHECK(crc32_file(ckpt + "/config.yaml") == config_crc);
  CHECK_FALSE(fs::exists(ckpt + "/train.log"));
  CHECK_NOTHROW(verify_checkpoint(ckpt));
  // So is a folder that is plainly something else (a dataset with folders of its own, a run's
  // checkpoints folder), before anything there is touched.
  fs::create_directories(c.dir.file("mine/images"));
  write_file(c.dir.file("mine/config.yaml"), "my own notes\n");
  CHECK(run_cli("train " + ckpt + "/config.yaml --set run.out_dir=" + c.dir.file("mine"), &out) == 2);
  CHECK_THAT(out, Catch::Contains("run.out_dir '" + c.dir.file("mine") + "' is a folder with subfolders of its own "
                                  "(images), not a run folder"));
  CHECK(read_text_file(c.dir.file("mine/config.yaml")) == "my own notes\n");
  CHECK_FALSE(fs::exists(c.dir.file("mine/train.log")));
  const std::string checkpoints = fs::path(ckpt).parent_path().string();
  CHECK(run_cli("train " + ckpt + "/config.yaml --set run.out_dir=" + checkpoints, &out) == 2);
  CHECK_THAT(out, Catch::Contains("run.out_dir '" + checkpoints + "' is a run's checkpoints folder"));
  // A folder where an earlier attempt stopped before its first checkpoint is a run folder: the
  // fresh run starts there, the attempt's metrics are moved aside, not continued, and other files
  // (a scheduler's log) are left as they are.
  fs::create_directories(c.dir.file("retry"));
  write_file(c.dir.file("retry/metrics.jsonl"), "{\"step\": 1, \"split\": \"train\", \"loss\": 99.0}\n");
  write_file(c.dir.file("retry/train.log"), "earlier attempt\n");
  write_file(c.dir.file("retry/slurm-42.out"), "scheduler log\n");
  CHECK(run_cli("train " + ckpt + "/config.yaml --set train.steps=1 --set run.out_dir=" + c.dir.file("retry"), &out) == 0);
  CHECK(read_text_file(c.dir.file("retry/metrics.abandoned-1.jsonl")) ==
        "{\"step\": 1, \"split\": \"train\", \"loss\": 99.0}\n");
  CHECK_THAT(read_text_file(c.dir.file("retry/metrics.jsonl")), !Catch::Contains("99.0"));
  CHECK_THAT(out, Catch::Contains("moved to metrics.abandoned-1.jsonl"));
  CHECK_THAT(out, Catch::Contains("also holds slurm-42.out; left as they are"));
  CHECK(read_text_file(c.dir.file("retry/slurm-42.out")) == "scheduler log\n");
  // Far more ranks than cores: refused before any rank starts.
  CHECK(run_cli("train " + ckpt + "/config.yaml --nproc 100000", &out) == 2);
  CHECK_THAT(out, Catch::Contains("--nproc 100000: this machine has") && Catch::Contains("use at most"));
  // --help gives each default in one readable form, the check beside it.
  CHECK(run_cli("generate --help", &out) == 0);
  CHECK_THAT(out, Catch::Contains("--max-new-tokens INT:NUMBER >= 1 [default: 48]"));
  CHECK(run_cli("data shapes --help", &out) == 0);
  CHECK_THAT(out, Catch::Contains("[default: circle,square,triangle,star,diamond,cross]"));
  // Sampling settings that are not numbers, and a thread count no machine has, are refused up front.
  CHECK(run_cli("generate " + c.dir.file("a") + " --prompt hi --temperature nan", &out) != 0);
  CHECK_THAT(out, Catch::Contains("'nan' is not a number"));
  CHECK(run_cli("generate " + c.dir.file("a") + " --prompt hi --max-new-tokens 0", &out) != 0);
  CHECK_THAT(out, Catch::Contains("'0' must be at least 1"));
  // Longer than the positions the model was built for: refused, not run past its rotary table.
  CHECK(run_cli("generate " + c.dir.file("a") + " --prompt hi --max-new-tokens 100000", &out) == 2);
  CHECK_THAT(out, Catch::Contains("--max-new-tokens 100000 need") &&
                      Catch::Contains("more than the model's model.llm.max_position_embeddings"));
  std::string many = "2";
  for (int i = 0; i < 4000; ++i) many += ",5";
  CHECK(run_cli("forward " + c.dir.file("a") + " --tokens " + many + " --out " + c.dir.file("f.safetensors"), &out) == 2);
  CHECK_THAT(out, Catch::Contains("forward: 4001 tokens (4001 positions with the image's visual tokens) exceed "
                                  "model.llm.max_position_embeddings"));
  CHECK(run_cli("eval " + c.dir.file("a") + " --data " + c.dir.file("data"), &out) == 2);
  CHECK_THAT(out, Catch::Contains("manifest '" + c.dir.file("data") + "' is a folder; name the .json or .jsonl file in it"));
  CHECK(run_cli("eval " + c.dir.file("a") + " --threads 100000", &out) == 2);
  CHECK_THAT(out, Catch::Contains("threads: 100000 requested") && Catch::Contains(", or 0 for one per core"));
  // The generator's checks name the flags the user typed, not the options struct behind them.
  CHECK(run_cli("data shapes --out " + c.dir.file("world") + " --max-objects 40", &out) == 2);
  CHECK_THAT(out, Catch::Contains("error: data shapes: --max-objects = 40 is more than can be placed") &&
                      Catch::Contains("lower --max-objects, raise --image-size or use smaller sizes"));
  CHECK_THAT(out, !Catch::Contains("GeneratorOptions"));
  CHECK(run_cli("data shapes --out " + c.dir.file("world") + " --shapes circle,blob", &out) == 2);
  CHECK_THAT(out, Catch::Contains("error: data shapes: --shapes: unknown value 'blob'; known values are: circle"));
  CHECK(run_cli("data shapes --out " + c.dir.file("world") + " --image-size 8", &out) == 2);
  CHECK_THAT(out, Catch::Contains("error: data shapes: --image-size = 8 is too small; use at least 16"));
  CHECK(run_cli("data shapes --out " + c.dir.file("world") + " --train 0 --val 0", &out) == 2);
  CHECK_THAT(out, Catch::Contains("error: data shapes: --train 0 and --val 0 would write empty manifests"));
  CHECK(!fs::exists(c.dir.file("world")));
  // A smaller generation into the same folder names the images the larger one left behind.
  REQUIRE(run_cli("data shapes --out " + c.dir.file("world") + " --train 5 --val 2 --image-size 32", &out) == 0);
  // A second run into the same folder replaces a dataset: only with --overwrite.
  CHECK(run_cli("data shapes --out " + c.dir.file("world") + " --train 3 --val 2 --image-size 32", &out) == 2);
  CHECK_THAT(out, Catch::Contains("data shapes: --out " + c.dir.file("world") +
                                  " is not empty; the generator would replace its manifests and images"));
  REQUIRE(run_cli("data shapes --out " + c.dir.file("world") + " --train 3 --val 2 --image-size 32 --overwrite", &out) ==
          0);
  CHECK_THAT(out, Catch::Contains("2 images in " + c.dir.file("world") + "/images/train (images/train/000003.png "
                                  "onwards) are left from an earlier, larger generation"));
  CHECK_THAT(out, !Catch::Contains("images/val ("));
  // tokenizer train does not replace a tokenizer in place unless told to.
  const uint32_t tok_crc = crc32_file(tok);
  const std::string prefix = tok.substr(0, tok.size() - 6);  // without ".model"
  const std::string retrain = "tokenizer train --manifest " + c.dir.file("data/val_vqa.jsonl") +
                              " --field conversations --vocab-size 40 --out " + prefix;
  CHECK(run_cli(retrain, &out) == 2);
  CHECK_THAT(out, Catch::Contains(tok + " exists, and runs trained with it need that very file") &&
                      Catch::Contains("--overwrite"));
  CHECK(crc32_file(tok) == tok_crc);
  // A manifest that fails to read leaves nothing next to PREFIX (no half-written model or vocab).
  write_file(c.dir.file("bad.jsonl"), "{not json\n");
  CHECK(run_cli("tokenizer train --manifest " + c.dir.file("bad.jsonl") + " --out " + c.dir.file("t2"), &out) == 2);
  for (const auto& e : fs::directory_iterator(c.dir.path))
    CHECK(e.path().filename().string().rfind("t2.", 0) == std::string::npos);
  // A vocabulary too small for the text's characters, and a field no record has: named.
  CHECK(run_cli("tokenizer train --manifest " + c.dir.file("data/train.jsonl") + " --out " + c.dir.file("t3") +
                    " --vocab-size 5",
                &out) == 2);
  CHECK_THAT(out, Catch::Contains("tokenizer train: --vocab-size 5 is too small for the text") &&
                      Catch::Contains("raise --vocab-size"));
  CHECK(run_cli("tokenizer train --manifest " + c.dir.file("data/train.jsonl") + " --out " + c.dir.file("t3") +
                    " --field nosuchfield",
                &out) == 2);
  CHECK_THAT(out, Catch::Contains("no text found in the field(s) 'nosuchfield'"));
  // A mistyped command gets the nearest one.
  CHECK(run_cli("trian " + c.dir.file("a"), &out) == 2);
  CHECK_THAT(out, Catch::Contains("unknown command 'trian'; did you mean 'train'?"));

  // The tokenizer retrained in place (same path, other file): resuming, evaluating, exporting
  // (which would copy the wrong file) and forward all stop.
  fs::copy_file(other, tok, fs::copy_options::overwrite_existing);
  TrainOptions resume = quiet();
  resume.resume = "auto";
  CHECK_THAT(message_of<ConfigError>([&] { train_vlm(c.config("vlm.yaml", "a", {"train.steps=3"}), resume); }),
             Catch::Contains("resume: checkpoint '" + ckpt + "' was trained with the tokenizer '" + tok + "'"));
  CHECK(run_cli("eval " + c.dir.file("a") + " --data " + c.dir.file("data/val_vqa.jsonl"), &out) != 0);
  CHECK_THAT(out, Catch::Contains("was trained with the tokenizer '" + tok + "'"));
  CHECK(run_cli("export " + c.dir.file("a") + " --out " + c.dir.file("hf_out"), &out) != 0);
  CHECK_THAT(out, Catch::Contains("export: checkpoint '" + ckpt + "' was trained with the tokenizer"));
  CHECK_FALSE(fs::exists(c.dir.file("hf_out/tokenizer.model")));
  CHECK(run_cli("forward " + c.dir.file("a") + " --tokens 2,3 --out " + c.dir.file("f.safetensors"), &out) != 0);
  CHECK_THAT(out, Catch::Contains("forward: checkpoint '" + ckpt + "' was trained with the tokenizer"));
}
