// trialign command line. Subcommands parse their arguments (CLI11, a well-kept header-only
// parser: subcommands, typed options and --help for free) and call into the library; this file
// is the only place exceptions become exit codes (core/errors.h).
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <new>
#include <sstream>
#include <thread>

#include "core/checkpoint.h"
#include "core/checkpoint_tokenizer.h"
#include "core/config_tree.h"
#include "core/distributed.h"
#include "core/errors.h"
#include "core/logging.h"
#include "core/run_config.h"
#include "core/safetensors.h"
#include "data/caption_dataset.h"
#include "data/conversation_dataset.h"
#include "data/image.h"
#include "data/shapes_pope.h"
#include "data/shapes_preference.h"
#include "data/shapes_questions.h"
#include "data/shapes_world.h"
#include "data/tokenizer.h"
#include "losses/loss.h"
#include "losses/preference.h"
#include "trainers/bench.h"
#include "trainers/common.h"
#include "trainers/contrastive.h"
#include "trainers/pipeline.h"
#include "trainers/preflight.h"
#include "trainers/report.h"
#include "trainers/vlm.h"
#include "tools/data_check.h"
#include "tools/interop.h"
#include "core/json_text.h"

namespace fs = std::filesystem;
using namespace trialign;

namespace {

// A file the command writes (--out, --predictions), checked before any work: it must not land
// inside a checkpoint folder (it would replace model.safetensors or optimizer.safetensors and lose
// the checkpoint), be a folder, or sit in a folder that does not exist.
void check_output_file(const std::string& path, const std::string& flag) {
  if (path.empty()) return;
  const fs::path folder = fs::absolute(path).parent_path();
  if (fs::exists(folder / "MANIFEST.json"))
    throw ConfigError(flag + " " + path + ": " + folder.string() +
                      " is a checkpoint (it has MANIFEST.json), and writing there would damage it; write the file "
                      "somewhere else");
  if (fs::is_directory(path))
    throw ConfigError(flag + " " + path + " is a folder; give a file path, e.g. " + (fs::path(path) / "results.json").string());
  if (!fs::is_directory(folder))
    throw ConfigError(flag + " " + path + ": the folder " + folder.string() + " does not exist; create it first");
}

// CLI11 prints a default as TYPE:CHECK=VALUE ("INT:NUMBER >= 1=48"); this prints
// "INT:NUMBER >= 1 [default: 48]".
class HelpFormatter : public CLI::Formatter {
 public:
  std::string make_option_opts(const CLI::Option* opt) const override {
    if (opt->get_default_str().empty() || !opt->get_option_text().empty() || opt->get_type_size() == 0)
      return CLI::Formatter::make_option_opts(opt);
    std::string out;
    if (!opt->get_type_name().empty()) out += " " + get_label(opt->get_type_name());
    if (opt->get_expected_max() == CLI::detail::expected_max_vector_size) out += " ...";
    else if (opt->get_expected_min() > 1) out += " x " + std::to_string(opt->get_expected());
    if (opt->get_required()) out += " " + get_label("REQUIRED");
    return out + " [default: " + opt->get_default_str() + "]";
  }
};

// CLI11's own number checks print their range as "0.000000 to 1.79e308" and let NaN through.
CLI::Validator at_least(double low, bool inclusive) {
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        double v = 0;
        std::istringstream in(text);
        if (!(in >> v) || !in.eof() || !std::isfinite(v))
          return "'" + text + "' is not a number";
        if (inclusive ? v < low : v <= low)
          return "'" + text + "' must be " + (inclusive ? "at least " : "more than ") + fmt::format("{}", low);
        return "";
      },
      inclusive ? fmt::format("NUMBER >= {}", low) : fmt::format("NUMBER > {}", low));
}

int cmd_train(const std::string& config, const std::vector<std::string>& sets, const std::string& resume) {
  RunConfig cfg = load_run_config(config, sets);
  TrainOptions opt;
  opt.resume = resume;
  auto result = train_any(cfg, opt);
  if (result.interrupted) return kExitInterrupted;
  if (!dist::is_main()) return kExitOk;
  if (!result.final_eval.is_null()) std::cout << json_text(result.final_eval, 2) << std::endl;
  return kExitOk;
}

int cmd_bench(const std::string& config, const std::vector<std::string>& sets, const BenchOptions& opt) {
  const RunConfig cfg = load_run_config(config, sets);
  const auto j = run_bench(cfg, opt);
  if (j.is_null()) return kExitInterrupted;  // stopped by a signal; it said so
  std::cout << bench_table(j) << std::flush;
  return kExitOk;
}

int cmd_config_check(const std::string& config, const std::vector<std::string>& sets) {
  RunConfig cfg = load_run_config(config, sets);
  std::cout << resolved_yaml(cfg) << std::flush;
  check_preflight(cfg);  // then the files and checkpoints it names, and what its trainer would refuse
  return kExitOk;
}


// A VLM checkpoint with its tokenizer, ready for evaluation or generation.
struct LoadedVlm {
  RunConfig cfg;
  Tokenizer tok;
  VlmModel model{nullptr};
};

// Whatever asked for the memory, the user's levers are the same few keys.
const char* const kOutOfMemoryAdvice =
    "Training: lower train.batch_size (raising train.grad_accum keeps the global batch), data.max_seq_len, "
    "data.workers or data.prefetch, or the model's size; the log's 'memory estimate' line says what the run expected "
    "to need. Evaluation and generation: use a machine with more memory, or a smaller eval set";

