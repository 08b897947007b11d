// LLaVA conversations: record validation, the chat template's ids and assistant-only labels,
// and the VLM's image-token expansion with -100 labels, on constructed inputs.
#include <catch2/catch.hpp>

#include <algorithm>

#include "core/errors.h"
#include "data/conversation.h"
#include "models/vlm_inputs.h"
#include "test_helpers.h"

using namespace trialign;
using trialign::test::TempDir;
using trialign::test::write_file;

namespace {

ManifestRecord record(const std::string& json) { return {nlohmann::json::parse(json), "conv.jsonl:7", "r7"}; }

// A tokenizer trained on the words used below.
struct Tok {
  TempDir dir{"conv"};
  Tokenizer tok;
  Tok() {
    std::string lines;
    for (int i = 0; i < 100; ++i)
      lines += R"({"caption": "USER: what colour is the star? ASSISTANT: red blue green a small star left of circle"})" "\n";
    write_file(dir.file("m.jsonl"), lines);
    trialign::test::train_test_tokenizer(dir.file("m.jsonl"), dir.file("tok"), 40);
    tok = Tokenizer::load(dir.file("tok.model"));
  }
  std::vector<int64_t> enc(const std::string& s) const {
    std::vector<int64_t> out;
    for (int id : tok.encode(s)) out.push_back(id);
    return out;
  }
};

}  // namespace

TEST_CASE("LLaVA records are validated with their location", "[conversation]") {
  auto c = parse_llava_record(record(
      R"({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour is the star?"}, {"from": "gpt", "value": "red"}]})"));
  REQUIRE(c.turns.size() == 2);
  CHECK(c.turns[0].role == "user");
  CHECK(c.turns[1].role == "assistant");
  CHECK(c.images == std::vector<std::string>{"a.png"});
  auto err = [](const std::string& j) { return trialign::test::message_of<DataError>([&] { parse_llava_record(record(j)); }); };
  CHECK(err(R"({"conversations": [{"from": "robot", "value": "x"}]})") ==
        "conv.jsonl:7 (id r7): conversations[0]: unknown role 'robot' (use human, gpt or system)");
  CHECK(err(R"({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]})") ==
        "conv.jsonl:7 (id r7): 0 <image> placeholders but 1 image");
  CHECK(err(R"({"conversations": [{"from": "human", "value": "hi"}]})") ==
        "conv.jsonl:7 (id r7): no assistant ('gpt') turn: nothing to learn from");
  CHECK(err(R"({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]})") ==
        "conv.jsonl:7 (id r7): conversations[1]: empty assistant reply");
  CHECK(err(R"({"conversations": []})") == "conv.jsonl:7 (id r7): 'conversations' must be a non-empty list of turns");
}

TEST_CASE("chat template: ids in order, loss only on the assistant reply and its eos", "[conversation]") {
  Tok t;
  auto c = parse_llava_record(record(
      R"({"image": "a.png", "conversations": [{"from": "human", "value": "<image>what colour is the star?"}, {"from": "gpt", "value": "red"}]})"));
  auto tc = tokenize_conversation(c, t.tok);
  // [bos] "USER: " <image> "what colour is the star?\n" "ASSISTANT: " "red" [eos]
  std::vector<int64_t> want = {t.tok.bos_id()};
  auto add = [&](const std::vector<int64_t>& v) { want.insert(want.end(), v.begin(), v.end()); };
  add(t.enc("USER: "));
  want.push_back(t.tok.image_id());
  add(t.enc("what colour is the star?\n"));
  add(t.enc("ASSISTANT: "));
  const size_t reply_start = want.size();
  add(t.enc("red"));
  want.push_back(t.tok.eos_id());
  CHECK(tc.ids == want);
  CHECK(tc.num_images == 1);
  for (size_t i = 0; i < want.size(); ++i) {
    INFO("position " << i);
    CHECK(tc.labels[i] == (i >= reply_start ? want[i] : kIgnoreIndex));
  }
  CHECK(tc.expanded_length(64) == static_cast<int64_t>(want.size()) + 63);

  auto plain = tokenize_conversation(c, t.tok, "plain");  // [bos] <image> red [eos]
  std::vector<int64_t> p = {t.tok.bos_id(), t.tok.image_id()};
  for (auto id : t.enc("red")) p.push_back(id);
  p.push_back(t.tok.eos_id());
  CHECK(plain.ids == p);
  CHECK(plain.labels[0] == kIgnoreIndex);
  CHECK(plain.labels[1] == kIgnoreIndex);
  CHECK(plain.labels.back() == t.tok.eos_id());
}

