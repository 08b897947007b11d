// Seeded random mutation of every reader a user's files reach: manifests (JSONL and JSON list),
// run configs (YAML), safetensors files, images, and checkpoint manifests. Each mutant must
// either load or be refused with the reader's own error type (DataError / ConfigError), which
// the command line turns into a message and exit code 2; anything else (another exception, a
// crash, an abort) fails the test. The text seeds live in tests/broken/fuzz/, the binary ones
// (safetensors, images, a checkpoint) are written here; the random seeds are fixed, so a
// failure reproduces; run under
// AddressSanitizer / UBSan with scripts/test.sh --sanitize.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <opencv2/imgcodecs.hpp>
#include <random>

#include "core/checkpoint.h"
#include "core/errors.h"
#include "core/run_config.h"
#include "core/safetensors.h"
#include "data/image.h"
#include "data/manifest.h"
#include "test_helpers.h"

namespace fs = std::filesystem;
using namespace trialign;
using test::TempDir;

namespace {

// One random edit of `s`: flip, insert, delete, duplicate a span, truncate, or splice in a
// token that readers treat specially.
std::string mutate(std::string s, std::mt19937_64& rng) {
  static const char* tokens[] = {"{", "}", "[", "]", "\"", ":", ",", "\n", "\t", "-1", "1e400", "null", "true",
                                 "\xff\xfe", "\xc3", "\\u0000", "\\", "&a", "*a", "!!binary", "~", "18446744073709551615",
                                 "9223372036854775808", "-9223372036854775809", "0x7fffffff", "NaN", "..", "/"};
  auto pick = [&](size_t n) { return n == 0 ? size_t(0) : static_cast<size_t>(rng() % n); };
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    const size_t at = pick(s.size() + 1);
    switch (rng() % 7) {
      case 0:
        if (!s.empty()) s[pick(s.size())] ^= static_cast<char>(1 << (rng() % 8));
        break;
      case 1:
        s.insert(at, 1, static_cast<char>(rng() % 256));
        break;
      case 2:
        if (!s.empty()) s.erase(pick(s.size()), 1 + pick(16));
        break;
      case 3: {
        const size_t from = pick(s.size()), len = std::min<size_t>(s.size() - from, 1 + pick(32));
        s.insert(at, s.substr(from, len));
        break;
      }
      case 4:
        s.resize(pick(s.size() + 1));
        break;
      default:
        s.insert(at, tokens[pick(sizeof tokens / sizeof *tokens)]);
    }
  }
  return s;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// Runs `read` on `n` files made by `make` (from a seeded generator) and written to `path`; counts
// the outcomes and fails on any exception other than the allowed ones (the file stays at `path`
// for a repro).
template <class Allowed>
std::pair<int, int> fuzz_with(const std::string& path, int n, uint64_t seed,
                              const std::function<std::string(std::mt19937_64&, int)>& make,
                              const std::function<void()>& read) {
  std::mt19937_64 rng(seed);
  int loaded = 0, refused = 0;
  for (int i = 0; i < n; ++i) {
    const std::string m = make(rng, i);
    write_bytes(path, m);
    INFO("mutant " << i << " of seed " << seed << " (" << m.size() << " bytes) at " << path);
    try {
      read();
      ++loaded;
    } catch (const Allowed&) {
      ++refused;
    } catch (const std::exception& e) {
      FAIL("unexpected " << typeid(e).name() << ": " << e.what());
    }
  }
  return {loaded, refused};
}

// The same with random edits of `seed_bytes`.
template <class Allowed>
std::pair<int, int> fuzz(const std::string& path, const std::string& seed_bytes, int n, uint64_t seed,
                         const std::function<void()>& read) {
  return fuzz_with<Allowed>(path, n, seed, [&](std::mt19937_64& rng, int) { return mutate(seed_bytes, rng); }, read);
}

}  // namespace

TEST_CASE("fuzz: manifests (JSONL and JSON list) load or give a DataError", "[fuzz]") {
  TempDir d("fuzz-manifest");
  const std::string seeds = test::source_dir() + "/tests/broken/fuzz/";
  const std::string jsonl = read_bytes(seeds + "manifest.jsonl"), list = read_bytes(seeds + "manifest_list.json");
  for (const auto& [name, text] : {std::pair<std::string, std::string>{"m.jsonl", jsonl}, {"m.json", list}}) {
    const std::string path = d.file(name);
    const auto [loaded, refused] = fuzz<DataError>(path, text, 400, 11, [&] {
      for (const auto& r : read_manifest(path)) {
        (void)r.where;
        try {
          require_string(r, "caption");
        } catch (const DataError&) {
        }
      }
    });
    CHECK(loaded > 0);   // the mutations are not all fatal...
    CHECK(refused > 0);  // ...nor all harmless
  }
}

