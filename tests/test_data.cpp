// Data pipeline: manifest errors with file:line, tokenizer round trip, deterministic order and
// augmentation, prefetching in step order for any worker count.
#include <catch2/catch.hpp>

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cstdio>
#include <set>

#include "core/errors.h"
#include "data/caption_dataset.h"
#include "data/image.h"
#include "data/manifest.h"
#include "data/prefetch_loader.h"
#include "data/sampler.h"
#include "data/tokenizer.h"
#include "test_helpers.h"

using namespace trialign;
using trialign::test::TempDir;
using trialign::test::write_file;

namespace {

const auto data_error = trialign::test::message_of<DataError>;

void write_png(const std::string& path, cv::Scalar rgb, int size = 16) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  cv::Mat m(size, size, CV_8UC3, cv::Scalar(rgb[2], rgb[1], rgb[0]));
  cv::imwrite(path, m);
}

}  // namespace

TEST_CASE("manifest: JSONL and JSON list records carry their location", "[data][manifest]") {
  TempDir d("manifest");
  write_file(d.file("a.jsonl"), "{\"id\": \"r1\", \"caption\": \"x\"}\n\n{\"caption\": \"y\"}\n");
  auto recs = read_manifest(d.file("a.jsonl"));
  REQUIRE(recs.size() == 2);
  CHECK(recs[0].where == d.file("a.jsonl") + ":1");
  CHECK(recs[0].id == "r1");
  CHECK(recs[1].where == d.file("a.jsonl") + ":3");  // blank line skipped, numbering kept
  CHECK(recs[1].id == "#1");

  write_file(d.file("b.json"), "[\n {\"id\": \"q\", \"caption\": \"x\"},\n {\"caption\": 3}\n]\n");
  recs = read_manifest(d.file("b.json"));
  REQUIRE(recs.size() == 2);
  CHECK(recs[1].where == d.file("b.json") + "[#1]");
  CHECK_THAT(data_error([&] { require_string(recs[1], "caption"); }),
             Catch::Contains("b.json[#1] (id #1): field 'caption' must be a string, got number"));
  CHECK_THAT(data_error([&] { require_string(recs[0], "image"); }),
             Catch::Contains("(id q): missing field 'image'"));

  // Saved with a UTF-8 byte order mark (utf-8-sig): the same records, list or lines.
  write_file(d.file("bom.json"), "\xEF\xBB\xBF[\n {\"id\": \"q\", \"caption\": \"x\"},\n {\"caption\": \"y\"}\n]\n");
  recs = read_manifest(d.file("bom.json"));
  REQUIRE(recs.size() == 2);
  CHECK(recs[0].id == "q");
  CHECK(recs[1].where == d.file("bom.json") + "[#1]");
  write_file(d.file("bom.jsonl"), "\xEF\xBB\xBF{\"id\": \"r1\", \"caption\": \"x\"}\n{\"caption\": \"y\"}\n");
  recs = read_manifest(d.file("bom.jsonl"));
  REQUIRE(recs.size() == 2);
  CHECK(recs[0].id == "r1");
  CHECK(recs[1].where == d.file("bom.jsonl") + ":2");
}

TEST_CASE("manifest: malformed JSON is reported with its line", "[data][manifest]") {
  TempDir d("manifest");
  write_file(d.file("bad.jsonl"), "{\"caption\": \"ok\"}\n{\"caption\": \"broken\"\n");
  CHECK_THAT(data_error([&] { read_manifest(d.file("bad.jsonl")); }),
             Catch::Contains(d.file("bad.jsonl") + ":2: malformed JSON line"));
  write_file(d.file("bad.json"), "[\n {\"caption\": \"ok\"},\n {\"caption\" \"x\"}\n]");
  CHECK_THAT(data_error([&] { read_manifest(d.file("bad.json")); }), Catch::Contains(d.file("bad.json") + ":3: malformed JSON"));
  CHECK_THAT(data_error([&] { read_manifest(d.file("missing.jsonl")); }), Catch::Contains("cannot open manifest"));
}

