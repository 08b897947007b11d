// See spm_shim.h for why this library exists. Exceptions never cross the C boundary.
#include "spm_shim/spm_shim.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace {

char* dup(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

sentencepiece::SentencePieceProcessor* sp(void* h) { return static_cast<sentencepiece::SentencePieceProcessor*>(h); }

}  // namespace

extern "C" {

int tspm_abi_version(void) { return TSPM_ABI_VERSION; }

void* tspm_load(const char* path, char** error) {
  try {
    auto* p = new sentencepiece::SentencePieceProcessor();
    const auto status = p->Load(path);
    if (!status.ok()) {
      if (error) *error = dup(status.ToString());
      delete p;
      return nullptr;
    }
    return p;
  } catch (const std::exception& e) {
    if (error) *error = dup(e.what());
    return nullptr;
  }
}

void tspm_unload(void* handle) { delete sp(handle); }

int tspm_encode(void* handle, const char* text, int** ids, int* n) {
  try {
    std::vector<int> out;
    if (!sp(handle)->Encode(text, &out).ok()) return 1;
    *n = static_cast<int>(out.size());
    *ids = static_cast<int*>(std::malloc(sizeof(int) * (out.empty() ? 1 : out.size())));
    if (!*ids) return 1;
    if (!out.empty()) std::memcpy(*ids, out.data(), sizeof(int) * out.size());
    return 0;
  } catch (...) {
    return 1;
  }
}

char* tspm_decode(void* handle, const int* ids, int n) {
  try {
    std::string text;
    sp(handle)->Decode(std::vector<int>(ids, ids + n), &text);
    return dup(text);
  } catch (...) {
    return dup("");
  }
}

char* tspm_id_to_piece(void* handle, int id) {
  if (id < 0 || id >= sp(handle)->GetPieceSize()) return dup("");
  return dup(sp(handle)->IdToPiece(id));
}

int tspm_piece_to_id(void* handle, const char* piece) { return sp(handle)->PieceToId(piece); }

int tspm_piece_size(void* handle) { return sp(handle)->GetPieceSize(); }

int tspm_special_id(void* handle, int which) {
  switch (which) {
    case 0: return sp(handle)->pad_id();
    case 1: return sp(handle)->unk_id();
    case 2: return sp(handle)->bos_id();
    case 3: return sp(handle)->eos_id();
    default: return -1;
  }
}

char* tspm_train_sentences(const char* args, const char* const* sentences, long long n, char** model,
                           long long* model_size, char** vocab) {
  try {
    struct Sentences : sentencepiece::SentenceIterator {
      const char* const* v;
      long long n, i = 0;
      std::string current;
      Sentences(const char* const* v, long long n) : v(v), n(n) {
        if (n > 0) current = v[0];
      }
      bool done() const override { return i >= n; }
      void Next() override {
        if (++i < n) current = v[i];
      }
      const std::string& value() const override { return current; }
      sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }
    } it(sentences, n);
    std::string proto;
    auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &proto);
    if (!status.ok()) return dup(status.ToString());
    sentencepiece::SentencePieceProcessor p;
    status = p.LoadFromSerializedProto(proto);
    if (!status.ok()) return dup(status.ToString());
    std::ostringstream v;  // the layout sentencepiece's own .vocab file has
    for (int id = 0; id < p.GetPieceSize(); ++id) v << p.IdToPiece(id) << '\t' << p.GetScore(id) << '\n';
    *model = static_cast<char*>(std::malloc(proto.size() ? proto.size() : 1));
    if (!*model) return dup("out of memory");
    std::memcpy(*model, proto.data(), proto.size());
    *model_size = static_cast<long long>(proto.size());
    *vocab = dup(v.str());
    return nullptr;
  } catch (const std::exception& e) {
    return dup(e.what());
  }
}

void tspm_free_buffer(void* p) { std::free(p); }

}  // extern "C"