TEST_CASE("fuzz: run configs load or give a ConfigError", "[fuzz]") {
  TempDir d("fuzz-config");
  // The seed config includes another file: mutants exercise include: too.
  const std::string seeds = test::source_dir() + "/tests/broken/fuzz/";
  write_bytes(d.file("base.yaml"), read_bytes(seeds + "base.yaml"));
  const std::string cfg = read_bytes(seeds + "config.yaml");
  const std::string path = d.file("run.yaml");
  const auto [loaded, refused] = fuzz<ConfigError>(path, cfg, 500, 12, [&] { load_run_config(path); });
  CHECK(loaded > 0);
  CHECK(refused > 0);
}

TEST_CASE("fuzz: safetensors headers and data load or give a DataError", "[fuzz]") {
  TempDir d("fuzz-safetensors");
  const std::string good = d.file("good.safetensors");
  save_safetensors(good,
                   {{"a.weight", torch::randn({3, 4})}, {"b", torch::arange(6, torch::kInt64)},
                    {"c", torch::ones({2}, torch::kBFloat16)}},
                   {{"format", "pt"}});
  const std::string bytes = read_bytes(good), path = d.file("m.safetensors");
  // Mutations of the whole file, and of the header alone (the data section kept intact).
  auto read = [&] {
    read_safetensors_header(path);
    for (const auto& [k, t] : load_safetensors(path)) CHECK(t.defined());
  };
  auto [loaded, refused] = fuzz<DataError>(path, bytes, 400, 13, read);
  CHECK(refused > 0);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  const std::string header = bytes.substr(8, n), data = bytes.substr(8 + n);
  const auto header_only = fuzz_with<DataError>(path, 400, 14, [&](std::mt19937_64& rng, int i) {
    const std::string h = mutate(header, rng);
    uint64_t len = h.size();
    if (i % 10 == 0) len = (i % 20 == 0) ? ~uint64_t(0) : uint64_t(1) << 40;  // absurd header lengths
    std::string file(8, '\0');
    std::memcpy(&file[0], &len, 8);
    return file + h + data;
  }, read);
  loaded += header_only.first;
  CHECK(loaded > 0);
}

TEST_CASE("fuzz: images load or give a DataError", "[fuzz]") {
  TempDir d("fuzz-image");
  cv::Mat img(24, 24, CV_8UC3);
  cv::randu(img, 0, 255);
  for (const std::string ext : {".png", ".jpg", ".bmp"}) {
    const std::string good = d.file("good" + ext), path = d.file("m" + ext);
    REQUIRE(cv::imwrite(good, img));
    const auto [loaded, refused] = fuzz<DataError>(path, read_bytes(good), 150, 15, [&] {
      const auto rgb = load_image_rgb(path);
      CHECK(rgb.channels() == 3);
      CHECK_FALSE(rgb.empty());
    });
    CHECK(loaded + refused == 150);
  }
}

TEST_CASE("fuzz: checkpoint manifests verify or give a DataError", "[fuzz]") {
  TempDir d("fuzz-ckpt");
  const std::string run = d.file("run");
  {
    CheckpointWriter w(run, 3, "finetune");
    save_safetensors(w.path("model.safetensors"), {{"x", torch::ones({2})}});
    w.add_json("trainer_state.json", {{"trainer", "finetune"}, {"step", 3}});
    w.add_text("config.yaml", "trainer: finetune\n");
    w.commit(3, 0);
  }
  const std::string dir = find_latest_checkpoint(run);
  REQUIRE_FALSE(dir.empty());
  const std::string manifest = dir + "/MANIFEST.json", bytes = read_bytes(manifest);
  const auto [loaded, refused] = fuzz<DataError>(manifest, bytes, 400, 16, [&] { verify_checkpoint(dir); });
  CHECK(refused > 0);
  write_bytes(manifest, bytes);
  CHECK(verify_checkpoint(dir).step == 3);
}
