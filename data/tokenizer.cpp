#include "data/tokenizer.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "data/manifest.h"
#include "spm_shim/spm_shim.h"

namespace trialign {

namespace {

// The shim's entry points, resolved once.
struct SpmApi {
  decltype(&tspm_abi_version) abi_version;
  decltype(&tspm_load) load;
  decltype(&tspm_unload) unload;
  decltype(&tspm_encode) encode;
  decltype(&tspm_decode) decode;
  decltype(&tspm_id_to_piece) id_to_piece;
  decltype(&tspm_piece_to_id) piece_to_id;
  decltype(&tspm_piece_size) piece_size;
  decltype(&tspm_special_id) special_id;
  decltype(&tspm_train_sentences) train;
  decltype(&tspm_free_buffer) free_buffer;
};

std::string shim_path() {
  if (const char* env = std::getenv("TRIALIGN_SPM_LIBRARY")) return env;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&shim_path), &info) && info.dli_fname)
    return (std::filesystem::path(info.dli_fname).parent_path() / "libtrialign_spm.so").string();
  return "libtrialign_spm.so";
}

const SpmApi& spm() {
  static SpmApi api;
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    const std::string path = shim_path();
#ifdef TRIALIGN_SPM_DLMOPEN
    // Sanitizer builds: AddressSanitizer refuses RTLD_DEEPBIND, so the shim (built without
    // sanitizers) goes into a link-map namespace of its own, which isolates sentencepiece's
    // protobuf just as well; the C ABI and tspm_free_buffer keep every allocation on its side.
    void* lib = dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
#else
    // RTLD_LOCAL keeps sentencepiece's bundled protobuf out of the global scope; RTLD_DEEPBIND
    // makes sentencepiece prefer it over the libprotobuf LibTorch already loaded.
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
#endif
    if (!lib) {
      error = "cannot load the sentencepiece shim '" + path + "': " + dlerror() +
              " (rebuild trialign, or set TRIALIGN_SPM_LIBRARY to libtrialign_spm.so)";
      return;
    }
    auto sym = [&](const char* name) {
      void* p = dlsym(lib, name);
      if (!p && error.empty()) error = path + ": missing symbol " + name;
      return p;
    };
    api.abi_version = reinterpret_cast<decltype(api.abi_version)>(sym("tspm_abi_version"));
    api.load = reinterpret_cast<decltype(api.load)>(sym("tspm_load"));
    api.unload = reinterpret_cast<decltype(api.unload)>(sym("tspm_unload"));
    api.encode = reinterpret_cast<decltype(api.encode)>(sym("tspm_encode"));
    api.decode = reinterpret_cast<decltype(api.decode)>(sym("tspm_decode"));
    api.id_to_piece = reinterpret_cast<decltype(api.id_to_piece)>(sym("tspm_id_to_piece"));
    api.piece_to_id = reinterpret_cast<decltype(api.piece_to_id)>(sym("tspm_piece_to_id"));
    api.piece_size = reinterpret_cast<decltype(api.piece_size)>(sym("tspm_piece_size"));
    api.special_id = reinterpret_cast<decltype(api.special_id)>(sym("tspm_special_id"));
    api.train = reinterpret_cast<decltype(api.train)>(sym("tspm_train_sentences"));
    api.free_buffer = reinterpret_cast<decltype(api.free_buffer)>(sym("tspm_free_buffer"));
    if (error.empty() && api.abi_version() != TSPM_ABI_VERSION)
      error = path + ": shim ABI version " + std::to_string(api.abi_version()) + ", this build expects " +
              std::to_string(TSPM_ABI_VERSION) + " (rebuild trialign)";
  });
  if (!error.empty()) throw DataError(error);
  return api;
}