// eval --set: what may differ from the checkpoint's config in an evaluation. The model and its
// tokenizer are the checkpoint's; how bad records are treated, where images are and what to
// evaluate are the user's (the messages about bad records name these keys).
const std::vector<std::string> kEvalSettable = {"data.on_bad_record", "data.on_too_long", "data.image_root",
                                                "data.max_seq_len",   "data.max_text_len", "eval.*"};

RunConfig with_eval_overrides(const RunConfig& cfg, const std::vector<std::string>& sets) {
  if (sets.empty()) return cfg;
  ConfigNode tree = parse_config_string(resolved_yaml(cfg), "checkpoint config");
  for (const auto& s : sets) {
    const std::string key = s.substr(0, s.find('='));
    const bool ok = std::any_of(kEvalSettable.begin(), kEvalSettable.end(), [&](const std::string& a) {
      return key == a || (a.back() == '*' && key.rfind(a.substr(0, a.size() - 1), 0) == 0);
    });
    if (!ok)
      throw ConfigError(fmt::format("eval --set {}: an evaluation takes the checkpoint's model, tokenizer and data "
                                    "settings; only {} can be set here (eval.sets with a limit, for instance)",
                                    key, fmt::join(kEvalSettable, ", ")));
    apply_override(tree, s);
  }
  return run_config_from_tree(tree, "the checkpoint's config with --set");
}

bool sets_key(const std::vector<std::string>& sets, const std::string& key) {
  return std::any_of(sets.begin(), sets.end(), [&](const std::string& s) { return s.rfind(key + "=", 0) == 0; });
}

// use: the command, for the message when the tokenizer file is not the one it was trained with.
// cfg: the checkpoint's config as the command has it (eval's carries its --set).
LoadedVlm load_vlm(const std::string& dir, const std::string& use, RunConfig cfg) {
  LoadedVlm v;
  v.cfg = std::move(cfg);
  check_checkpoint_tokenizer(dir, v.cfg.data.tokenizer, use);
  v.tok = Tokenizer::load(v.cfg.data.tokenizer);
  v.model = build_vlm_model(v.cfg, v.tok);
  load_state(*v.model, load_safetensors(dir + "/model.safetensors"), "", true, dir + "/model.safetensors");
  v.model->eval();
  return v;
}

int cmd_eval_vlm(const std::string& dir, const RunConfig& cfg, const std::string& data,
                 const std::vector<std::string>& suites, const std::string& out, const std::string& predictions_out,
                 const std::vector<std::string>& overrides) {
  auto v = load_vlm(dir, "eval", cfg);
  const bool bf16 = resolve_precision(v.cfg.run.precision) == "bf16";
  std::vector<EvalSet> sets = v.cfg.eval.sets;
  if (!data.empty()) {
    sets = {EvalSet{"data", data, 0}};
    // Images of --data resolve against its own folder, unless --set says where they are.
    if (!sets_key(overrides, "data.image_root")) v.cfg.data.image_root.clear();
  }
  // A preference run's data.val holds pairs or prompts, not conversations: only eval.sets apply.
  else if (sets.empty() && !v.cfg.data.val.empty() && v.cfg.trainer != "preference")
    sets = {EvalSet{"val", v.cfg.data.val, v.cfg.data.val_limit}};
  if (sets.empty()) throw ConfigError("eval: no --data given and the checkpoint's config has no eval.sets or data.val");
  TypedSpec token_loss = v.cfg.loss;
  if (v.cfg.trainer == "preference") {  // scored with the token loss of stage 3
    token_loss = TypedSpec{"cross_entropy", {}, "loss"};
    token_loss.options.kind = ConfigNode::Kind::Map;
  }
  auto loss = lm_losses().create_or_throw(token_loss);
  nlohmann::json j;
  std::string predictions_text;  // JSONL, one line per scored record of every set
  const ObjectVocabulary vocabulary = load_eval_vocabulary(v.cfg.eval);
  for (const auto& s : sets) {
    ConversationDataset ds(s.data, v.cfg.data, v.tok, v.model->tokens_per_image(), false, s.limit);
    if (!suites.empty()) {
      ds.keep_only([&](const ConversationSample& r) {
        return std::find(suites.begin(), suites.end(), eval_suite_of(r)) != suites.end();
      });
      if (ds.size() == 0) {
        spdlog::warn("eval: {} ({}) has no records of suite {}; skipped", s.name, s.data, fmt::join(suites, ","));
        continue;
      }
    }
    std::vector<nlohmann::json> predictions;
    j[s.name] = evaluate_vlm(v.model, *loss, ds, v.tok, v.cfg.eval.vlm_batch(v.cfg.train.batch_size / v.cfg.train.grad_accum),
                             v.cfg.eval.max_new_tokens, bf16, vocabulary,
                             predictions_out.empty() ? nullptr : &predictions);
    j[s.name]["data"] = s.data;
    for (auto& p : predictions) {
      p["set"] = s.name;
      predictions_text += json_text(p) + "\n";
    }
  }
  if (j.empty())
    throw DataError("eval: no record of suite " + fmt::format("{}", fmt::join(suites, ",")) +
                    " in the data (vqa: questions, pope: question_type pope/..., chair: captions of a scene or "
                    "records with \"objects\")");
  j["checkpoint"] = dir;
  if (!out.empty()) atomic_write_text(out, json_text(j, 2) + "\n");
  if (!predictions_out.empty()) {
    atomic_write_text(predictions_out, predictions_text);
    spdlog::info("eval: wrote the reply to each scored record to {}", predictions_out);
  }
  std::cout << json_text(j, 2) << std::endl;
  return kExitOk;
}

