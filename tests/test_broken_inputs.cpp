// The corpus of broken inputs under tests/broken/: one manifest per kind of bad record, images
// that are missing, empty, not images or corrupt behind a valid header, and one config per kind
// of config mistake. Each is run through the command line and must give its own message (naming
// the file:line, record id or dotted key) and exit code 2, never a crash.
#include <catch2/catch.hpp>
#include <opencv2/imgcodecs.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/checkpoint.h"
#include "core/errors.h"
#include "data/image.h"
#include "data/tokenizer.h"
#include "test_helpers.h"
#include "tools/data_check.h"

namespace fs = std::filesystem;
using namespace trialign;

namespace {

// tests/broken copied into a temporary folder with a tokenizer trained on its good records.
struct Broken {
  test::TempDir dir{"broken"};
  Broken() {
    fs::copy(test::source_dir() + "/tests/broken", dir.path, fs::copy_options::recursive);
    TokenizerTrainOptions o;
    o.manifests = {dir.file("manifests/good.jsonl"), dir.file("manifests/pref_good.jsonl")};
    o.fields = {"conversations", "prompt", "chosen", "rejected"};
    o.out_prefix = dir.file("tok");
    o.vocab_size = 40;
    train_tokenizer(o);
  }
  // Runs trialign in the corpus folder; returns the exit code and the output in `out`.
  int run(const std::string& args, std::string* out) const {
    return test::run_command("cd " + dir.path.string() + " && " + TRIALIGN_BINARY + " " + args, out);
  }
};

struct Case {
  std::string input;                  // what is broken
  std::string args;                   // the command line
  std::vector<std::string> messages;  // what the output must contain
};

void check_case(const Broken& b, const Case& c) {
  std::string out;
  const int code = b.run(c.args, &out);
  INFO(c.input << ": trialign " << c.args << "\n" << out);
  CHECK(code == 2);
  for (const auto& m : c.messages) CHECK_THAT(out, Catch::Contains(m));
  CHECK_THAT(out, !Catch::Contains("terminate called") && !Catch::Contains("Segmentation") &&
                      !Catch::Contains("Aborted"));
}

}  // namespace