// Takes ownership of a malloc'd C string from the shim.
std::string take(char* p) {
  std::string s = p ? p : "";
  spm().free_buffer(p);
  return s;
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  if (std::filesystem::is_directory(path))
    throw DataError("tokenizer model '" + path + "' is a folder; point data.tokenizer at the .model file in it");
  if (!std::filesystem::is_regular_file(path)) {
    // A relative path is read against the working directory: a checkpoint's recorded
    // data.tokenizer works only from the folder its run was started in.
    const std::string where = std::filesystem::path(path).is_relative()
                                  ? " (read relative to the working directory " +
                                        std::filesystem::current_path().string() +
                                        "; a path a checkpoint records is relative to the folder its run was started "
                                        "in, so run eval and generate from there)"
                                  : "";
    throw DataError("tokenizer model '" + path + "' does not exist" + where +
                    "; point data.tokenizer at a .model file (`trialign tokenizer train` makes one)");
  }
  const SpmApi& api = spm();
  char* err = nullptr;
  void* handle = api.load(path.c_str(), &err);
  if (!handle) {
    const std::string detail = take(err);
    // sentencepiece's own words for a file that is not a model are a protobuf parse failure.
    const bool not_a_model = detail.find("ParseFromArray") != std::string::npos;
    throw DataError("tokenizer model '" + path + "' cannot be loaded: " +
                    (not_a_model ? "it is not a sentencepiece model (the .model file, not the .vocab or another file, "
                                   "is what data.tokenizer takes)"
                                 : detail));
  }
  Tokenizer t;
  t.sp_ = std::shared_ptr<void>(handle, [](void* h) { spm().unload(h); });
  t.path_ = path;
  t.coverage_ = std::make_shared<CoverageState>();
  t.vocab_size_ = api.piece_size(handle);
  t.pad_id_ = api.special_id(handle, 0);
  t.unk_id_ = api.special_id(handle, 1);
  t.bos_id_ = api.special_id(handle, 2);
  t.eos_id_ = api.special_id(handle, 3);
  if (t.pad_id_ < 0) t.pad_id_ = t.unk_id_;
  const int img = api.piece_to_id(handle, "<image>");
  t.image_id_ = (img != t.unk_id_) ? img : -1;
  return t;
}

struct Tokenizer::CoverageState {
  std::atomic<int64_t> tokens{0}, unknown{0};
  std::mutex mu;  // example only: taken on the rare encode that meets an unk
  std::string example;
};