int cmd_eval(const std::string& target, const std::string& data, std::vector<std::string> suites, const std::string& out,
             const std::string& predictions_out, int threads, const std::vector<std::string>& overrides) {
  init_logging();
  check_output_file(out, "--out");
  check_output_file(predictions_out, "--predictions");
  if (!out.empty() && !predictions_out.empty() && fs::absolute(out).lexically_normal() == fs::absolute(predictions_out).lexically_normal())
    throw ConfigError("--out and --predictions both name " + out + "; the one written last would replace the other");
  setup_threads(threads);
  const std::string dir = resolve_checkpoint(target, [](const std::string& w) { spdlog::warn(w); }, CheckpointUse::Weights);
  verify_checkpoint(dir, CheckpointUse::Weights);
  RunConfig cfg = with_eval_overrides(checkpoint_config_of(dir), overrides);
  // --suite: auto (everything the checkpoint supports: no filter) or suite names.
  if (std::find(suites.begin(), suites.end(), "auto") != suites.end()) suites.clear();
  const std::vector<std::string> known = cfg.is_vlm() ? std::vector<std::string>{"vqa", "pope", "chair"}
                                                      : std::vector<std::string>{"retrieval"};
  for (const auto& s : suites)
    if (std::find(known.begin(), known.end(), s) == known.end())
      throw ConfigError(fmt::format("--suite '{}': a {} checkpoint has the suites {} (or auto for all)", s, cfg.trainer,
                                    fmt::join(known, ", ")));
  if (cfg.is_vlm()) return cmd_eval_vlm(dir, cfg, data, suites, out, predictions_out, overrides);
  if (!predictions_out.empty())
    throw ConfigError("--predictions: a " + cfg.trainer + " checkpoint scores retrieval over the whole set, not a reply "
                      "per record; --predictions is for checkpoints of stage 2 onwards (adapter, finetune, preference)");
  const std::string manifest = data.empty() ? cfg.data.val : data;
  if (manifest.empty()) throw ConfigError("eval: no --data given and the checkpoint's config has no data.val");
  check_checkpoint_tokenizer(dir, cfg.data.tokenizer, "eval");
  const Tokenizer tok = Tokenizer::load(cfg.data.tokenizer);
  ClipModel model = build_clip_model(cfg, tok);
  load_state(*model, load_safetensors(dir + "/model.safetensors"), "", true, dir + "/model.safetensors");
  CaptionDataset ds(manifest, cfg.data, tok, /*train=*/false);
  auto j = evaluate_retrieval(model, ds, cfg.eval, resolve_precision(cfg.run.precision) == "bf16");
  j["checkpoint"] = dir;
  j["data"] = manifest;
  if (!out.empty()) atomic_write_text(out, json_text(j, 2) + "\n");
  std::cout << json_text(j, 2) << std::endl;
  return kExitOk;
}

int cmd_generate(const std::string& target, const std::string& image, const std::string& prompt,
                 const SamplingOptions& sampling, int threads) {
  init_logging();
  setup_threads(threads);
  const std::string dir = resolve_checkpoint(target, [](const std::string& w) { spdlog::warn(w); }, CheckpointUse::Weights);
  verify_checkpoint(dir, CheckpointUse::Weights);
  if (!checkpoint_config_of(dir).is_vlm())
    throw ConfigError("generate: '" + dir + "' is a stage-1 (contrastive) checkpoint; it has no language model");
  auto v = load_vlm(dir, "generate", checkpoint_config_of(dir));
  if (!image.empty() && v.cfg.data.drop_images)
    throw ConfigError("generate: '" + dir + "' was trained on text alone (data.drop_images); it cannot take --image");
  if (v.cfg.data.chat_template == "plain")
    spdlog::warn("generate: this checkpoint uses the plain template (image, then caption): --prompt is ignored and the "
                 "model captions the image");
  // The prompt goes through the training template, so the model sees what it was trained on.
  Conversation c;
  std::string user = prompt;
  if (!image.empty()) {
    c.images.push_back(image);
    if (user.find("<image>") == std::string::npos) user = "<image>\n" + user;
  }
  size_t tags = 0;
  for (size_t p = user.find("<image>"); p != std::string::npos; p = user.find("<image>", p + 1)) ++tags;
  if (tags != c.images.size())
    throw ConfigError("generate: the prompt has " + std::to_string(tags) + " <image> placeholder(s) but " +
                      std::to_string(c.images.size()) + " --image; give one --image per placeholder");
  c.turns = {{"user", user}, {"assistant", "x"}};
  auto ids = prompt_ids(tokenize_conversation(c, v.tok, v.cfg.data.chat_template));
  if (ids.empty()) ids.push_back(v.tok.pad_id());
  // Rotary positions past the ones the model was built for are outside anything it trained on.
  const int64_t images = std::count(ids.begin(), ids.end(), static_cast<int64_t>(v.tok.image_id()));
  const int64_t positions = static_cast<int64_t>(ids.size()) + images * (v.model->tokens_per_image() - 1) +
                            sampling.max_new_tokens;
  if (positions > v.cfg.model.llm.max_position_embeddings)
    throw ConfigError(fmt::format("generate: the prompt ({} tokens, with {} visual tokens per image) and "
                                  "--max-new-tokens {} need {} positions, more than the model's "
                                  "model.llm.max_position_embeddings ({}); shorten the prompt or lower --max-new-tokens",
                                  ids.size(), v.model->tokens_per_image(), sampling.max_new_tokens, positions,
                                  v.cfg.model.llm.max_position_embeddings));
  torch::Tensor pixels;
  if (!image.empty()) pixels = image_transform(load_image_rgb(image), v.cfg.data, false, 0).unsqueeze(0);
  const bool bf16 = resolve_precision(v.cfg.run.precision) == "bf16";
  std::cout << generate_replies(v.model, v.tok, {ids}, pixels, sampling, bf16).at(0) << std::endl;
  return kExitOk;
}