TEST_CASE("broken records and images: data check names each one with its location and kind, exit 2",
          "[broken][cli]") {
  Broken b;
  const std::string check = "data check configs/base.yaml --set data.train=manifests/";
  const std::vector<Case> cases = {
      {"malformed JSON", check + "malformed_json.jsonl", {"[malformed_json]", "manifests/malformed_json.jsonl:2: malformed JSON line"}},
      {"invalid UTF-8", check + "invalid_utf8.jsonl", {"[invalid_utf8]", "manifests/invalid_utf8.jsonl:2", "UTF-8"}},
      {"missing field", check + "missing_field.jsonl", {"[missing_field]", "missing_field.jsonl:2 (id no-conv): missing field 'conversations'"}},
      {"wrong type", check + "wrong_type.jsonl", {"[empty_conversation]", "(id conv-string): 'conversations' must be a non-empty list"}},
      {"image count", check + "image_count.jsonl", {"[image_placeholders]", "(id two-images): 1 <image> placeholder but 2 images"}},
      {"empty conversation", check + "empty_conversation.jsonl", {"[empty_conversation]", "(id empty)"}},
      {"empty response", check + "empty_response.jsonl", {"[empty_text]", "(id empty-reply)", "empty assistant reply"}},
      {"unknown role", check + "unknown_role.jsonl", {"[unknown_role]", "(id robot)", "unknown role 'robot'"}},
      {"too long", check + "too_long.jsonl", {"[too_long]", "(id long)", "exceed data.max_seq_len 96"}},
      {"missing image", check + "missing_image.jsonl", {"[missing_image]", "(id no-file)", "images/nope.png' does not exist"}},
      {"zero-size image", check + "zero_size_image.jsonl", {"[bad_image]", "(id zero-bytes)", "images/zero.png"}},
      {"not an image", check + "non_image.jsonl", {"[bad_image]", "(id text-file)", "images/not_image.png"}},
      {"corrupt image body", check + "corrupt_image.jsonl", {"[bad_image]", "(id corrupt-body)", "images/corrupt.png"}},
      {"missing manifest", check + "nope.jsonl", {"[missing_file]", "cannot open manifest 'manifests/nope.jsonl'"}},
      {"chosen == rejected",
       "data check configs/base.yaml --set trainer=preference --set data.train=manifests/chosen_equals_rejected.jsonl",
       {"[chosen_equals_rejected]", "(id same): 'chosen' and 'rejected' are the same reply"}},
  };
  for (const auto& c : cases) check_case(b, c);

  SECTION("a PNG cut short: named as truncated, and libpng prints nothing of its own") {
    std::ifstream in(b.dir.file("images/ok.png"), std::ios::binary);
    const std::string png((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    test::write_file(b.dir.file("images/cut.png"), png.substr(0, png.size() / 2));
    test::write_file(b.dir.file("manifests/cut.jsonl"),
                     R"({"id": "cut-short", "image": "images/cut.png", "conversations": [{"from": "human", "value": )"
                     R"("<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "Red."}]})"
                     "\n");
    std::string out;
    CHECK(b.run(check + "cut.jsonl", &out) == 2);
    CHECK_THAT(out, Catch::Contains("[bad_image] manifests/cut.jsonl:1 (id cut-short): image "));
    CHECK_THAT(out, Catch::Contains("images/cut.png' is a truncated PNG (it ends before its IEND chunk)"));
    CHECK_THAT(out, !Catch::Contains("libpng"));
  }
  SECTION("a PNG declaring a huge image is refused before decoding; a folder as the image is named as one") {
    std::ifstream in(b.dir.file("images/ok.png"), std::ios::binary);
    std::string png((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    REQUIRE(png.substr(12, 4) == "IHDR");
    const std::string side("\x00\x00\x75\x30", 4);  // 30000, big-endian
    png.replace(16, 4, side);
    png.replace(20, 4, side);
    test::write_file(b.dir.file("images/huge.png"), png);
    fs::create_directories(b.dir.file("images/folder.png"));
    auto record = [](const std::string& id, const std::string& image) {
      return R"({"id": ")" + id + R"(", "image": ")" + image +
             R"(", "conversations": [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, )"
             R"({"from": "gpt", "value": "Red."}]})"
             "\n";
    };
    test::write_file(b.dir.file("manifests/odd_images.jsonl"),
                     record("bomb", "images/huge.png") + record("dir", "images/folder.png"));
    std::string out;
    CHECK(b.run(check + "odd_images.jsonl", &out) == 2);
    CHECK_THAT(out, Catch::Contains("[bad_image] manifests/odd_images.jsonl:1 (id bomb): image ") &&
                        Catch::Contains("images/huge.png' is 30000 x 30000 pixels") &&
                        Catch::Contains("takes 2575 MB per read: downscale it (the limit is 128 Mi pixels)"));
    CHECK_THAT(out, Catch::Contains("[bad_image] manifests/odd_images.jsonl:2 (id dir): image ") &&
                        Catch::Contains("images/folder.png' is a folder, not an image file"));
  }
  SECTION("a JPEG or WebP declaring a huge image is refused before decoding, the same image at its size decodes") {
    const cv::Mat small(16, 24, CV_8UC3, cv::Scalar(0, 0, 255));
    auto encoded = [&](const std::string& ext) {
      std::vector<uchar> buf;
      REQUIRE(cv::imencode(ext, small, buf));
      return std::string(buf.begin(), buf.end());
    };
    std::string jpg = encoded(".jpg"), webp_lossless = encoded(".webp");
    std::vector<uchar> lossy_buf;
    REQUIRE(cv::imencode(".webp", small, lossy_buf, {cv::IMWRITE_WEBP_QUALITY, 90}));
    std::string webp(lossy_buf.begin(), lossy_buf.end());
    test::write_file(b.dir.file("images/small.jpg"), jpg);
    test::write_file(b.dir.file("images/small.webp"), webp);
    test::write_file(b.dir.file("images/small_lossless.webp"), webp_lossless);
    for (const char* name : {"images/small.jpg", "images/small.webp", "images/small_lossless.webp"})
      CHECK(load_image_rgb(b.dir.file(name)).size() == cv::Size(24, 16));
    // JPEG: the baseline frame header (FF C0), height then width, 16-bit big-endian.
    const size_t sof = jpg.find("\xFF\xC0");
    REQUIRE(sof != std::string::npos);
    REQUIRE(static_cast<unsigned char>(jpg[sof + 5]) * 256 + static_cast<unsigned char>(jpg[sof + 6]) == 16);
    jpg.replace(sof + 5, 4, std::string("\x75\x30\x75\x30", 4));  // 30000 x 30000
    test::write_file(b.dir.file("images/huge.jpg"), jpg);
    // The same after a junk byte before the frame header, which libjpeg skips with a warning.
    test::write_file(b.dir.file("images/huge_junk.jpg"), jpg.substr(0, sof) + "j" + jpg.substr(sof));
    // WebP, lossy: 14-bit little-endian width and height at bytes 26 and 28.
    REQUIRE(webp.substr(12, 4) == "VP8 ");
    REQUIRE(static_cast<unsigned char>(webp[26]) == 24);
    webp.replace(26, 4, std::string("\xFF\x3F\xFF\x3F", 4));  // 16383 x 16383
    test::write_file(b.dir.file("images/huge.webp"), webp);
    // WebP, lossless: width - 1 and height - 1 in the low 28 bits of the little-endian word at 21.
    REQUIRE(webp_lossless.substr(12, 4) == "VP8L");
    REQUIRE((static_cast<unsigned char>(webp_lossless[21]) | (static_cast<unsigned char>(webp_lossless[22]) & 0x3F) << 8) == 23);
    webp_lossless[21] = '\xFF', webp_lossless[22] = '\xFF', webp_lossless[23] = '\xFF';
    webp_lossless[24] = static_cast<char>((static_cast<unsigned char>(webp_lossless[24]) & 0xF0) | 0x0F);  // 16384 x 16384
    test::write_file(b.dir.file("images/huge_lossless.webp"), webp_lossless);
    for (const char* name : {"images/huge.jpg", "images/huge_junk.jpg"})
      CHECK_THAT(test::message_of<DataError>([&] { load_image_rgb(b.dir.file(name)); }),
                 Catch::Contains(std::string(name) + "' is 30000 x 30000 pixels") &&
                     Catch::Contains("takes 2575 MB per read: downscale it (the limit is 128 Mi pixels)"));
    CHECK_THAT(test::message_of<DataError>([&] { load_image_rgb(b.dir.file("images/huge.webp")); }),
               Catch::Contains("images/huge.webp' is 16383 x 16383 pixels") && Catch::Contains("768 MB per read"));
    CHECK_THAT(test::message_of<DataError>([&] { load_image_rgb(b.dir.file("images/huge_lossless.webp")); }),
               Catch::Contains("images/huge_lossless.webp' is 16384 x 16384 pixels") && Catch::Contains("768 MB per read"));
  }
  SECTION("preference pairs the model cannot tell apart: same ids after tokenizing, or a whitespace-only reply") {
    test::write_file(b.dir.file("manifests/pref_tokens.jsonl"),
                     R"({"id": "p0", "image": "images/ok.png", "prompt": "<image>\nDescribe the picture.", )"
                     R"("chosen": "A red circle.", "rejected": "A blue square."})"
                     "\n"
                     R"({"id": "spaces", "image": "images/ok.png", "prompt": "<image>\nDescribe the picture.", )"
                     R"("chosen": "A red circle.", "rejected": "A red circle. "})"
                     "\n"
                     R"({"id": "blank", "image": "images/ok.png", "prompt": "<image>\nDescribe the picture.", )"
                     R"("chosen": "  ", "rejected": "A red circle."})"
                     "\n");
    std::string out;
    CHECK(b.run("data check configs/base.yaml --set trainer=preference --set data.train=manifests/pref_tokens.jsonl",
                &out) == 2);
    CHECK_THAT(out, Catch::Contains("[chosen_equals_rejected] manifests/pref_tokens.jsonl:2 (id spaces): 'chosen' and "
                                    "'rejected' are the same reply once tokenized"));
    CHECK_THAT(out, Catch::Contains("[empty_text] manifests/pref_tokens.jsonl:3 (id blank): empty 'chosen' (only "
                                    "whitespace)"));
  }
  SECTION("--json reports a record that is not UTF-8 (its bytes written as U+FFFD), not a JSON library error") {
    std::string out;
    CHECK(b.run(check + "invalid_utf8.jsonl --json", &out) == 2);
    INFO(out);
    const auto j = nlohmann::json::parse(out);
    CHECK(j["counts"]["invalid_utf8"] == 1);
    CHECK_THAT(out, !Catch::Contains("type_error.316"));
  }
  SECTION("the good manifest passes, every image decoded") {
    std::string out;
    CHECK(b.run("data check configs/base.yaml", &out) == 0);
    CHECK_THAT(out, Catch::Contains("no problems found (every image decoded)"));
    CHECK_THAT(out, !Catch::Contains("unknown to the tokenizer"));
    CHECK(b.run("data check configs/base.yaml --json", &out) == 0);
    const auto j = nlohmann::json::parse(out);
    CHECK(j["manifests"][0]["unknown_tokens"] == 0);
    CHECK(j["manifests"][0]["tokens"] > 0);
  }
  SECTION("text the tokenizer does not cover: a note with the count, not a problem") {
    std::string good = read_text_file(b.dir.file("manifests/good.jsonl"));
    const auto at = good.find("Red.");
    good.replace(at, 4, "\u2603 \u2603.");  // two snowmen in good-0's reply, each alone between spaces
    test::write_file(b.dir.file("manifests/snow.jsonl"), good);
    std::string out;
    CHECK(b.run("data check configs/base.yaml --set data.train=manifests/snow.jsonl --json", &out) == 0);
    const auto j = nlohmann::json::parse(out);
    CHECK(j["manifests"][0]["unknown_tokens"] == 2);
    REQUIRE(j["notes"].size() == 1);
    CHECK_THAT(j["notes"][0].get<std::string>(), Catch::StartsWith("data.train: 2 of ") &&
                                                     Catch::Contains("are unknown to the tokenizer tok.model"));
    CHECK(b.run("data check configs/base.yaml --set data.train=manifests/snow.jsonl", &out) == 0);
    CHECK_THAT(out, Catch::Contains("note: data.train: 2 of ") && Catch::Contains("no problems found"));
  }
  SECTION("every problem of a set at once, counted by kind; skip policies turn the exit code to 0") {
    std::string out;
    CHECK(b.run("data check configs/base.yaml --set data.train=manifests/missing_image.jsonl --set "
                "data.val=manifests/empty_response.jsonl --json",
                &out) == 2);
    const auto j = nlohmann::json::parse(out);
    CHECK(j["counts"]["missing_image"] == 1);
    CHECK(j["counts"]["empty_text"] == 1);
    CHECK(j["would_fail"] == true);
    CHECK(b.run("data check configs/base.yaml --set data.train=manifests/corrupt_image.jsonl --set "
                "train.on_bad_batch=skip",
                &out) == 0);
    CHECK_THAT(out, Catch::Contains("[bad_image, skipped by the config]"));
  }
}