TEST_CASE("tokenizer: train, reload, round trip and special ids", "[data][tokenizer]") {
  TempDir d("tok");
  std::string lines;
  const char* words[] = {"red", "green", "blue", "circle", "square", "star", "small", "large"};
  for (int i = 0; i < 200; ++i)
    lines += std::string("{\"caption\": \"a ") + words[i % 3] + " " + words[3 + i % 3] +
             " left of a " + words[(i / 3) % 3] + " " + words[3 + (i / 7) % 3] + "\"}\n";
  write_file(d.file("m.jsonl"), lines);
  CHECK(trialign::test::train_test_tokenizer(d.file("m.jsonl"), d.file("tok"), 40) == 200);
  auto tok = Tokenizer::load(d.file("tok.model"));
  CHECK(tok.pad_id() == 0);
  CHECK(tok.unk_id() == 1);
  CHECK(tok.bos_id() == 2);
  CHECK(tok.eos_id() == 3);
  CHECK(tok.image_id() == 4);  // first user-defined piece
  CHECK(tok.piece(tok.image_id()) == "<image>");
  const std::string text = "a green square left of a blue star";
  auto ids = tok.encode(text);
  CHECK(tok.decode(ids) == text);
  auto with_special = encode_for_text_encoder(tok, text, 64);
  CHECK(with_special.front() == tok.bos_id());
  CHECK(with_special.back() == tok.eos_id());
  CHECK(with_special.size() == ids.size() + 2);
  auto truncated = encode_for_text_encoder(tok, text, 4);  // keeps bos, two pieces, eos
  REQUIRE(truncated.size() == 4);
  CHECK(truncated[3] == tok.eos_id());
  CHECK(truncated[1] == ids[0]);
  // Coverage: every encode counts its tokens and its unk; a character the training text never had
  // (the snowman) is unk, once per occurrence here (each stands alone between spaces).
  const auto before = tok.coverage();
  const std::string unseen = "a red \u2603 circle \u2603";
  const auto unseen_ids = tok.encode(unseen);
  CHECK(std::count(unseen_ids.begin(), unseen_ids.end(), tok.unk_id()) == 2);
  tok.encode(text);
  const auto c = tok.coverage_since(before);
  CHECK(c.unknown == 2);
  CHECK(c.tokens == static_cast<int64_t>(unseen_ids.size() + ids.size()));
  CHECK(c.example == unseen);
  char share[32];
  std::snprintf(share, sizeof share, "%.2f%%", 200.0 / static_cast<double>(c.tokens));
  CHECK_THAT(unknown_tokens_note(c, "data.train", "tok.model"),
             Catch::StartsWith("data.train: 2 of " + std::to_string(c.tokens) + " tokens (" + share +
                               ") are unknown to the tokenizer tok.model (e.g. in \"" + unseen + "\")") &&
                 Catch::Contains("Train a tokenizer on this data"));
  CHECK(unknown_tokens_note(tok.coverage_since(tok.coverage()), "data.train", "tok.model").empty());
  // The example is cut to whole UTF-8 characters: 79 bytes and a 3-byte snowman keep the 79.
  const auto before_long = tok.coverage();
  const std::string long_text = std::string(79, 'a') + "\u2603";
  tok.encode(long_text);
  CHECK(tok.coverage_since(before_long).example == std::string(79, 'a'));
  CHECK_THAT(data_error([&] { Tokenizer::load(d.file("none.model")); }), Catch::Contains("does not exist"));
  CHECK_THAT(data_error([&] { Tokenizer::load(d.path.string()); }),
             Catch::Contains("tokenizer model '" + d.path.string() + "' is a folder; point data.tokenizer at the .model file"));
  write_file(d.file("junk.model"), "not a model");
  CHECK_THAT(data_error([&] { Tokenizer::load(d.file("junk.model")); }),
             Catch::Contains("cannot be loaded: it is not a sentencepiece model (the .model file, not the .vocab"));
  // A relative path names the folder it was read against.
  CHECK_THAT(data_error([&] { Tokenizer::load("no/such/tokenizer.model"); }),
             Catch::Contains("does not exist (read relative to the working directory " + std::filesystem::current_path().string()));
}