int cmd_run(const std::string& pipeline, const std::vector<std::string>& sets) {
  const auto plan = load_pipeline(pipeline, sets);
  TrainOptions opt;
  auto r = run_pipeline(plan, opt);
  if (r.interrupted) return kExitInterrupted;
  if (!dist::is_main()) return kExitOk;  // rank 0 reports
  std::cout << pipeline_summary(plan, r);
  std::cout << "report: " << write_pipeline_report(plan, r) << std::endl;
  return kExitOk;
}

int cmd_inspect(const std::string& path, bool tensors, bool verify, bool json) {
  init_logging();
  const auto j = inspect_weights(path, tensors, verify);
  std::cout << (json ? json_text(j, 2) + "\n" : inspect_text(j)) << std::flush;
  return kExitOk;
}

int cmd_export(const std::string& checkpoint, const std::string& out, const std::string& dtype, double shard_mb) {
  init_logging();
  const auto files = export_checkpoint(checkpoint, out, dtype, static_cast<uint64_t>(shard_mb * (1 << 20)));
  for (const auto& f : files) std::cout << f << "\n";
  spdlog::info("exported {} files to {}", files.size(), out);
  return kExitOk;
}

std::vector<WeightSource> weight_sources(const std::vector<std::string>& args) {
  std::vector<WeightSource> out;
  for (const auto& a : args) out.push_back(parse_weight_source(a));
  return out;
}

int cmd_import(const std::string& config, const std::vector<std::string>& sets, const std::vector<std::string>& weights,
               const std::string& out) {
  init_logging();
  RunConfig cfg = load_run_config(config, sets);
  setup_threads(cfg.run.threads);
  const std::string dir = import_weights(cfg, weight_sources(weights), out);
  spdlog::info("imported into {} (use it as init_from: [{{checkpoint: {}, components: [...]}}])", dir, out);
  std::cout << dir << std::endl;
  return kExitOk;
}

// --tokens "1,15,27": every item an integer (an empty one is a mistake, not token 0).
std::vector<int64_t> parse_token_ids(const std::string& text) {
  std::vector<int64_t> ids;
  for (size_t start = 0;;) {
    const size_t end = text.find(',', start);
    const std::string item = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
    const size_t first = item.find_first_not_of(' '), last = item.find_last_not_of(' ');
    const std::string trimmed = first == std::string::npos ? "" : item.substr(first, last - first + 1);
    size_t used = 0;
    int64_t id = 0;
    try {
      id = std::stoll(trimmed, &used);
    } catch (const std::exception&) {  // not a number, or beyond 64 bits
      used = 0;
    }
    if (trimmed.empty() || used != trimmed.size())
      throw ConfigError("--tokens '" + text + "': " +
                        (trimmed.empty() ? std::string("an empty token id") : "'" + trimmed + "' is not a token id") +
                        "; give comma-separated integers, e.g. --tokens 1,15,27");
    ids.push_back(id);
    if (end == std::string::npos) return ids;
    start = end + 1;
  }
}

int cmd_forward(const std::string& target, const std::string& config, const std::vector<std::string>& sets,
                const std::vector<std::string>& weights, const ForwardInputs& in, const std::string& out) {
  init_logging();
  check_output_file(out, "--out");
  if (target.empty() == config.empty())
    throw ConfigError("forward: give a checkpoint, or --config with --weights, not both");
  RunConfig cfg;
  std::shared_ptr<torch::nn::Module> model;
  if (!target.empty()) {
    if (!weights.empty()) throw ConfigError("forward: --weights goes with --config, not with a checkpoint");
    model = load_checkpoint_model(target, &cfg);
  } else {
    cfg = load_run_config(config, sets);
    model = build_model_with_weights(cfg, weight_sources(weights));
  }
  // A checkpoint's run.threads belongs to the machine that trained it (64 there may be refused
  // here); like eval and generate, a checkpoint's forward uses this machine's cores.
  setup_threads(target.empty() ? cfg.run.threads : 0);
  const auto outputs = forward_outputs(*model, cfg, in);
  NamedTensors named(outputs.begin(), outputs.end());
  save_safetensors(out, named, {{"format", "pt"}});
  for (const auto& [name, t] : outputs) std::cout << name << " " << t.sizes() << "\n";
  return kExitOk;
}

// shapes::validate speaks of GeneratorOptions fields ("GeneratorOptions.max_objects = 40 ...;
// lower max_objects"); on the command line the user typed flags, so name those.
std::string in_flag_names(std::string msg) {
  auto replace_all = [&](const std::string& from, const std::string& to) {
    for (size_t at = msg.find(from); at != std::string::npos; at = msg.find(from, at + to.size()))
      msg.replace(at, from.size(), to);
  };
  replace_all("GeneratorOptions.", "");
  replace_all("image_size", "--image-size");
  replace_all("min_objects", "--min-objects");
  replace_all("max_objects", "--max-objects");
  for (const char* list : {"shapes", "colours"})  // only as the subject, not "use smaller sizes"
    if (msg.rfind(list, 0) == 0) msg = std::string("--") + msg;
  return msg;
}