TEST_CASE("image placeholders expand to the projected tokens with -100 labels, and padding is masked", "[conversation][vlm]") {
  const int64_t IMG = 9;
  // Embedding table: id -> [id, 10 * id]; image tokens: distinct constants.
  auto embed = [](const torch::Tensor& ids) { return torch::stack({ids, ids * 10}, 1).to(torch::kFloat32); };
  auto images = torch::tensor({{{-1.f, -1.f}, {-2.f, -2.f}, {-3.f, -3.f}}, {{-4.f, -4.f}, {-5.f, -5.f}, {-6.f, -6.f}}});  // [2, 3, 2]
  // Sample 0 starts with its image; sample 1 has its image mid-text; sample 2 is text only.
  std::vector<std::vector<int64_t>> ids = {{1, IMG, 5, 6, 2}, {1, 4, IMG, 7}, {1, 3}};
  std::vector<std::vector<int64_t>> labels = {{-100, -100, -100, 6, 2}, {-100, -100, -100, 7}, {-100, 3}};
  auto in = splice_image_tokens(ids, labels, images, IMG, embed);
  CHECK(in.embeds.sizes() == torch::IntArrayRef({3, 7, 2}));  // 5 - 1 + 3 = 7
  // Sample 0: [1, img0 x3, 5, 6, 2]
  CHECK(in.embeds[0][0][1].item<float>() == 10.f);
  CHECK(in.embeds[0][1][0].item<float>() == -1.f);
  CHECK(in.embeds[0][3][0].item<float>() == -3.f);
  CHECK(in.embeds[0][4][0].item<float>() == 5.f);
  CHECK(torch::equal(in.labels[0], torch::tensor({-100L, -100L, -100L, -100L, -100L, 6L, 2L})));
  // Sample 1: [1, 4, img1 x3, 7, pad]
  CHECK(in.embeds[1][2][0].item<float>() == -4.f);
  CHECK(in.embeds[1][5][0].item<float>() == 7.f);
  CHECK(torch::equal(in.labels[1], torch::tensor({-100L, -100L, -100L, -100L, -100L, 7L, -100L})));
  CHECK(torch::equal(in.attention_mask[1], torch::tensor({1L, 1L, 1L, 1L, 1L, 1L, 0L})));
  // Sample 2: text only, padded to 7.
  CHECK(torch::equal(in.attention_mask[2], torch::tensor({1L, 1L, 0L, 0L, 0L, 0L, 0L})));
  CHECK(in.embeds[2][1][1].item<float>() == 30.f);
  // Mismatched counts are refused.
  CHECK_THROWS_WITH(splice_image_tokens(ids, labels, images.slice(0, 0, 1), IMG, embed),
                    Catch::Contains("more <image> placeholders than the 1 images given"));
}