TEST_CASE("sampler: left-out records are never drawn, and the others come as from a dataset without them", "[data]") {
  const std::vector<int64_t> kept = {0, 1, 3, 4, 6, 7, 8, 9};
  EpochSampler s(7, 10, {5, 2}), plain(7, 8);
  CHECK(s.size() == 8);
  std::set<int64_t> epoch0;
  for (int64_t step = 0; step < 12; ++step) {  // three epochs of 8 in steps of 2
    const auto a = s.batch(step, 2), b = plain.batch(step, 2);
    for (size_t j = 0; j < a.size(); ++j) {
      CHECK(a[j].epoch == b[j].epoch);
      CHECK(a[j].index == kept[static_cast<size_t>(b[j].index)]);
      if (a[j].epoch == 0) epoch0.insert(a[j].index);
    }
  }
  CHECK(epoch0 == std::set<int64_t>(kept.begin(), kept.end()));
  // Nothing left out (or only indices outside the dataset): the plain stream.
  EpochSampler none(7, 10, {}), outside(7, 10, {-1, 10}), base(7, 10);
  for (int64_t step = 0; step < 10; ++step) {
    CHECK(none.batch(step, 3)[1].index == base.batch(step, 3)[1].index);
    CHECK(outside.batch(step, 3)[2].index == base.batch(step, 3)[2].index);
  }
}

TEST_CASE("sampler: epochs are permutations, order is a pure function of (seed, step), ranks tile the batch", "[data]") {
  EpochSampler a(7, 10), b(7, 10), other(8, 10);
  std::set<int64_t> epoch0;
  for (int64_t s = 0; s < 5; ++s)
    for (auto r : a.batch(s, 2)) {
      CHECK(r.epoch == 0);
      epoch0.insert(r.index);
    }
  CHECK(epoch0.size() == 10);  // every record exactly once in epoch 0
  auto late = a.batch(7, 2);   // items 14, 15: epoch 1, positions 4, 5
  CHECK(late[0].epoch == 1);
  CHECK(b.batch(7, 2)[0].index == late[0].index);  // fresh sampler, same answer
  bool differs = false;
  for (int64_t s = 0; s < 5; ++s) differs |= other.batch(s, 2)[0].index != a.batch(s, 2)[0].index;
  CHECK(differs);
  auto whole = a.batch(3, 4);
  auto r0 = a.batch(3, 4, 0, 2), r1 = a.batch(3, 4, 1, 2);
  CHECK(r0[0].index == whole[0].index);
  CHECK(r1[1].index == whole[3].index);
}

TEST_CASE("prefetch loader yields steps in order for any worker count and rethrows errors", "[data]") {
  for (int workers : {1, 3}) {
    PrefetchLoader<int64_t> loader([](int64_t s) { return s * s; }, 2, 9, workers, 2);
    for (int64_t s = 2; s < 9; ++s) CHECK(loader.next() == s * s);
  }
  PrefetchLoader<int64_t> failing([](int64_t s) -> int64_t {
    if (s == 1) throw DataError("bad batch");
    return s;
  }, 0, 3, 2, 2);
  CHECK(failing.next() == 0);
  CHECK_THROWS_WITH(failing.next(), "bad batch");
}