int cmd_shapes(const std::string& out, int64_t n_train, int64_t n_val, shapes::GeneratorOptions opt, bool overwrite) {
  init_logging();
  try {
    shapes::validate(opt);
  } catch (const std::invalid_argument& e) {
    throw ConfigError("data shapes: " + in_flag_names(e.what()));
  }
  if (n_train == 0 && n_val == 0)
    throw ConfigError("data shapes: --train 0 and --val 0 would write empty manifests; ask for some scenes (e.g. --train 4000 --val 500)");
  // The generator writes train.jsonl, val.jsonl, ... and images/train/000000.png onwards: in a
  // folder that holds a dataset (this one's or a user's) those would be replaced file by file.
  std::error_code ec;
  if (!overwrite && fs::is_directory(out, ec) && !fs::is_empty(out, ec))
    throw ConfigError("data shapes: --out " + out +
                      " is not empty; the generator would replace its manifests and images. Choose a new folder, or "
                      "pass --overwrite to regenerate the shapes world there (other files are left as they are)");
  int last = -1;
  auto summary = shapes::write_dataset(out, n_train, n_val, opt, [&](int64_t done, int64_t total) {
    const int pct = static_cast<int>(100 * done / std::max<int64_t>(1, total));
    if (pct / 10 != last / 10 || done == total) {
      spdlog::info("shapes world: {}/{} images ({}%)", done, total, pct);
      last = pct;
    }
  });
  spdlog::info("wrote {} train and {} val scenes: {}, {}", summary.train, summary.val, summary.train_manifest,
               summary.val_manifest);
  const auto qa = shapes::write_instruction_data(out, n_train, n_val, opt);
  spdlog::info("wrote {} instruction conversations ({}) and {} held-out questions ({})", qa.train_records,
               qa.train_manifest, qa.val_records, qa.val_manifest);
  const auto pref = shapes::write_preference_data(out, n_train, n_val, opt);
  spdlog::info("wrote {} train and {} val caption preference pairs (train_pref.jsonl, val_pref.jsonl), {} train and "
               "{} val yes/no pairs (train_pref_yesno.jsonl, val_pref_yesno.jsonl) and {} train and {} val GRPO "
               "prompts (train_grpo.jsonl, val_grpo.jsonl)",
               pref.train_pairs, pref.val_pairs, pref.train_yes_no, pref.val_yes_no, pref.train_prompts,
               pref.val_prompts);
  spdlog::info("wrote {} yes/no hallucination probes (val_pope.jsonl)", shapes::write_pope_data(out, n_val, opt));
  // Images of an earlier, larger generation into the same folder stay behind: harmless to
  // training (the manifests name only this one's), but not what a copy or checksum of the
  // folder should hold.
  for (const auto& [split, n] : {std::pair<std::string, int64_t>{"train", n_train}, {"val", n_val}}) {
    int64_t stale = 0;
    for (int64_t i = n; fs::exists(fs::path(out) / shapes::scene_image_path(split, i)); ++i) ++stale;
    if (stale > 0)
      spdlog::warn("{} images in {} ({} onwards) are left from an earlier, larger generation and are in no "
                   "manifest; delete {} first for a folder that holds this dataset alone",
                   stale, (fs::path(out) / "images" / split).string(), shapes::scene_image_path(split, n), out);
  }
  return kExitOk;
}

int cmd_data_check(const std::string& config, const std::vector<std::string>& sets, bool images, bool json) {
  init_logging();
  const RunConfig cfg = load_run_config(config, sets);
  const auto r = check_data(cfg, images);
  std::cout << (json ? json_text(r.report, 2) + "\n" : data_check_text(r)) << std::flush;
  return r.would_fail ? kExitConfig : kExitOk;
}