std::vector<int> Tokenizer::encode(const std::string& text) const {
  int* ids = nullptr;
  int n = 0;
  if (spm().encode(sp_.get(), text.c_str(), &ids, &n) != 0)
    throw DataError("tokenizer '" + path_ + "' failed to encode a text of " + std::to_string(text.size()) + " bytes");
  std::vector<int> out(ids, ids + n);
  spm().free_buffer(ids);
  if (coverage_) {
    const auto unknown = std::count(out.begin(), out.end(), unk_id_);  // unk_id_ -1 (none) matches no id
    coverage_->tokens += static_cast<int64_t>(out.size());
    if (unknown > 0) {
      // The latest such text, so any window with an unk in it (coverage_since) shows one of its own.
      size_t cut = std::min<size_t>(text.size(), 80);
      while (cut < text.size() && cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // whole UTF-8 characters
      std::lock_guard<std::mutex> lock(coverage_->mu);
      coverage_->unknown += unknown;
      coverage_->example = text.substr(0, cut);
    }
  }
  return out;
}

Tokenizer::Coverage Tokenizer::coverage_since(const Coverage& before) const {
  Coverage c = coverage();
  c.tokens -= before.tokens;
  c.unknown -= before.unknown;
  return c;
}

std::string unknown_tokens_note(const Tokenizer::Coverage& c, const std::string& set, const std::string& tokenizer_path) {
  if (c.unknown <= 0) return "";
  char share[32];
  std::snprintf(share, sizeof share, "%.2f%%", 100.0 * static_cast<double>(c.unknown) / static_cast<double>(std::max<int64_t>(1, c.tokens)));
  return set + ": " + std::to_string(c.unknown) + " of " + std::to_string(c.tokens) + " tokens (" + share +
         ") are unknown to the tokenizer " + tokenizer_path + " (e.g. in \"" + c.example +
         "\"): the model can neither read nor write those characters. Train a tokenizer on this data "
         "(`trialign tokenizer train`) or use one with byte fallback";
}

Tokenizer::Coverage Tokenizer::coverage() const {
  Coverage c;
  if (!coverage_) return c;
  c.tokens = coverage_->tokens.load();
  c.unknown = coverage_->unknown.load();
  std::lock_guard<std::mutex> lock(coverage_->mu);
  c.example = coverage_->example;
  return c;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  return take(spm().decode(sp_.get(), ids.data(), static_cast<int>(ids.size())));
}

std::string Tokenizer::piece(int id) const { return take(spm().id_to_piece(sp_.get(), id)); }

int64_t train_tokenizer(const TokenizerTrainOptions& opt) {
  if (opt.out_prefix.empty()) throw DataError("tokenizer train: --out is required");
  // The sentences go to sentencepiece in memory and the model comes back as bytes: a model
  // trained from an --input file records that file's path (and --model_prefix), so the same data
  // and options gave other bytes under another --out spelling or temporary name, and checkpoints
  // check the tokenizer's bytes.
  std::vector<std::string> sentences;
  auto emit = [&](std::string line) {  // one sentence per line, as sentencepiece reads them
    for (auto& c : line)
      if (c == '\n' || c == '\r') c = ' ';
    sentences.push_back(std::move(line));
  };
  for (const auto& m : opt.manifests) {
    for (const auto& rec : read_manifest(m)) {
      for (const auto& f : opt.fields) {
        auto it = rec.json.find(f);
        if (it == rec.json.end()) continue;
        if (it->is_string()) emit(it->get<std::string>());
        else if (it->is_array())
          for (const auto& turn : *it)
            if (turn.is_object() && turn.contains("value") && turn["value"].is_string())
              emit(turn["value"].get<std::string>());
      }
    }
  }
  if (sentences.empty()) {
    std::string fields;
    for (const auto& f : opt.fields) fields += (fields.empty() ? "'" : ", '") + f + "'";
    throw DataError("tokenizer train: no text found in the field(s) " + fields +
                    " of the given manifests; name the fields that hold text with --field (a string, or a "
                    "conversation list of {from, value} turns)");
  }
  // hard_vocab_limit=false: a tiny closed vocabulary (shapes world) cannot always fill the
  // requested size, which is fine.
  const std::string args = "--vocab_size=" + std::to_string(opt.vocab_size) + " --model_type=" + opt.model_type +
                           " --pad_id=0 --unk_id=1 --bos_id=2 --eos_id=3"
                           " --user_defined_symbols=<image>,USER:,ASSISTANT: --hard_vocab_limit=false"
                           " --character_coverage=1.0 --minloglevel=2 --num_threads=1";
  std::vector<const char*> lines;
  lines.reserve(sentences.size());
  for (const auto& l : sentences) lines.push_back(l.c_str());
  char *model = nullptr, *vocab = nullptr;
  long long model_size = 0;
  char* err = spm().train(args.c_str(), lines.data(), static_cast<long long>(lines.size()), &model, &model_size, &vocab);
  if (err) {
    const std::string detail = take(err);
    // Every character of the text needs a piece, and trialign keeps character_coverage at 1.0.
    const std::string marker = "Vocabulary size is smaller than required_chars.";
    const size_t at = detail.find(marker);
    if (at != std::string::npos) {
      std::string counts = detail.substr(at + marker.size());  // " 5 vs 30. Increase ..."
      counts = counts.substr(0, counts.find('.'));
      throw DataError("tokenizer train: --vocab-size " + std::to_string(opt.vocab_size) +
                      " is too small for the text: every distinct character and the 7 special and chat pieces need "
                      "one of their own (sentencepiece: vocabulary vs required" + counts + "); raise --vocab-size");
    }
    throw DataError("tokenizer train: sentencepiece failed: " + detail);
  }
  const std::string model_bytes(model, static_cast<size_t>(model_size));
  spm().free_buffer(model);
  const std::string vocab_text = take(vocab);
  auto parent = std::filesystem::path(opt.out_prefix).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  for (const auto& [path, bytes] : {std::pair<std::string, const std::string*>{opt.out_prefix + ".model", &model_bytes},
                                    {opt.out_prefix + ".vocab", &vocab_text}}) {
    // Written whole and renamed into place: a reader (or a crash) never sees half a model.
    const std::string tmp = path + ".tmp";
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes->data(), static_cast<std::streamsize>(bytes->size()));
    out.close();
    std::error_code ec;
    if (out) std::filesystem::rename(tmp, path, ec);
    if (!out || ec) {
      std::filesystem::remove(tmp, ec);
      throw DataError("tokenizer train: cannot write '" + path + "'");
    }
  }
  return static_cast<int64_t>(sentences.size());
}

std::vector<int64_t> encode_for_text_encoder(const Tokenizer& tok, const std::string& text, int max_len) {
  std::vector<int64_t> ids;
  if (tok.bos_id() >= 0) ids.push_back(tok.bos_id());
  for (int id : tok.encode(text)) ids.push_back(id);
  const int eos = tok.eos_id() >= 0 ? tok.eos_id() : tok.pad_id();
  if (static_cast<int>(ids.size()) >= max_len) ids.resize(static_cast<size_t>(max_len - 1));
  ids.push_back(eos);
  return ids;
}

}  // namespace trialign