TEST_CASE("broken data references found once the data loads: one clear message, exit 2", "[broken][cli]") {
  Broken b;
  const std::vector<Case> cases = {
      {"missing manifest", "train configs/missing_manifest.yaml",
       {"1 problem(s) before training (relative paths are read from the working directory",
        "data.train: 'manifests/nope.jsonl' does not exist; point it at a JSON or JSONL manifest"}},
      {"missing init_from checkpoint", "train configs/missing_checkpoint.yaml", {"init_from", "runs/none"}},
      {"stage 2 with nothing frozen", "train configs/adapter_unfrozen.yaml",
       {"trainer adapter trains the projector alone, but no rule freezes vision_model"}},
      // A glob the config-level check cannot decide: the trainer's own check sees the names.
      {"stage 2 with a glob leaving the language model trainable",
       "train configs/adapter_unfrozen.yaml --set 'optim.param_groups=[{match: \"vision_model.*\", freeze: true}]'",
       {"trainer adapter trains the projector alone, but 'model.embed_tokens.weight' is trainable",
        "freeze vision_model and language_model"}},
  };
  for (const auto& c : cases) check_case(b, c);
}

TEST_CASE("config check finds what train would refuse, every problem at once, without training", "[broken][cli]") {
  Broken b;
  const std::vector<Case> cases = {
      {"missing manifest", "config check configs/missing_manifest.yaml", {"data.train: 'manifests/nope.jsonl' does not exist"}},
      {"missing init_from checkpoint", "config check configs/missing_checkpoint.yaml",
       {"init_from[0].checkpoint: 'runs/none' does not exist; run the stage that writes it first"}},
      {"stage 2 with nothing frozen", "config check configs/adapter_unfrozen.yaml",
       {"2 problem(s)", "no rule freezes vision_model; add {match: vision_model, freeze: true}", "no rule freezes language_model"}},
      {"stage 2 with a rule naming the tower without freezing it",
       "config check configs/adapter_unfrozen.yaml --set 'optim.param_groups=[{match: vision_model, lr: 0.1}, {match: "
       "language_model, freeze: true}]'",
       {"1 problem(s)", "optim.param_groups[0]: trainer adapter trains the projector alone, but this rule names "
                        "vision_model without freezing it; set freeze: true there"}},
      {"two missing files, relative",
       "config check configs/base.yaml --set data.val=gone.jsonl --set data.tokenizer=gone.model",
       {"2 problem(s) before training (relative paths are read from the working directory ",
        "data.val: 'gone.jsonl' does not exist", "data.tokenizer: 'gone.model' does not exist"}},
      {"an eval set that is a folder", "config check configs/base.yaml --set 'eval.sets=[{name: a, data: manifests}]'",
       {"1 problem(s)", "eval.sets[0].data: 'manifests' is a folder"}},
      {"an eval set without data", "config check configs/base.yaml --set 'eval.sets=[{name: a}]'",
       {"eval.sets[0].data: missing: the manifest to evaluate on"}},
      {"a pair loss with eval.samples", "config check configs/base.yaml --set trainer=preference --set eval.samples=2",
       {"eval.samples: loss 'dpo' scores given pairs and draws no completions"}},
      // Keys only the preference trainer reads, in a stage-3 config: refused before a run (a
      // checkpoint whose config carries them still loads for eval and export).
      {"preference-only keys elsewhere",
       "config check configs/base.yaml --set 'rewards=[{type: no_such_reward}]' --set preference.cache_reference=true "
       "--set eval.samples=4",
       {"3 problem(s)", "rewards: read by the preference trainer only (trainer: preference); this config runs the "
                        "finetune trainer, so remove it",
        "preference.cache_reference: read by the preference trainer only", "eval.samples: read by the preference "
                                                                           "trainer only"}},
  };
  for (const auto& c : cases) check_case(b, c);

  // A stage-1 checkpoint holds no language model: named with what it does hold.
  fs::create_directories(b.dir.file("stage1ck"));
  test::write_file(b.dir.file("stage1ck/MANIFEST.json"), R"({"trainer": "contrastive", "files": {}})");
  check_case(b, {"component the checkpoint lacks",
                 "config check configs/base.yaml --set 'init_from=[{checkpoint: stage1ck, components: [language_model]}]'",
                 {"init_from[0].components: stage1ck (trainer contrastive) has no language_model; it holds vision_model, "
                  "text_model"}});

  std::string out;
  CHECK(b.run("config check configs/base.yaml", &out) == 0);
  CHECK_THAT(out, Catch::Contains("trainer: finetune"));
  // The resolved config comes first, then the problems: both shown.
  CHECK(b.run("config check configs/missing_manifest.yaml", &out) == 2);
  CHECK(out.find("trainer: finetune") < out.find("data.train: 'manifests/nope.jsonl' does not exist"));
  // Files the trainer does not read are not required: data.val beside eval.sets (stages 2-3 then
  // evaluate the sets), eval.sets under stage 1 (which evaluates data.val).
  CHECK(b.run("config check configs/base.yaml --set data.val=gone.jsonl --set 'eval.sets=[{name: a, data: "
              "manifests/good.jsonl}]'",
              &out) == 0);
  CHECK(b.run("config check configs/base.yaml --set trainer=contrastive --set 'eval.sets=[{name: a, data: gone.jsonl}]'",
              &out) == 0);
  // Under torchrun every rank finds the same problems: ranks other than 0 give one line.
  ::setenv("RANK", "1", 1);
  const int code = b.run("config check configs/missing_manifest.yaml", &out);
  ::unsetenv("RANK");
  CHECK(code == 2);
  CHECK_THAT(out, Catch::Contains("error: rank 1: configs/missing_manifest.yaml: 1 problem(s) before training") &&
                      Catch::Contains("(rank 0 lists every problem)"));
  CHECK_THAT(out, !Catch::Contains("does not exist"));
  // With --nproc the launcher checks once, before any rank starts: one message, not one per rank.
  CHECK(b.run("train configs/missing_manifest.yaml --nproc 2", &out) == 2);
  const std::string once = "problem(s) before training";
  CHECK(out.find(once) != std::string::npos);
  CHECK(out.find(once) == out.rfind(once));
  CHECK_THAT(out, !Catch::Contains("rank 0 exited"));
  // A fresh run checks init_from before its run folder is made (a resume would not read it).
  CHECK(b.run("train configs/missing_checkpoint.yaml", &out) == 2);
  CHECK_THAT(out, Catch::Contains("init_from[0].checkpoint: 'runs/none' does not exist"));
  CHECK_FALSE(fs::exists(b.dir.file("runs/base")));
  // A rule the check cannot decide without parameter names (a glob) is left to train's own check.
  CHECK(b.run("config check configs/adapter_unfrozen.yaml --set 'optim.param_groups=[{match: \"*_model*\", freeze: "
              "true}]'",
              &out) == 0);
}