int cmd_tokenizer_train(const TokenizerTrainOptions& opt, bool overwrite) {
  init_logging();
  // Checkpoints keep only the tokenizer's size and CRC: a file replaced in place cannot be had back.
  if (!overwrite && fs::exists(opt.out_prefix + ".model"))
    throw ConfigError("--out " + opt.out_prefix + ": " + opt.out_prefix +
                      ".model exists, and runs trained with it need that very file; choose another --out, or pass "
                      "--overwrite to replace it");
  const int64_t n = train_tokenizer(opt);
  const auto tok = Tokenizer::load(opt.out_prefix + ".model");
  spdlog::info("tokenizer {}.model: {} pieces from {} sentences", opt.out_prefix, tok.vocab_size(), n);
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  restart_with_passive_openmp(argv);
  CLI::App app{"trialign: train and align vision-language models from YAML configs"};
  app.require_subcommand(1);
  app.option_defaults()->always_capture_default();  // --help shows each option's default
  app.formatter(std::make_shared<HelpFormatter>());
  app.set_version_flag("--version", "trialign 0.1.0");

  // train
  std::string config, resume;
  std::vector<std::string> sets;
  auto* train = app.add_subcommand("train", "Train one stage from a YAML config");
  train->add_option("config", config, "Run config (YAML)")->required()->check(CLI::ExistingFile);
  train->add_option("--set", sets, "Override a config key, e.g. --set optim.lr=2e-4 (repeatable)");
  train->add_option("--resume", resume, "'auto' (newest complete checkpoint of the run) or a checkpoint directory");
  int nproc = 0;
  train->add_option("--nproc", nproc,
                    "Data parallel on this machine: start N ranks (torchrun's variables, Gloo on loopback); "
                    "train.batch_size is per rank")
      ->check(at_least(1, true))
      ->default_str("1 (one process, no ranks)");

  // bench
  BenchOptions bench_opt;
  auto* bench = app.add_subcommand("bench", "Time a config's training steps on synthetic batches of its bench: shapes");
  bench->add_option("config", config, "Run config or bench card (configs/bench/*.yaml)")->required()->check(CLI::ExistingFile);
  bench->add_option("--set", sets, "Override a config key, e.g. --set run.precision=fp32 (repeatable)");
  bench->add_option("--json", bench_opt.json_out, "Also write the figures as JSON here (always: RUN/bench.json)");
  bench->add_option("--profile", bench_opt.profile,
                    "Write a Chrome trace of the timed steps' operators here (chrome://tracing or ui.perfetto.dev)");

  // config check
  auto* config_cmd = app.add_subcommand("config", "Config tools");
  config_cmd->require_subcommand(1);
  auto* check = config_cmd->add_subcommand("check", "Validate a config and print it resolved (includes, overrides, defaults)");
  check->add_option("config", config, "Run config (YAML)")->required()->check(CLI::ExistingFile);
  check->add_option("--set", sets, "Override a config key (repeatable)");

  // eval
  std::string target, eval_data, eval_out, eval_predictions;
  std::vector<std::string> suites = {"auto"};
  int eval_threads = 0;
  auto* eval = app.add_subcommand("eval", "Evaluate a checkpoint (or a run's newest checkpoint)");
  eval->add_option("checkpoint", target, "Checkpoint directory or run directory")->required();
  eval->add_option("--data", eval_data, "Manifest to evaluate on (default: the checkpoint's held-out sets: data.val for stage 1, eval.sets (else data.val) for stages 2-3, eval.sets for preference)");
  eval->add_option("--suite", suites,
                   "auto (all the checkpoint supports), or a comma list: retrieval (stage 1: retrieval, hard "
                   "negatives, mutual kNN, CKA); vqa, pope, chair (stages 2-3: questions, yes/no probes, captions)")
      ->delimiter(',');
  eval->add_option("--out", eval_out, "Also write the JSON results here");
  eval->add_option("--predictions", eval_predictions,
                   "Also write each scored record's reply here (JSONL: set, id, where, question_type, reference, "
                   "reply, right; yes/no probes also said, hallucination); VLM checkpoints");
  eval->add_option("--threads", eval_threads, "LibTorch threads (0 = all cores)")->check(at_least(0, true));
  eval->add_option("--set", sets,
                   fmt::format("Override an evaluation key of the checkpoint's config (repeatable): {}",
                               fmt::join(kEvalSettable, ", ")));

  // run (pipeline)
  std::string pipeline;
  auto* run = app.add_subcommand("run", "Run a pipeline of stages (skips finished stages, resumes the current one)");
  run->add_option("pipeline", pipeline, "Pipeline (YAML)")->required()->check(CLI::ExistingFile);
  run->add_option("--set", sets, "Override a key in every stage's config (repeatable)");
  run->add_option("--nproc", nproc, "Data parallel on this machine: run every stage on N ranks")
      ->check(at_least(1, true))
      ->default_str("1 (one process, no ranks)");

  // generate
  std::string gen_image, gen_prompt;
  SamplingOptions sampling;
  sampling.max_new_tokens = 48;
  int gen_threads = 0;
  auto* generate_cmd = app.add_subcommand("generate", "Answer a prompt about an image with a stage-2/3 model");
  generate_cmd->add_option("checkpoint", target, "Checkpoint directory or run directory")->required();
  generate_cmd->add_option("--image", gen_image, "Image file")->check(CLI::ExistingFile);
  generate_cmd->add_option("--prompt", gen_prompt, "The user's message")->required();
  generate_cmd->add_option("--max-new-tokens", sampling.max_new_tokens, "Reply length cap")->check(at_least(1, true));
  generate_cmd->add_option("--temperature", sampling.temperature, "0 = greedy")->check(at_least(0, true));
  generate_cmd->add_option("--top-k", sampling.top_k, "Keep the k most likely tokens (0 = off)")->check(at_least(0, true));
  generate_cmd->add_option("--top-p", sampling.top_p, "Nucleus mass (1 = off)")
      ->check(at_least(0, false) & CLI::Range(0.0, 1.0));
  generate_cmd->add_option("--seed", sampling.seed, "Sampling seed");
  generate_cmd->add_option("--threads", gen_threads, "LibTorch threads (0 = all cores)")->check(at_least(0, true));

  // data shapes
  auto* data = app.add_subcommand("data", "Data tools");
  data->require_subcommand(1);
  std::string shapes_out;
  int64_t n_train = 10000, n_val = 1000;
  shapes::GeneratorOptions gen;
  bool no_images = false, check_json = false;
  auto* data_check = data->add_subcommand("check", "Read every record a config's run would use and list every problem");
  data_check->add_option("config", config, "Run config (YAML)")->required()->check(CLI::ExistingFile);
  data_check->add_option("--set", sets, "Override a config key (repeatable)");
  data_check->add_flag("--no-images", no_images, "Do not decode the images (only their presence and format are checked)");
  data_check->add_flag("--json", check_json, "Print the report as JSON");
  auto* shapes_cmd = data->add_subcommand("shapes", "Generate the synthetic shapes-world dataset (PNG + JSONL)");
  shapes_cmd->add_option("--out", shapes_out, "Output directory")->required();
  shapes_cmd->add_option("--train", n_train, "Training scenes")->check(at_least(0, true));
  shapes_cmd->add_option("--val", n_val, "Held-out scenes")->check(at_least(0, true));
  shapes_cmd->add_option("--seed", gen.seed, "Seed (same seed, same bytes)");
  bool shapes_overwrite = false;
  shapes_cmd->add_flag("--overwrite", shapes_overwrite, "Write into a folder that is not empty (replacing a dataset)");
  shapes_cmd->add_option("--image-size", gen.image_size, "Image side in pixels");
  shapes_cmd->add_option("--min-objects", gen.min_objects, "Fewest objects per scene");
  shapes_cmd->add_option("--max-objects", gen.max_objects, "Most objects per scene");
  // Defaults shown as they are typed: comma separated.
  auto commas = [](const std::vector<std::string>& v) { return fmt::format("{}", fmt::join(v, ",")); };
  shapes_cmd->add_option("--shapes", gen.shapes, "Shape vocabulary, comma separated")
      ->delimiter(',')
      ->default_str(commas(gen.shapes));
  shapes_cmd->add_option("--colours", gen.colours, "Colour vocabulary, comma separated")
      ->delimiter(',')
      ->default_str(commas(gen.colours));

  // tokenizer train
  auto* tokenizer = app.add_subcommand("tokenizer", "Tokenizer tools");
  tokenizer->require_subcommand(1);
  TokenizerTrainOptions tok_opt;
  auto* tok_train = tokenizer->add_subcommand("train", "Train a sentencepiece model on manifest text");
  tok_train->add_option("--manifest", tok_opt.manifests, "Manifest(s) to read")->required()->check(CLI::ExistingFile);
  tok_train->add_option("--field", tok_opt.fields, "Record field(s) holding text");
  tok_train->add_option("--out", tok_opt.out_prefix, "Output prefix: writes PREFIX.model and PREFIX.vocab")->required();
  bool tok_overwrite = false;
  tok_train->add_flag("--overwrite", tok_overwrite, "Replace an existing PREFIX.model");
  tok_train->add_option("--vocab-size", tok_opt.vocab_size, "Vocabulary size (an upper bound for tiny corpora)")
      ->check(at_least(1, true));
  tok_train->add_option("--model-type", tok_opt.model_type, "unigram | bpe | word | char")
      ->check(CLI::IsMember({"unigram", "bpe", "word", "char"}));

  // inspect, export, import, forward: checkpoints and Hugging Face weights
  std::string io_path, io_out, io_config, export_dtype = "fp32";
  bool show_tensors = false, verify = false, as_json = false;
  double shard_mb = 0;
  std::vector<std::string> io_weights;
  auto* inspect = app.add_subcommand("inspect", "What a checkpoint or Hugging Face weights hold (headers only)");
  inspect->add_option("path", io_path, "Checkpoint, run folder, .safetensors, index .json or weights folder")->required();
  inspect->add_flag("--tensors", show_tensors, "List every tensor with dtype and shape");
  inspect->add_flag("--verify", verify, "Check every file's checksum");
  inspect->add_flag("--json", as_json, "Print JSON");
  auto* export_cmd = app.add_subcommand("export", "Write a checkpoint's components as Hugging Face safetensors + config.json");
  export_cmd->add_option("checkpoint", io_path, "Checkpoint or run folder")->required();
  export_cmd->add_option("--out", io_out, "New output folder")->required();
  export_cmd->add_option("--format", io_config, "safetensors (the only format)")->check(CLI::IsMember({"safetensors"}));
  export_cmd->add_option("--dtype", export_dtype, "fp32 | bf16 | fp16")->check(CLI::IsMember({"fp32", "bf16", "fp16"}));
  export_cmd->add_option("--max-shard-mb", shard_mb, "Shard components larger than this (0 = one file)")
      ->check(at_least(0, true));
  auto* import_cmd = app.add_subcommand("import", "Build a config's model from Hugging Face weights into a checkpoint");
  import_cmd->add_option("config", io_config, "Run config (YAML) describing the model")->required()->check(CLI::ExistingFile);
  import_cmd->add_option("--weights", io_weights, "COMPONENT=PATH (repeatable): file, index .json, folder or checkpoint")
      ->required();
  import_cmd->add_option("--out", io_out, "Run folder to write the checkpoint into")->required();
  import_cmd->add_option("--set", sets, "Override a config key (repeatable)");
  ForwardInputs fwd;
  std::string fwd_config;
  auto* forward = app.add_subcommand("forward", "Write a model's outputs for given inputs to a safetensors file");
  forward->add_option("checkpoint", io_path, "Checkpoint or run folder (or use --config with --weights)");
  forward->add_option("--config", fwd_config, "Run config describing the model")->check(CLI::ExistingFile);
  forward->add_option("--weights", io_weights, "COMPONENT=PATH (repeatable), with --config");
  forward->add_option("--set", sets, "Override a config key (repeatable), with --config");
  std::vector<std::string> fwd_tokens;  // parsed below: CLI11 would drop empty items of "2,,7" and read "" as 0
  forward->add_option("--tokens", fwd_tokens, "Token ids, comma-separated");
  forward->add_option("--text", fwd.text, "Text, tokenised as in training");
  forward->add_option("--image", fwd.image, "Image file")->check(CLI::ExistingFile);
  forward->add_option("--out", io_out, "Output .safetensors file")->required();

  // losses list
  auto* losses = app.add_subcommand("losses", "List the registered loss types");

  // A mistyped command: CLI11 alone says only "A subcommand is required".
  if (argc > 1 && argv[1][0] != '-') {
    const std::string given = argv[1];
    std::vector<std::string> names;
    for (const auto* sub : app.get_subcommands([](CLI::App*) { return true; })) names.push_back(sub->get_name());
    if (std::find(names.begin(), names.end(), given) == names.end()) {
      std::string list;
      for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
      const std::string best = closest_name(given, names);
      std::cerr << "error: unknown command '" << given << "'" << (best.empty() ? "" : "; did you mean '" + best + "'?")
                << "\ncommands: " << list << "\n";
      return kExitConfig;
    }
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitConfig;
  }

  try {
    if (nproc > 0 && (*train || *run)) {
      // Each rank is a process with its own copy of the model: far more of them than cores only
      // contend for the CPU and memory (100 ranks on 2 cores took over a minute just to start).
      const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
      if (nproc > 4 * cores)
        throw ConfigError("--nproc " + std::to_string(nproc) + ": this machine has " + std::to_string(cores) +
                          " cores; use at most " + std::to_string(4 * cores) +
                          " ranks (one per core or per GPU is the usual choice)");
      // Checked here once: every rank would print the same problems.
      if (*train) check_before_training(load_run_config(config, sets), resume);
      else check_pipeline_preflight(load_pipeline(pipeline, sets));
      // The same command line without --nproc, once per rank.
      std::vector<std::string> args;
      for (int i = 0; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--nproc") {
          ++i;
          continue;
        }
        if (a.rfind("--nproc=", 0) == 0) continue;
        args.push_back(a);
      }
      return dist::launch_local(nproc, args);
    }
    if (*train) return cmd_train(config, sets, resume);
    if (*check) return cmd_config_check(config, sets);
    if (*bench) return cmd_bench(config, sets, bench_opt);
    if (*run) return cmd_run(pipeline, sets);
    if (*generate_cmd) return cmd_generate(target, gen_image, gen_prompt, sampling, gen_threads);
    if (*eval) return cmd_eval(target, eval_data, suites, eval_out, eval_predictions, eval_threads, sets);
    if (*shapes_cmd) return cmd_shapes(shapes_out, n_train, n_val, gen, shapes_overwrite);
    if (*data_check) return cmd_data_check(config, sets, !no_images, check_json);
    if (*tok_train) return cmd_tokenizer_train(tok_opt, tok_overwrite);
    if (*inspect) return cmd_inspect(io_path, show_tensors, verify, as_json);
    if (*export_cmd) return cmd_export(io_path, io_out, export_dtype, shard_mb);
    if (*import_cmd) return cmd_import(io_config, sets, io_weights, io_out);
    if (*forward) {
      if (forward->count("--tokens")) {
        std::string joined;  // "--tokens 1 2 3" and "--tokens 1,2,3" alike
        for (size_t i = 0; i < fwd_tokens.size(); ++i) joined += (i ? "," : "") + fwd_tokens[i];
        fwd.tokens = parse_token_ids(joined);
      }
      return cmd_forward(io_path, fwd_config, sets, io_weights, fwd, io_out);
    }
    if (*losses) {
      for (const auto& n : contrastive_losses().names())
        std::cout << n << "\tcontrastive (stage 1)\t" << contrastive_losses().help(n) << "\n";
      for (const auto& n : lm_losses().names())
        std::cout << n << "\tlanguage model (stages 2-3)\t" << lm_losses().help(n) << "\n";
      for (const auto& n : preference_losses().names())
        std::cout << n << "\tpreference\t" << preference_losses().help(n) << "\n";
      for (const auto& n : reward_functions().names())
        std::cout << n << "\treward function (rewards:)\t" << reward_functions().help(n) << "\n";
      return kExitOk;
    }
  } catch (const ConfigError& e) {
    // Under torchrun or Slurm every rank reads the same config and finds the same problems: rank 0
    // lists them, the others give the first line only.
    const char* rank = std::getenv("RANK");
    const std::string what = e.what();
    if (rank && std::string(rank) != "0")
      std::cerr << "error: rank " << rank << ": " << what.substr(0, what.find('\n')) << " (rank 0 lists every problem)"
                << std::endl;
    else
      std::cerr << "error: " << what << std::endl;
    return kExitConfig;
  } catch (const StoppedBeforeTraining& e) {
    std::cerr << "stopped: " << e.what() << std::endl;
    return kExitInterrupted;
  } catch (const DataError& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return kExitConfig;
  } catch (const std::invalid_argument& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return kExitConfig;
  } catch (const std::bad_alloc&) {
    std::cerr << "error: out of memory (std::bad_alloc). " << kOutOfMemoryAdvice << std::endl;
    return kExitRuntime;
  } catch (const std::exception& e) {
    const std::string what = e.what();
    // LibTorch's CPU allocator reports with its own message (and a C++ backtrace) instead.
    if (what.find("DefaultCPUAllocator: not enough memory") != std::string::npos ||
        what.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos) {
      std::cerr << "error: out of memory (" << what.substr(0, what.find('\n')) << "). " << kOutOfMemoryAdvice
                << std::endl;
      return kExitRuntime;
    }
    std::cerr << "error: " << what << std::endl;
    return kExitRuntime;
  }
  return kExitOk;
}
