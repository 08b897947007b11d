// C ABI of the sentencepiece shim (libtrialign_spm.so).
//
// Why a shim: Debian's libsentencepiece carries protobuf 3.14 generated code and exports the
// protobuf-lite symbols it bundles, while LibTorch needs the system libprotobuf 3.21. In one
// symbol scope either the process crashes at start-up or sentencepiece refuses the runtime
// version. The framework therefore never links sentencepiece: data/tokenizer.cpp dlopens this
// shim with RTLD_LOCAL | RTLD_DEEPBIND, so sentencepiece binds to its own protobuf and nothing
// else sees it. Strings and arrays returned here are malloc'd; free them with tspm_free_buffer.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

#define TSPM_ABI_VERSION 2

int tspm_abi_version(void);
// Returns a handle, or NULL with *error set (malloc'd message).
void* tspm_load(const char* path, char** error);
void tspm_unload(void* handle);
// ids: malloc'd array of *n ids. Returns 0 on success.
int tspm_encode(void* handle, const char* text, int** ids, int* n);
char* tspm_decode(void* handle, const int* ids, int n);
char* tspm_id_to_piece(void* handle, int id);
int tspm_piece_to_id(void* handle, const char* piece);
int tspm_piece_size(void* handle);
// which: 0 pad, 1 unk, 2 bos, 3 eos (-1 when the model has none)
int tspm_special_id(void* handle, int which);
// Trains with sentencepiece's flag string (no --input, no --model_prefix) on the n given
// sentences, and hands back the model file's bytes (*model, *model_size) and the matching
// .vocab text (*vocab: "piece<TAB>score" lines). No file is read or written, so the model
// records no path. Returns NULL on success, else a malloc'd error.
char* tspm_train_sentences(const char* args, const char* const* sentences, long long n, char** model,
                           long long* model_size, char** vocab);
void tspm_free_buffer(void* p);

#ifdef __cplusplus
}
#endif