TEST_CASE("independent turns: every exchange is the single-turn record after one shared prefix", "[conversation]") {
  Tok t;
  auto c = parse_llava_record(record(
      R"({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour is the star?"},)"
      R"({"from": "gpt", "value": "red"}, {"from": "human", "value": "what colour is the circle?"},)"
      R"({"from": "gpt", "value": "blue"}, {"from": "human", "value": "what is left of circle?"}, {"from": "gpt", "value": "a small star"}]})"));
  auto packed = tokenize_independent_turns(c, t.tok, "conv.jsonl:7 (id r7)");
  // Each question asked alone: [bos] "USER: " <image> "\n{q}\n" "ASSISTANT: " {a} [eos]
  auto alone = [&](const std::string& q, const std::string& a) {
    Conversation one{{"a.png"}, {{"user", "<image>\n" + q}, {"assistant", a}}};
    return tokenize_conversation(one, t.tok);
  };
  const auto s1 = alone("what colour is the star?", "red"), s2 = alone("what colour is the circle?", "blue"),
             s3 = alone("what is left of circle?", "a small star");
  const size_t prefix = 1 + t.enc("USER: ").size() + 1;  // bos, "USER: ", the image placeholder
  REQUIRE(s1.ids[prefix - 1] == t.tok.image_id());
  std::vector<int64_t> ids = s1.ids, labels = s1.labels, segments(prefix, 0);
  segments.resize(s1.ids.size(), 1);
  int64_t k = 2;
  for (const auto* s : {&s2, &s3}) {
    ids.insert(ids.end(), s->ids.begin() + static_cast<std::ptrdiff_t>(prefix), s->ids.end());
    labels.insert(labels.end(), s->labels.begin() + static_cast<std::ptrdiff_t>(prefix), s->labels.end());
    segments.resize(ids.size(), k++);
  }
  CHECK(packed.ids == ids);
  CHECK(packed.labels == labels);
  CHECK(packed.segments == segments);
  CHECK(packed.num_images == 1);
  // Segment 2 starts with the "\n" + question piece, unlabelled: no loss crosses a boundary.
  const size_t start2 = s1.ids.size();
  CHECK(packed.segments[start2] == 2);
  CHECK(packed.labels[start2] == kIgnoreIndex);
  const auto q2 = t.enc("\nwhat colour is the circle?\n");
  CHECK(std::vector<int64_t>(packed.ids.begin() + static_cast<std::ptrdiff_t>(start2),
                             packed.ids.begin() + static_cast<std::ptrdiff_t>(start2 + q2.size())) == q2);
  // Labelled tokens: the three replies and their eos, as in the three records.
  auto labelled = [](const std::vector<int64_t>& l) { return std::count_if(l.begin(), l.end(), [](int64_t x) { return x != kIgnoreIndex; }); };
  CHECK(labelled(packed.labels) == labelled(s1.labels) + labelled(s2.labels) + labelled(s3.labels));

  // A text-only record shares only [bos]; one exchange stays an ordinary sequence.
  auto text = parse_llava_record(record(
      R"({"conversations": [{"from": "human", "value": "red?"}, {"from": "gpt", "value": "blue"}, {"from": "human", "value": "star?"}, {"from": "gpt", "value": "green"}]})"));
  auto tp = tokenize_independent_turns(text, t.tok, "here");
  CHECK(tp.segments[0] == 0);
  CHECK(tp.segments[1] == 1);
  CHECK(tp.ids[1] == t.enc("USER: ")[0]);
  auto single = parse_llava_record(record(
      R"({"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nred?"}, {"from": "gpt", "value": "blue"}]})"));
  CHECK(tokenize_independent_turns(single, t.tok, "here").segments.empty());
  CHECK(tokenize_independent_turns(single, t.tok, "here").ids == tokenize_conversation(single, t.tok).ids);

  // What cannot be split is named with its record.
  auto late_image = parse_llava_record(record(
      R"({"image": "a.png", "conversations": [{"from": "human", "value": "red?"}, {"from": "gpt", "value": "blue"}, {"from": "human", "value": "<image>\nstar?"}, {"from": "gpt", "value": "green"}]})"));
  CHECK_THROWS_WITH(tokenize_independent_turns(late_image, t.tok, "conv.jsonl:7 (id r7)"),
                    Catch::Contains("conv.jsonl:7 (id r7)") && Catch::Contains("only the first user turn may carry images"));
  auto two_users = parse_llava_record(record(
      R"({"conversations": [{"from": "human", "value": "red?"}, {"from": "human", "value": "star?"}, {"from": "gpt", "value": "green"}]})"));
  CHECK_THROWS_WITH(tokenize_independent_turns(two_users, t.tok, "here"),
                    Catch::Contains("conversations[0]") && Catch::Contains("data.turns: sequential"));
}