TEST_CASE("image pipeline: centre crop, CLIP normalisation, deterministic random resized crop", "[data][image]") {
  TempDir d("img");
  // 40x20 image: left half red, right half blue. Centre crop to 10 keeps the middle 20x20 (both colours).
  cv::Mat bgr(20, 40, CV_8UC3, cv::Scalar(255, 0, 0));
  bgr(cv::Rect(0, 0, 20, 20)).setTo(cv::Scalar(0, 0, 255));
  cv::imwrite(d.file("half.png"), bgr);
  cv::Mat rgb = load_image_rgb(d.file("half.png"));
  CHECK(rgb.at<cv::Vec3b>(0, 0)[0] == 255);  // RGB order: red channel first
  cv::Mat crop = resize_center_crop(rgb, 10);
  CHECK(crop.cols == 10);
  CHECK(crop.at<cv::Vec3b>(5, 1)[0] == 255);  // left part of the crop is red
  CHECK(crop.at<cv::Vec3b>(5, 8)[2] == 255);  // right part is blue
  auto t = to_clip_tensor(crop);
  CHECK(t.sizes() == torch::IntArrayRef({3, 10, 10}));
  // red pixel, channel 0: (1 - 0.48145466) / 0.26862954 = 1.930336
  CHECK(t[0][5][1].item<double>() == Approx(1.930336).epsilon(1e-5));
  // green channel 0 everywhere: (0 - 0.4578275) / 0.26130258 = -1.752099
  CHECK(t[1][5][1].item<double>() == Approx(-1.752099).epsilon(1e-5));

  cv::Rect r1, r2, r3;
  random_resized_crop(rgb, 10, 0.2, 0.5, 0.75, 1.333, 42, &r1);
  random_resized_crop(rgb, 10, 0.2, 0.5, 0.75, 1.333, 42, &r2);
  random_resized_crop(rgb, 10, 0.2, 0.5, 0.75, 1.333, 43, &r3);
  CHECK(r1 == r2);
  CHECK_FALSE(r1 == r3);
  const double frac = static_cast<double>(r1.area()) / (40 * 20);
  CHECK(frac >= 0.17);  // area bounds hold up to rounding
  CHECK(frac <= 0.55);

  write_file(d.file("fake.png"), "definitely not a png");
  CHECK_THAT(data_error([&] { load_image_rgb(d.file("fake.png")); }), Catch::Contains("not a decodable image"));
  write_file(d.file("empty.png"), "");
  CHECK_THAT(data_error([&] { load_image_rgb(d.file("empty.png")); }), Catch::Contains("empty file"));
}

TEST_CASE("caption dataset: bad records fail with their location, or are skipped and counted", "[data]") {
  TempDir d("caps");
  write_png(d.file("img/a.png"), {255, 0, 0});
  write_file(d.file("m.jsonl"),
             "{\"id\": \"ok\", \"image\": \"img/a.png\", \"caption\": \"a red square\"}\n"
             "{\"id\": \"noimg\", \"image\": \"img/missing.png\", \"caption\": \"x\"}\n"
             "{\"id\": \"nocap\", \"image\": \"img/a.png\"}\n");
  std::string lines;
  for (int i = 0; i < 50; ++i) lines += "{\"caption\": \"a red square\"}\n";
  write_file(d.file("tok.jsonl"), lines);
  trialign::test::train_test_tokenizer(d.file("tok.jsonl"), d.file("tok"), 20);
  auto tok = Tokenizer::load(d.file("tok.model"));
  DataConfig cfg;
  cfg.image_size = 8;
  const std::string msg = data_error([&] { CaptionDataset(d.file("m.jsonl"), cfg, tok, true); });
  CHECK_THAT(msg, Catch::Contains("2 bad records"));
  CHECK_THAT(msg, Catch::Contains(d.file("m.jsonl") + ":2 (id noimg): image '"));
  CHECK_THAT(msg, Catch::Contains(d.file("m.jsonl") + ":3 (id nocap): missing field 'caption'"));
  cfg.on_bad_record = "skip";
  CaptionDataset ds(d.file("m.jsonl"), cfg, tok, true);
  CHECK(ds.size() == 1);
  CHECK(ds.skipped() == 2);
  auto b = ds.collate({{0, 0}, {1, 0}}, 0);
  CHECK(b.pixels.sizes() == torch::IntArrayRef({2, 3, 8, 8}));
  CHECK(b.lengths[0].item<int64_t>() == static_cast<int64_t>(tok.encode("a red square").size()) + 2);
  CHECK(torch::equal(b.pixels[0], b.pixels[1]));  // no augmentation configured
}

TEST_CASE("caption dataset: hard negatives are read, validated, and k of them drawn per row", "[data][negatives]") {
  TempDir d("negs");
  write_png(d.file("img/a.png"), {255, 0, 0});
  write_file(d.file("m.jsonl"),
             "{\"id\": \"three\", \"image\": \"img/a.png\", \"caption\": \"a red square\", \"negatives\": "
             "[\"a blue square\", {\"caption\": \"a red circle\", \"kind\": \"shape\"}, {\"caption\": \"a green square\"}]}\n"
             "{\"id\": \"none\", \"image\": \"img/a.png\", \"caption\": \"a red circle\"}\n"
             "{\"id\": \"badtype\", \"image\": \"img/a.png\", \"caption\": \"x\", \"negatives\": [3]}\n"
             "{\"id\": \"same\", \"image\": \"img/a.png\", \"caption\": \"a red square\", \"negatives\": [\"a red square\"]}\n");
  std::string lines;
  for (int i = 0; i < 50; ++i) lines += "{\"caption\": \"a red square blue circle green\"}\n";
  write_file(d.file("tok.jsonl"), lines);
  trialign::test::train_test_tokenizer(d.file("tok.jsonl"), d.file("tok"), 24);
  auto tok = Tokenizer::load(d.file("tok.model"));
  DataConfig cfg;
  cfg.image_size = 8;
  const std::string msg = data_error([&] { CaptionDataset(d.file("m.jsonl"), cfg, tok, true); });
  CHECK_THAT(msg, Catch::Contains(":3 (id badtype): negatives[0] must be a caption or {\"caption\": ..., \"kind\": ...}"));
  CHECK_THAT(msg, Catch::Contains(":4 (id same): negatives[0] is empty or equals the caption"));
  cfg.on_bad_record = "skip";
  {
    CaptionDataset ds(d.file("m.jsonl"), cfg, tok, true);
    REQUIRE(ds.size() == 2);
    REQUIRE(ds.negatives(0).size() == 3);
    CHECK(ds.negatives(0)[0].kind.empty());
    CHECK(ds.negatives(0)[1].kind == "shape");
    CHECK(ds.negatives(1).empty());
    CHECK_FALSE(ds.collate({{0, 0}}, 0).neg_ids.defined());  // data.hard_negatives 0: none in batches
  }
  cfg.hard_negatives = 2;
  CaptionDataset ds(d.file("m.jsonl"), cfg, tok, true);
  auto b = ds.collate({{0, 0}, {0, 1}, {0, 0}}, 7);
  CHECK(b.neg_counts == std::vector<int64_t>{2, 0, 2});  // a row gives what it has, up to k
  REQUIRE(b.neg_ids.size(0) == 4);
  CHECK(b.neg_rows(1, 3) == std::make_pair<int64_t, int64_t>(2, 2));
  // The two drawn for a row are distinct negatives of that row, and the draw is a pure
  // function of (seed, epoch, index): the same row in the same batch gets the same pair.
  CHECK_FALSE(torch::equal(b.neg_ids[0], b.neg_ids[1]));
  CHECK(torch::equal(b.neg_ids.slice(0, 0, 2), b.neg_ids.slice(0, 2, 4)));
  std::set<std::string> drawn;
  for (uint64_t seed = 0; seed < 30; ++seed) {
    auto c = ds.collate({{static_cast<int64_t>(seed), 0}}, 1);
    for (int64_t r = 0; r < 2; ++r) {
      const auto n = c.neg_lengths[r].item<int64_t>();
      std::vector<int> ids;
      for (int64_t t = 1; t + 1 < n; ++t) ids.push_back(static_cast<int>(c.neg_ids[r][t].item<int64_t>()));
      drawn.insert(tok.decode(ids));
    }
  }
  CHECK(drawn == std::set<std::string>{"a blue square", "a red circle", "a green square"});  // all three get drawn
}
