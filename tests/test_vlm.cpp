// Stages 2-3: token loss golden values, freezing, accumulation equivalence, the length check at
// load, caption object scoring, and the pipeline hand-off between stages.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>

#include "core/checkpoint.h"
#include "core/config_tree.h"
#include "core/errors.h"
#include "core/safetensors.h"
#include "data/conversation_dataset.h"
#include "data/shapes_questions.h"
#include "data/shapes_world.h"
#include "eval/caption_objects.h"
#include "eval/pope.h"
#include "losses/cross_entropy.h"
#include "pipeline_fixtures.h"
#include "test_helpers.h"
#include "trainers/pipeline.h"
#include "trainers/vlm.h"

using namespace trialign;
using trialign::test::message_of;
using trialign::test::TempDir;

namespace {

constexpr int64_t kImageId = 4;

// A VLM small enough to step in milliseconds: 16x16 images, 8px patches (4 patches), width 16.
ModelConfig tiny_model() {
  ModelConfig m;
  m.vision.image_size = 16;
  m.vision.patch_size = 8;
  m.vision.hidden_size = 16;
  m.vision.intermediate_size = 32;
  m.vision.num_hidden_layers = 2;
  m.vision.num_attention_heads = 2;
  m.llm.vocab_size = 12;
  m.llm.hidden_size = 16;
  m.llm.intermediate_size = 32;
  m.llm.num_hidden_layers = 2;
  m.llm.num_attention_heads = 2;
  m.llm.max_position_embeddings = 64;
  m.projector.type = "mlp2x_gelu";
  m.projector.options.kind = ConfigNode::Kind::Map;
  return m;
}

// Four samples of different lengths and target counts; samples 0 and 2 carry an image each.
ConversationBatch tiny_batch() {
  ConversationBatch b;
  b.ids = {{2, kImageId, 5, 6, 7, 3}, {2, 8, 9, 3}, {2, kImageId, 10, 11, 5, 6, 7, 3}, {2, 6, 3}};
  b.labels = {{-100, -100, -100, 6, 7, 3}, {-100, -100, 9, 3}, {-100, -100, -100, -100, 5, 6, 7, 3}, {-100, 6, 3}};
  b.images_per_sample = {1, 0, 1, 0};
  b.indices = {0, 1, 2, 3};
  torch::manual_seed(11);
  b.pixels = torch::randn({2, 3, 16, 16});
  return b;
}

std::vector<std::pair<std::string, torch::Tensor>> named_params(VlmModel& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : m->named_parameters(true)) out.emplace_back(p.key(), p.value());
  return out;
}

std::shared_ptr<LmLossImpl> ce() {
  TypedSpec spec{"cross_entropy", {}, "loss"};
  spec.options.kind = ConfigNode::Kind::Map;
  return lm_losses().create_or_throw(spec);
}

}  // namespace

TEST_CASE("token cross-entropy: hand-worked sum over targets divided by the step's target count", "[vlm][losses]") {
  // Row 0: logits [0, 0], target 0 -> -ln 0.5 = 0.693147; row 1: [ln 3, 0], target 0 ->
  // -ln(3/4) = 0.287682. Sum 0.980829; the step has 4 targets in all -> 0.245207.
  auto loss = ce();
  auto logits = torch::tensor({0.0, 0.0, std::log(3.0), 0.0}, torch::kFloat32).reshape({2, 2});
  auto out = loss->forward({logits, torch::tensor({0L, 0L}), 4.0});
  CHECK(out.loss.item<double>() == Approx(0.245207).epsilon(1e-5));
  CHECK(out.metrics.at("acc/token").item<double>() == Approx(0.5));  // both right, 2 of 4 step targets
  // Label smoothing 0.1 on row 1: 0.9 * 0.287682 + 0.1 * mean(-log p) = 0.9 * 0.287682 + 0.1 *
  // (0.287682 + 1.386294) / 2 = 0.342613.
  TypedSpec smooth{"cross_entropy", parse_config_string("label_smoothing: 0.1", "t"), "loss"};
  auto out2 = lm_losses().create_or_throw(smooth)->forward({logits.slice(0, 1, 2), torch::tensor({0L}), 1.0});
  CHECK(out2.loss.item<double>() == Approx(0.342613).epsilon(1e-5));
}

TEST_CASE("visual tokens: spatial merge concatenates 2x2 blocks of the patch grid", "[vlm][projector]") {
  auto f = torch::arange(16, torch::kFloat32).reshape({1, 16, 1});  // 4x4 grid, value = row * 4 + col
  auto merged = merge_patches(f, 2);
  REQUIRE(merged.sizes() == torch::IntArrayRef({1, 4, 4}));
  CHECK(torch::equal(merged[0], torch::tensor({0.f, 1.f, 4.f, 5.f, 2.f, 3.f, 6.f, 7.f, 8.f, 9.f, 12.f, 13.f, 10.f, 11.f,
                                                14.f, 15.f}).reshape({4, 4})));
  CHECK(merged_tokens(64, 2) == 16);
  CHECK_THROWS_AS(merged_tokens(64, 3), ConfigError);
  // A merged projector takes k^2 times wider input and emits k^2 times fewer tokens.
  TypedSpec spec{"mlp2x_gelu", parse_config_string("spatial_merge: 2", "t"), "model.projector"};
  auto proj = projectors().create_or_throw(spec, ProjectorDims{3, 5});
  CHECK(proj->forward(torch::zeros({2, 16, 3})).sizes() == torch::IntArrayRef({2, 4, 5}));
  CHECK(proj->num_tokens(16) == 4);
}

TEST_CASE("visual tokens: the 2-D sine-cosine grid code, and a projector that adds it", "[vlm][projector]") {
  // side 2, dim 6: half 3, one sin/cos pair per half at frequency 10000^0 = 1, channels 2 and 5
  // left 0. Token (r, c) = [sin r, cos r, 0, sin c, cos c, 0].
  auto code = sincos_2d(2, 6, torch::TensorOptions().dtype(torch::kFloat64));
  const double s1 = std::sin(1.0), c1 = std::cos(1.0);
  auto want = torch::tensor({0.0, 1.0, 0.0, 0.0, 1.0, 0.0,     // (0, 0)
                             0.0, 1.0, 0.0, s1, c1, 0.0,       // (0, 1)
                             s1, c1, 0.0, 0.0, 1.0, 0.0,       // (1, 0)
                             s1, c1, 0.0, s1, c1, 0.0},        // (1, 1)
                            torch::kFloat64)
                  .reshape({4, 6});
  CHECK(torch::allclose(code, want, 0, 1e-7));
  // A linear projector with identity weight and zero bias returns features + code.
  TypedSpec spec{"linear", parse_config_string("position_encoding: sincos2d", "t"), "model.projector"};
  auto proj = projectors().create_or_throw(spec, ProjectorDims{6, 6});
  torch::NoGradGuard ng;
  for (auto& p : proj->named_parameters())
    p.key() == "weight" ? p.value().copy_(torch::eye(6)) : p.value().zero_();
  auto f = torch::full({1, 4, 6}, 0.5);
  CHECK(torch::allclose(proj->forward(f)[0], want.to(torch::kFloat32) + 0.5, 0, 1e-6));
  TypedSpec bad{"linear", parse_config_string("position_encoding: learned", "t"), "model.projector"};
  CHECK_THROWS_AS(projectors().create_or_throw(bad, ProjectorDims{6, 6}), ConfigError);
}

TEST_CASE("freezing: frozen weights stay bit-identical and get no optimizer state", "[vlm][freeze]") {
  torch::manual_seed(0);
  VlmModel model(tiny_model());
  OptimConfig oc;
  oc.lr = 1e-2;
  oc.param_groups = {{"vision_model", true, 0}, {"language_model", true, 0}};
  auto before = named_state(*model);
  std::map<std::string, torch::Tensor> saved;
  for (const auto& [n, t] : before) saved[n] = t.clone();
  ParamPlan plan = plan_param_groups(named_params(model), oc);
  for (const auto& [n, p] : plan.trainable) CHECK(component_of(n) == "mm_projector");
  CHECK(plan.frozen.size() + plan.trainable.size() == named_params(model).size());
  torch::optim::AdamW optim(plan.groups);
  auto loss = ce();
  const auto batch = tiny_batch();
  for (int step = 0; step < 3; ++step) {
    optim.zero_grad();
    vlm_step(model, *loss, batch, 1, kImageId, false);
    optim.step();
  }
  int64_t changed = 0;
  for (const auto& [n, t] : named_state(*model)) {
    if (component_of(n) == "mm_projector") changed += !torch::equal(t, saved.at(n));
    else CHECK(torch::equal(t, saved.at(n)));  // bit for bit
  }
  CHECK(changed == static_cast<int64_t>(plan.trainable.size()));
  // Optimizer state exists for exactly the trainable tensors.
  CHECK(optim.state().size() == plan.trainable.size());
  for (const auto& [n, p] : named_params(model))
    if (component_of(n) != "mm_projector")
      CHECK(optim.state().count(c10::guts::to_string(p.unsafeGetTensorImpl())) == 0);
}

TEST_CASE("param_groups: per-module learning rates, and a rule that matches nothing is an error", "[vlm][freeze]") {
  torch::manual_seed(0);
  VlmModel model(tiny_model());
  OptimConfig oc;
  oc.lr = 1e-3;
  oc.param_groups = {{"vision_model", true, 0}, {"model.layers.*", false, 5e-4}};
  ParamPlan plan = plan_param_groups(named_params(model), oc);
  // lr 1e-3 (projector, embeddings, final norm, head) then 5e-4 (layers): decay + no-decay each.
  REQUIRE(plan.base_lrs.size() == 4);
  CHECK(plan.base_lrs[0] == 1e-3);
  CHECK(plan.base_lrs[3] == 5e-4);
  torch::optim::AdamW optim(plan.groups);
  set_lr_scaled(optim, plan.base_lrs, 0.5);
  CHECK(static_cast<torch::optim::AdamWOptions&>(optim.param_groups()[3].options()).lr() == Approx(2.5e-4));
  // The log shows the lr of the source holding the most trainable weights, and names each source.
  int64_t layers = 0, rest = 0;
  for (const auto& [n, p] : plan.trainable) (n.find("model.layers.") != std::string::npos ? layers : rest) += p.numel();
  CHECK(plan.logged_lr == (layers > rest ? 5e-4 : 1e-3));
  CHECK(plan.lr_summary == "optim.lr 0.001 on " + std::to_string(rest) + " weights, param_groups[1] (model.layers.*) " +
                               "0.0005 on " + std::to_string(layers) + " weights");

  // Every trainable weight under a rule with its own lr: optim.lr reaches nothing, and the log says
  // so (a sweep over --set optim.lr would otherwise change nothing unseen).
  OptimConfig own;
  own.lr = 1e-4;
  own.param_groups = {{"vision_model", true, 0}, {"mm_projector", false, 2e-3}, {"language_model", false, 3e-3}};
  const ParamPlan owned = plan_param_groups(named_params(model), own);
  int64_t proj = 0, lm = 0;
  for (const auto& [n, p] : owned.trainable) (component_of(n) == "mm_projector" ? proj : lm) += p.numel();
  CHECK(owned.logged_lr == (lm > proj ? 3e-3 : 2e-3));
  CHECK_THAT(owned.lr_summary, Catch::EndsWith("; optim.lr (0.0001) reaches no trainable parameter: set the rules' lr "
                                               "to change these"));

  OptimConfig typo;
  typo.param_groups = {{"language_modle", true, 0}};
  CHECK_THAT(message_of<ConfigError>([&] { plan_param_groups(named_params(model), typo); }),
             Catch::Contains("optim.param_groups[0].match: 'language_modle' matches no parameter"));
  OptimConfig all;
  all.param_groups = {{"*", true, 0}};
  CHECK_THAT(message_of<ConfigError>([&] { plan_param_groups(named_params(model), all); }),
             Catch::Contains("every parameter is frozen"));
}

TEST_CASE("gradient accumulation over micro-batches equals one big batch (token-normalised)", "[vlm][accum]") {
  const auto batch = tiny_batch();  // micro-batches of 2 hold 5 and 6 targets: unequal on purpose
  REQUIRE(batch.slice(0, 2).target_tokens() == 5);
  REQUIRE(batch.slice(2, 4).target_tokens() == 6);
  auto grads = [&](int accum, double* loss_value) {
    torch::manual_seed(0);
    VlmModel model(tiny_model());
    auto loss = ce();
    auto out = vlm_step(model, *loss, batch, accum, kImageId, false);
    *loss_value = out.loss.item<double>();
    std::map<std::string, torch::Tensor> g;
    for (const auto& p : model->named_parameters(true))  // the last vision layer feeds nothing (layer -2)
      g[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::Tensor();
    return g;
  };
  double l1 = 0, l2 = 0, l4 = 0;
  auto g1 = grads(1, &l1), g2 = grads(2, &l2), g4 = grads(4, &l4);
  CHECK(l2 == Approx(l1).epsilon(1e-6));
  CHECK(l4 == Approx(l1).epsilon(1e-6));
  int64_t compared = 0;
  for (const auto& [n, g] : g1) {
    INFO(n);
    REQUIRE(g2.at(n).defined() == g.defined());
    REQUIRE(g4.at(n).defined() == g.defined());
    if (!g.defined()) continue;
    ++compared;
    CHECK(torch::allclose(g2.at(n), g, 1e-5, 1e-7));
    CHECK(torch::allclose(g4.at(n), g, 1e-5, 1e-7));
  }
  CHECK(compared > 40);  // projector, every LLM tensor, most of the vision tower
}

TEST_CASE("independent turns: one packed record gives the loss and gradients of its single-turn records", "[vlm][segments]") {
  // Two questions about one image, asked alone: [bos, <image>] + "5 6 7 [eos]" and + "8 9 [eos]".
  ConversationBatch alone;
  alone.ids = {{2, kImageId, 5, 6, 7, 3}, {2, kImageId, 8, 9, 3}};
  alone.labels = {{-100, -100, -100, 6, 7, 3}, {-100, -100, -100, 9, 3}};
  alone.images_per_sample = {1, 1};
  alone.indices = {0, 1};
  torch::manual_seed(12);
  const auto image = torch::randn({1, 3, 16, 16});
  alone.pixels = torch::cat({image, image});
  // The same two as segments 1 and 2 after the shared prefix, one image.
  ConversationBatch packed;
  packed.ids = {{2, kImageId, 5, 6, 7, 3, 8, 9, 3}};
  packed.labels = {{-100, -100, -100, 6, 7, 3, -100, 9, 3}};
  packed.segments = {{0, 0, 1, 1, 1, 1, 2, 2, 2}};
  packed.images_per_sample = {1};
  packed.indices = {0};
  packed.pixels = image;
  REQUIRE(packed.target_tokens() == alone.target_tokens());  // 5

  auto run = [&](const ConversationBatch& b, double* loss_value) {
    torch::manual_seed(0);
    VlmModel model(tiny_model());
    auto loss = ce();
    *loss_value = vlm_step(model, *loss, b, 1, kImageId, false).loss.item<double>();
    std::map<std::string, torch::Tensor> g;
    for (const auto& p : model->named_parameters(true))
      if (p.value().grad().defined()) g[p.key()] = p.value().grad().clone();
    return g;
  };
  double la = 0, lp = 0;
  const auto ga = run(alone, &la), gp = run(packed, &lp);
  CHECK(lp == Approx(la).epsilon(1e-6));
  REQUIRE(ga.size() == gp.size());
  for (const auto& [n, g] : ga) {
    INFO(n);
    CHECK(torch::allclose(gp.at(n), g, 1e-5, 1e-7));
  }
  CHECK(ga.size() > 40);

  // Without the segments the second question would see the first: a different loss.
  packed.segments = {{}};
  double leaky = 0;
  run(packed, &leaky);
  CHECK(std::abs(leaky - la) > 1e-4);
}

TEST_CASE("reply normalisation and caption object scoring against a scene graph", "[vlm][eval]") {
  CHECK(normalise_reply("  Red. ") == "red");
  CHECK(normalise_reply("a large red circle") == "a large red circle");
  const auto scene = nlohmann::json::parse(R"({"objects": [
      {"shape": "circle", "colour": "red", "size": "large"},
      {"shape": "square", "colour": "green", "size": "small"}]})");
  // "blue square" is hallucinated (wrong colour), the circle is right and fully stated.
  auto s = score_caption_objects("a large red circle left of a small blue square", scene);
  CHECK(s.mentions == 2);
  CHECK(s.correct_mentions == 1);
  CHECK(s.objects == 2);
  CHECK(s.recalled == 1);
  // Partial descriptions are correct but not recalled; plurals count as the shape.
  auto m = parse_object_mentions("two green squares and a circle");
  REQUIRE(m.size() == 2);
  CHECK(m[0].shape == "square");
  CHECK(m[0].colour == "green");
  CHECK(m[0].size.empty());
  CHECK(m[1].shape == "circle");
  auto p = score_caption_objects("two green squares and a circle", scene);
  CHECK(p.correct_mentions == 2);
  CHECK(p.recalled == 0);
}

TEST_CASE("CHAIR over captions: hallucinated mentions by level and captions with any, worked by hand", "[vlm][eval]") {
  const nlohmann::json scene = {{"objects",
                                 {{{"shape", "circle"}, {"colour", "red"}, {"size", "large"}},
                                  {{"shape", "square"}, {"colour", "blue"}, {"size", "small"}}}}};
  ChairCounts chair;
  chair.add(score_caption_objects("a large red circle left of a small blue square", scene));   // 2 mentions, both right
  chair.add(score_caption_objects("a large red circle left of a small green square", scene));  // the square's colour
  chair.add(score_caption_objects("a small blue star", scene));                                // no star at all
  CHECK(chair.total.mentions == 5);
  CHECK(chair.total.correct_mentions == 3);
  CHECK(chair.total.attribute_errors == 1);
  CHECK(chair.total.object_errors == 1);
  const auto m = chair.metrics();
  CHECK(m["chair_i"].get<double>() == Approx(2.0 / 5));
  CHECK(m["chair_i/object"].get<double>() == Approx(1.0 / 5));
  CHECK(m["chair_i/attribute"].get<double>() == Approx(1.0 / 5));
  CHECK(m["chair_s"].get<double>() == Approx(2.0 / 3));
}

TEST_CASE("relation CHAIR: claims between correctly named objects, checked against the scene graph", "[vlm][eval]") {
  // Object 0 (red circle) is left of object 1 (blue square), which is right of it and above
  // object 2 (green star).
  const auto scene = nlohmann::json::parse(R"({"objects": [
      {"shape": "circle", "colour": "red", "size": "large"},
      {"shape": "square", "colour": "blue", "size": "small"},
      {"shape": "star", "colour": "green", "size": "small"}],
    "relations": [{"subject": 0, "object": 1, "predicate": "left of"},
                  {"subject": 1, "object": 0, "predicate": "right of"},
                  {"subject": 1, "object": 2, "predicate": "above"},
                  {"subject": 2, "object": 1, "predicate": "below"},
                  {"subject": 0, "object": 2, "predicate": "left of"},
                  {"subject": 2, "object": 0, "predicate": "right of"}]})");
  // Two claims, both true: "circle left of square", "square above star".
  auto a = score_caption_objects("a large red circle left of a small blue square above a small green star", scene);
  CHECK(a.relations == 2);
  CHECK(a.relation_errors == 0);
  // "square below star" is false; "circle is left of the square" reads through the fillers.
  auto b = score_caption_objects("the red circle is left of the square below a green star", scene);
  CHECK(b.relations == 2);
  CHECK(b.relation_errors == 1);
  // A claim with a hallucinated end (a yellow square) is an attribute error, not a relation one;
  // a list ("and") is no claim.
  auto c = score_caption_objects("a red circle right of a yellow square and a green star", scene);
  CHECK(c.attribute_errors == 1);
  CHECK(c.relations == 0);
  // Without relations in the scene every claim counts as unsupported.
  auto d = score_caption_objects("a red circle left of a blue square", nlohmann::json{{"objects", scene["objects"]}});
  CHECK(d.relations == 1);
  CHECK(d.relation_errors == 1);
  ChairCounts chair;
  for (const auto& x : {a, b, c}) chair.add(x);
  const auto m = chair.metrics();
  CHECK(m["relations"].get<int64_t>() == 4);
  CHECK(m["chair_r"].get<double>() == Approx(1.0 / 4));
  CHECK(m["chair_s"].get<double>() == Approx(1.0 / 3));  // CHAIR_s stays about objects: caption c
  CHECK_FALSE(ChairCounts{}.metrics().contains("chair_r"));
}

TEST_CASE("CHAIR on the generator's own captions: every mention right, every relation claim holds", "[vlm][eval]") {
  // The scorer and the shapes-world generator must agree on what a caption says: 200 scenes of up
  // to 4 objects, captioned by the generator, score no hallucination at any level.
  shapes::GeneratorOptions g;
  g.max_objects = 4;
  ChairCounts chair;
  for (int64_t i = 0; i < 200; ++i) {
    const auto scene = shapes::sample_scene(g, "val", i);
    chair.add(score_caption_objects(shapes::caption(scene), shapes::to_json(scene)));
  }
  CHECK(chair.total.mentions > 400);
  CHECK(chair.total.correct_mentions == chair.total.mentions);
  CHECK(chair.total.recalled == chair.total.objects);
  CHECK(chair.total.relations > 200);
  CHECK(chair.total.relation_errors == 0);
}

TEST_CASE("reference object lists: a vocabulary with phrases and plurals, CHAIR worked by hand", "[vlm][eval]") {
  TempDir d("vocab");
  test::write_file(d.file("vocab.json"),
                   R"({"dog": ["dog", "puppy"], "hot dog": ["hot dog"], "person": ["person", "man", "woman"], "bus": ["bus"]})");
  const auto v = ObjectVocabulary::load(d.file("vocab.json"));
  // "hot dog" wins over "dog" at the same word; "puppies", "buses" are plurals of the phrases.
  CHECK(v.mentions("A man eats a hot dog next to two puppies and buses.") ==
        std::vector<std::string>{"person", "hot dog", "dog", "bus"});
  // References: a person and a dog. Mentions: person (right), hot dog (hallucinated), dog (right),
  // bus (hallucinated). Both references recalled.
  auto s = score_caption_references("A man eats a hot dog next to two puppies and buses.", {"person", "dog"}, v);
  CHECK(s.mentions == 4);
  CHECK(s.correct_mentions == 2);
  CHECK(s.object_errors == 2);
  CHECK(s.objects == 2);
  CHECK(s.recalled == 2);
  ChairCounts chair;
  chair.add(s);
  chair.add(score_caption_references("a woman", {"person", "dog", "bus"}, v));  // 1 right, recall 1 of 3
  const auto m = chair.metrics();
  CHECK(m["chair_i"].get<double>() == Approx(2.0 / 5));
  CHECK(m["chair_i/object"].get<double>() == Approx(2.0 / 5));
  CHECK(m["chair_s"].get<double>() == Approx(1.0 / 2));
  CHECK(chair.total.recalled == 3);
  CHECK(chair.total.objects == 5);
  // Without a file each listed object names itself.
  CHECK(ObjectVocabulary::from_categories({"cat", "sofa"}).mentions("two cats on a sofa, no dog") ==
        std::vector<std::string>{"cat", "sofa"});
  // Bad files name themselves and the category.
  test::write_file(d.file("bad.json"), R"({"dog": "dog"})");
  CHECK_THAT(test::message_of<DataError>([&] { ObjectVocabulary::load(d.file("bad.json")); }),
             Catch::Contains("bad.json: category 'dog' must map to a non-empty list of phrases"));
  CHECK_THAT(test::message_of<DataError>([&] { ObjectVocabulary::load(d.file("none.json")); }),
             Catch::Contains("none.json: cannot read the object vocabulary (eval.object_vocabulary)"));
}

namespace {

// A few 32x32 shapes-world scenes, their instruction data and a tokenizer, with tiny configs.
struct TinyVlmCorpus {
  TempDir dir{"vlm"};
  TinyVlmCorpus() {
    test::write_tiny_shapes_corpus(dir.file("data"), 24, 8);
    // Shared by both stage configs: 32px images, 16 patches merged into 4 tokens.
    test::write_file(dir.file("base.yaml"), R"(
run: {threads: 1, seed: 5, precision: fp32}
data: {image_size: 32, max_seq_len: 320, on_too_long: truncate, workers: 1, tokenizer: )" + dir.file("data/tok.model") + R"(}
model:
  vision: {image_size: 32, patch_size: 8, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2}
  projector: {type: mlp2x_gelu, spatial_merge: 2}
  llm: {hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 2, max_position_embeddings: 320}
train: {batch_size: 4, log_every: 1}
schedule: {warmup_steps: 0}
eval: {max_new_tokens: 4}
)");
    test::write_file(dir.file("stage2.yaml"), "include: base.yaml\ntrainer: adapter\ndata: {train: " +
                                                  dir.file("data/train.jsonl") + ", template: plain}\n" +
                                                  "optim: {lr: 1.0e-2, param_groups: [{match: vision_model, freeze: "
                                                  "true}, {match: language_model, freeze: true}]}\ntrain: {steps: 3}\n");
    test::write_file(dir.file("stage3.yaml"), "include: base.yaml\ntrainer: finetune\nrun: {seed: 99}\ndata: {train: " +
                                                  dir.file("data/train_instruct.jsonl") + "}\n" +
                                                  "optim: {lr: 1.0e-2, param_groups: [{match: vision_model, freeze: true}, "
                                                  "{match: mm_projector, freeze: true}]}\ntrain: {steps: 3}\n" +
                                                  "eval: {sets: [{name: vqa, data: " + dir.file("data/val_vqa.jsonl") +
                                                  ", limit: 8}]}\n");
  }
  std::string pipeline(const std::string& out) const {
    const std::string path = dir.file("pipeline-" + out + ".yaml");
    test::write_file(path, "name: tiny\nout_dir: " + dir.file(out) + "\nstages:\n  - {name: s2, config: " +
                               dir.file("stage2.yaml") + "}\n  - name: s3\n    config: " + dir.file("stage3.yaml") +
                               "\n    init_from: [{stage: s2, components: [vision_model, mm_projector, language_model]}]\n");
    return path;
  }
};

std::map<std::string, torch::Tensor> final_weights(const nlohmann::json& stages, const std::string& stage) {
  return load_safetensors(stages.at(stage).at("checkpoint").get<std::string>() + "/model.safetensors");
}

}  // namespace

TEST_CASE("pipeline: stage 3 starts from stage 2's weights, and a re-run skips finished stages", "[vlm][pipeline][slow]") {
  TinyVlmCorpus c;
  TrainOptions quiet;
  quiet.quiet = true;
  const auto plan = load_pipeline(c.pipeline("run"));
  REQUIRE(plan.stages.size() == 2);
  CHECK(plan.stages[1].init_from.at(0).components.size() == 3);
  auto r = run_pipeline(plan, quiet);
  REQUIRE_FALSE(r.interrupted);
  const auto s2 = final_weights(r.stages, "s2"), s3 = final_weights(r.stages, "s3");
  // Stage 3 runs with another seed and freezes the vision tower and projector: they can only equal
  // stage 2's if they were handed over; the language model trained on.
  int64_t handed = 0, trained = 0;
  for (const auto& [name, t] : s3) {
    const auto comp = component_of(name);
    if (comp == "vision_model" || comp == "mm_projector") handed += torch::equal(t, s2.at(name));
    else trained += !torch::equal(t, s2.at(name));
  }
  int64_t frozen_total = 0;
  for (const auto& [name, t] : s3) frozen_total += component_of(name) != "language_model";
  CHECK(handed == frozen_total);
  CHECK(trained > 0);
  CHECK(r.stages["s3"]["eval"]["vqa"]["records"] == 8);
  CHECK(r.stages["s3"]["eval"]["vqa"].contains("exact_match/count"));

  // Same pipeline again: both stages are complete and skipped, nothing retrained.
  auto again = run_pipeline(load_pipeline(c.pipeline("run")), quiet);
  CHECK(again.stages["s2"]["skipped"] == true);
  CHECK(again.stages["s3"]["skipped"] == true);
  CHECK(again.stages["s3"]["checkpoint"] == r.stages["s3"]["checkpoint"]);
  {  // While another `trialign run` holds the pipeline folder: refused before any stage.
    const RunFolderLock other = RunFolderLock::acquire(c.dir.file("run"), RunFolderLock::Kind::Pipeline);
    REQUIRE(other.held());  // run_pipeline let go of it when it returned
    CHECK_THAT(message_of<ConfigError>([&] { run_pipeline(load_pipeline(c.pipeline("run")), quiet); }),
               Catch::Contains("the pipeline's out_dir '" + c.dir.file("run") + "' is in use by another trialign "
                               "process (pid " + std::to_string(::getpid())) &&
                   Catch::Contains("two runs of one pipeline would train its stages at once"));
  }
  // A copy of the pipeline folder is complete as well, and hands on its own checkpoints.
  std::filesystem::copy(c.dir.file("run"), c.dir.file("copy"), std::filesystem::copy_options::recursive);
  auto copied = run_pipeline(load_pipeline(c.pipeline("copy")), quiet);
  CHECK(copied.stages["s2"]["skipped"] == true);
  CHECK(copied.stages["s3"]["skipped"] == true);
  CHECK(copied.stages["s3"]["checkpoint"].get<std::string>().rfind(c.dir.file("copy/s3/checkpoints/"), 0) == 0);
  CHECK(copied.stages["s2"]["checkpoint"].get<std::string>().rfind(c.dir.file("copy/s2/checkpoints/"), 0) == 0);
  std::filesystem::remove_all(c.dir.file("copy"));

  // Stage 2 deleted and trained again to the same weights: stage 3 is still complete and skipped.
  const std::string s2_manifest = r.stages["s2"]["checkpoint"].get<std::string>() + "/MANIFEST.json";
  const uint32_t s2_crc = crc32_file(s2_manifest);
  std::filesystem::remove_all(c.dir.file("run/s2"));
  auto rebuilt = run_pipeline(load_pipeline(c.pipeline("run")), quiet);
  CHECK(rebuilt.stages["s2"]["skipped"] == false);
  CHECK(rebuilt.stages["s3"]["skipped"] == true);
  test::check_same_tensors(s2, final_weights(rebuilt.stages, "s2"));
  // Every file of the checkpoint came out the same, optimizer state included: the same MANIFEST.
  CHECK(crc32_file(s2_manifest) == s2_crc);
  // Other upstream weights than the ones stage 3 was trained from: refused.
  const std::string done = c.dir.file("run/s3/stage_done.json");
  auto record = nlohmann::json::parse(read_text_file(done));
  REQUIRE(record["upstream_weights"].size() == 1);
  record["upstream_weights"][0] = record["upstream_weights"][0].get<uint32_t>() ^ 1u;
  test::write_file(done, record.dump(2));
  CHECK_THAT(message_of<ConfigError>([&] { run_pipeline(load_pipeline(c.pipeline("run")), quiet); }),
             Catch::Contains("stage s3 was trained from other checkpoints of its init_from stages than the current ones"));
  // Stage 3 part-trained (its stage_done.json not yet written): it is continued only from the
  // upstream weights it started from, which stage_started.json recorded.
  std::filesystem::remove(done);
  const std::string started = c.dir.file("run/s3/stage_started.json");
  const auto began = nlohmann::json::parse(read_text_file(started));
  REQUIRE(began["upstream_weights"] == nlohmann::json::array({record["upstream_weights"][0].get<uint32_t>() ^ 1u}));
  auto other = began;
  other["upstream_weights"][0] = began["upstream_weights"][0].get<uint32_t>() ^ 1u;
  test::write_file(started, other.dump(2));
  CHECK_THAT(message_of<ConfigError>([&] { run_pipeline(load_pipeline(c.pipeline("run")), quiet); }),
             Catch::Contains("stage s3 is part-trained from other checkpoints of its init_from stages than the current "
                             "ones") && Catch::Contains("remove " + c.dir.file("run/s3")));
  // A stage part-trained by a version that wrote no stage_started.json is continued unchecked.
  // (The matching record is what the interrupted pipeline below resumes with.)
  std::filesystem::remove(started);
  auto continued = run_pipeline(load_pipeline(c.pipeline("run")), quiet);
  CHECK(continued.stages["s3"]["skipped"] == false);  // resumed at its last step: only the final evaluation ran
  test::check_same_tensors(s3, final_weights(continued.stages, "s3"));
  CHECK(nlohmann::json::parse(read_text_file(done))["upstream_weights"] == began["upstream_weights"]);

  // Interrupted in stage 2, then re-run: stage 2 resumes and the end result is the same, bit for bit.
  TrainOptions stop = quiet;
  stop.stop_at_step = 1;
  auto cut = run_pipeline(load_pipeline(c.pipeline("cut")), stop);
  REQUIRE(cut.interrupted);
  auto resumed = run_pipeline(load_pipeline(c.pipeline("cut")), quiet);
  REQUIRE_FALSE(resumed.interrupted);
  test::check_same_tensors(s3, final_weights(resumed.stages, "s3"));

  // A wrong path in the last stage's config stops the pipeline before the first stage trains.
  test::write_file(c.dir.file("stage3_bad.yaml"), "include: stage3.yaml\ndata: {train: " + c.dir.file("data/gone.jsonl") + "}\n");
  const std::string bad = c.dir.file("pipeline-bad.yaml");
  test::write_file(bad, "name: tiny\nout_dir: " + c.dir.file("bad") + "\nstages:\n  - {name: s2, config: " +
                            c.dir.file("stage2.yaml") + "}\n  - {name: s3, config: " + c.dir.file("stage3_bad.yaml") + "}\n");
  CHECK_THAT(message_of<ConfigError>([&] { run_pipeline(load_pipeline(bad), quiet); }),
             Catch::Contains("pipeline tiny: problems before training:\n  stage s3 (" + c.dir.file("stage3_bad.yaml") +
                             "): data.train: '" + c.dir.file("data/gone.jsonl") + "' does not exist"));
  CHECK_FALSE(std::filesystem::exists(c.dir.file("bad/s2")));
}

TEST_CASE("a resume may lower the learning rates together, not split the optimizer groups they share",
          "[vlm][resume]") {
  TinyVlmCorpus c;
  // Projector and language model at one lr: one lr group (decay / no decay), as in
  // configs/stage3_finetune.yaml.
  auto config = [&](const std::string& out, const std::string& projector_lr, const std::string& lm_lr) {
    return load_run_config(c.dir.file("stage3.yaml"),
                           {"run.out_dir=" + c.dir.file(out), "eval.sets=[]",
                            "optim.param_groups=[{match: vision_model, freeze: true}, {match: mm_projector, lr: " +
                                projector_lr + "}, {match: language_model, lr: " + lm_lr + "}]"});
  };
  TrainOptions quiet;
  quiet.quiet = true;
  TrainOptions stop = quiet;
  stop.stop_at_step = 2;
  TrainOptions resume = quiet;
  resume.resume = "auto";
  for (const std::string out : {"together", "apart"}) REQUIRE(train_vlm(config(out, "2e-3", "2e-3"), stop).interrupted);
  // Both halved: the groups stay as saved, the run goes on (with a warning).
  const auto together = train_vlm(config("together", "1e-3", "1e-3"), resume);
  CHECK_FALSE(together.interrupted);
  CHECK(together.final_step == 3);
  CHECK_THAT(read_text_file(c.dir.file("together/train.log")),
             Catch::Contains("resume: the learning rate changed (optim.param_groups)"));
  // Only the language model lowered: it would need a group of its own, which the saved optimizer
  // state does not have. Refused with the reason, before anything is loaded.
  CHECK_THAT(message_of<ConfigError>([&] { train_vlm(config("apart", "2e-3", "1e-3"), resume); }),
             Catch::Contains("with these learning rates: sources that shared an lr") &&
                 Catch::Contains("Change them together"));
}

TEST_CASE("adapter and finetune: stop at step k + resume equals an uninterrupted run, losses and weights bit for bit",
          "[vlm][resume][slow]") {
  TinyVlmCorpus c;
  // Stage 3 here trains everything, with augmentation and accumulation, so every RNG and the
  // optimizer state of all three components take part.
  const std::vector<std::pair<std::string, std::vector<std::string>>> runs = {
      {"stage2.yaml", {"train.steps=5"}},
      {"stage3.yaml",
       {"train.steps=5", "train.grad_accum=2", "data.augment.random_resized_crop=true", "optim.param_groups=[]",
        "schedule.warmup_steps=2"}}};
  for (const auto& [file, sets] : runs) {
    INFO(file);
    auto config = [&](const std::string& out) {
      auto s = sets;
      s.push_back("run.out_dir=" + c.dir.file(file + "-" + out));
      return load_run_config(c.dir.file(file), s);
    };
    TrainOptions quiet;
    quiet.quiet = true;
    const auto full = train_vlm(config("full"), quiet);
    TrainOptions stop = quiet;
    stop.stop_at_step = 2;
    const auto part1 = train_vlm(config("split"), stop);
    REQUIRE(part1.interrupted);
    TrainOptions resume = quiet;
    resume.resume = "auto";
    const auto part2 = train_vlm(config("split"), resume);
    REQUIRE_FALSE(part2.interrupted);
    std::vector<double> joined = part1.logged_losses;
    joined.insert(joined.end(), part2.logged_losses.begin(), part2.logged_losses.end());
    REQUIRE(full.logged_losses.size() == 5);
    CHECK(joined == full.logged_losses);
    const auto a = load_safetensors(full.checkpoint + "/model.safetensors");
    const auto b = load_safetensors(part2.checkpoint + "/model.safetensors");
    CHECK(a.size() == b.size());
    test::check_same_tensors(a, b);
  }
}

TEST_CASE("micro-batches on threads: stage 3 gives the losses and weights of the same micro-batches in order",
          "[vlm][micro_batches][slow]") {
  TinyVlmCorpus c;
  // Everything trains, with augmentation, so the vision tower's gradients and the per-sample
  // RNG take part; 4 micro-batches of 1 on 2 threads. One LibTorch thread per micro-batch both
  // ways (run.threads: 1), so every kernel sums in the same order and the runs agree bit for bit.
  auto run = [&](const std::string& out, int threads) {
    TrainOptions quiet;
    quiet.quiet = true;
    return train_vlm(load_run_config(c.dir.file("stage3.yaml"),
                                     {"train.grad_accum=4", "train.micro_batch_threads=" + std::to_string(threads),
                                      "data.augment.random_resized_crop=true", "optim.param_groups=[]",
                                      "eval.sets=[]", "run.out_dir=" + c.dir.file(out)}),
                     quiet);
  };
  const auto in_order = run("in_order", 1), threaded = run("threaded", 2);
  REQUIRE(in_order.logged_losses.size() == 3);
  CHECK(threaded.logged_losses == in_order.logged_losses);
  const auto a = load_safetensors(in_order.checkpoint + "/model.safetensors");
  const auto b = load_safetensors(threaded.checkpoint + "/model.safetensors");
  REQUIRE(a.size() == b.size());
  test::check_same_tensors(a, b);
  const auto oa = load_safetensors(in_order.checkpoint + "/optimizer.safetensors");
  test::check_same_tensors(oa, load_safetensors(threaded.checkpoint + "/optimizer.safetensors"));
}

TEST_CASE("stage 3: a stop signal during the final evaluation keeps the final checkpoint, and the resume evaluates it",
          "[vlm][resume]") {
  TinyVlmCorpus c;
  auto config = [&](const std::string& out) {
    return load_run_config(c.dir.file("stage3.yaml"), {"run.out_dir=" + c.dir.file(out)});
  };
  TrainOptions quiet;
  quiet.quiet = true;
  const auto clean = train_vlm(config("clean"), quiet);
  REQUIRE(clean.final_eval.contains("vqa"));
  struct HookReset {
    ~HookReset() { set_evaluation_hook({}); }
  } reset;
  // The real handler, as the final evaluation (after step 3) begins: its generation loop stops
  // at its first batch.
  set_evaluation_hook([](int64_t step) {
    if (step == 3) std::raise(SIGTERM);
  });
  const auto stopped = train_vlm(config("run"), quiet);
  CHECK(stopped.interrupted);
  CHECK(stopped.final_step == 3);
  CHECK(stopped.final_eval.is_null());
  CHECK_FALSE(std::filesystem::exists(c.dir.file("run/eval.json")));
  set_evaluation_hook({});
  TrainOptions resume = quiet;
  resume.resume = "auto";
  const auto r = train_vlm(config("run"), resume);
  CHECK_FALSE(r.interrupted);
  CHECK(r.final_eval == clean.final_eval);
  CHECK(std::filesystem::exists(c.dir.file("run/eval.json")));
  test::check_same_tensors(load_safetensors(clean.checkpoint + "/model.safetensors"),
                           load_safetensors(r.checkpoint + "/model.safetensors"));
}

TEST_CASE("conversation data: sequences too long after image expansion are caught at load", "[vlm][data]") {
  TinyVlmCorpus c;
  const auto tok = Tokenizer::load(c.dir.file("data/tok.model"));
  DataConfig dc;
  dc.image_size = 32;
  dc.workers = 1;
  dc.max_seq_len = 100000;
  const std::string manifest = c.dir.file("data/train_instruct.jsonl");
  // Each record: bos + several turns + one image of 64 tokens (a made-up projector output).
  int64_t longest = 0;
  {
    ConversationDataset all(manifest, dc, tok, 64, true);
    for (int64_t i = 0; i < all.size(); ++i) longest = std::max(longest, all.sample(i).tokens.expanded_length(64));
  }
  dc.max_seq_len = static_cast<int>(longest - 1);
  CHECK_THAT(message_of<DataError>([&] { ConversationDataset(manifest, dc, tok, 64, true); }),
             Catch::Contains("exceed data.max_seq_len " + std::to_string(longest - 1)) &&
                 Catch::Contains("train_instruct.jsonl:") && Catch::Contains("(id train-0000"));
  dc.on_too_long = "skip";
  ConversationDataset skipped(manifest, dc, tok, 64, true);
  CHECK(skipped.skipped() >= 1);
  CHECK(skipped.size() + skipped.skipped() == 24);
  dc.on_too_long = "truncate";
  ConversationDataset truncated(manifest, dc, tok, 64, true);
  CHECK(truncated.truncated() >= 1);
  CHECK(truncated.size() == 24);
  for (int64_t i = 0; i < truncated.size(); ++i) CHECK(truncated.sample(i).tokens.expanded_length(64) <= longest - 1);
  // The prompt of a sample is everything before its final reply, ending with the assistant marker.
  const auto& s = truncated.sample(0);
  const auto prompt = prompt_ids(s.tokens);
  REQUIRE(prompt.size() < s.tokens.ids.size());
  CHECK(s.tokens.labels[prompt.size()] != kIgnoreIndex);
  CHECK(s.tokens.labels[prompt.size() - 1] == kIgnoreIndex);
}

TEST_CASE("conversation data: data.turns independent packs training records only, and truncation keeps segments aligned",
          "[vlm][data][segments]") {
  TinyVlmCorpus c;
  const auto tok = Tokenizer::load(c.dir.file("data/tok.model"));
  DataConfig dc;
  dc.image_size = 32;
  dc.workers = 1;
  dc.max_seq_len = 100000;
  dc.turns = "independent";
  const std::string manifest = c.dir.file("data/train_instruct.jsonl");
  const auto records = read_manifest(manifest);
  ConversationDataset train(manifest, dc, tok, 4, true), held_out(manifest, dc, tok, 4, false);
  REQUIRE(train.size() == static_cast<int64_t>(records.size()));
  int64_t packed = 0;
  for (int64_t i = 0; i < train.size(); ++i) {
    const auto& r = records[static_cast<size_t>(i)];
    const auto want = tokenize_independent_turns(parse_llava_record(r), tok, r.where);
    INFO(r.where);
    CHECK(train.sample(i).tokens.ids == want.ids);
    CHECK(train.sample(i).tokens.segments == want.segments);
    packed += !want.segments.empty();
    // Held-out records are scored as written: one causal sequence.
    CHECK(held_out.sample(i).tokens.segments.empty());
    CHECK(held_out.sample(i).tokens.ids == tokenize_conversation(parse_llava_record(r), tok).ids);
  }
  CHECK(packed > 0);
  const auto batch = train.range(0, 2);
  CHECK(batch.segments.at(0) == train.sample(0).tokens.segments);
  CHECK(batch.segments.at(1) == train.sample(1).tokens.segments);

  // Truncated to fit: the segments are cut with the ids they label.
  int64_t longest = 0;
  for (int64_t i = 0; i < train.size(); ++i) longest = std::max(longest, train.sample(i).tokens.expanded_length(4));
  dc.max_seq_len = static_cast<int>(longest - 3);
  dc.on_too_long = "truncate";
  ConversationDataset cut(manifest, dc, tok, 4, true);
  REQUIRE(cut.truncated() >= 1);
  for (int64_t i = 0; i < cut.size(); ++i) {
    const auto& t = cut.sample(i).tokens;
    if (!t.segments.empty()) CHECK(t.segments.size() == t.ids.size());
  }
}

TEST_CASE("conversation data: reference object lists are read and checked, and records sort into eval suites", "[vlm][data]") {
  TinyVlmCorpus c;
  const auto tok = Tokenizer::load(c.dir.file("data/tok.model"));
  DataConfig dc;
  dc.image_size = 32;
  dc.max_seq_len = 4096;
  std::ifstream in(c.dir.file("data/train_instruct.jsonl"));
  std::string line;
  std::getline(in, line);
  auto rec = nlohmann::json::parse(line);
  rec.erase("scene");
  rec.erase("question_type");
  std::string lines;
  auto add = [&](const std::string& id, const nlohmann::json& extra) {
    auto r = rec;
    r["id"] = id;
    r.update(extra);
    lines += r.dump() + "\n";
  };
  add("with-objects", {{"objects", {"dog", "person"}}});
  add("probe", {{"question_type", "pope/object/random"}});
  add("question", {{"question_type", "count"}});
  add("bad-objects", {{"objects", {"dog", 3}}});
  add("numeric-type", {{"question_type", 5}});
  add("empty-type", {{"question_type", ""}});
  test::write_file(c.dir.file("data/objects.jsonl"), lines);
  const std::string msg =
      message_of<DataError>([&] { ConversationDataset(c.dir.file("data/objects.jsonl"), dc, tok, 4, false); });
  CHECK_THAT(msg, Catch::Contains("objects.jsonl:4 (id bad-objects): 'objects' must be a list of object names"));
  // A question_type that is not a name would drop the record from every per-type score.
  CHECK_THAT(msg, Catch::Contains("objects.jsonl:5 (id numeric-type): 'question_type' must be a non-empty string") &&
                      Catch::Contains("got 5"));
  CHECK_THAT(msg, Catch::Contains("objects.jsonl:6 (id empty-type): 'question_type' must be a non-empty string"));
  dc.on_bad_record = "skip";
  ConversationDataset ds(c.dir.file("data/objects.jsonl"), dc, tok, 4, false);
  REQUIRE(ds.size() == 3);
  CHECK(ds.sample(0).reference_objects == std::vector<std::string>{"dog", "person"});
  CHECK(eval_suite_of(ds.sample(0)) == "chair");
  CHECK(eval_suite_of(ds.sample(1)) == "pope");
  CHECK(eval_suite_of(ds.sample(2)) == "vqa");
  ds.keep_only([](const ConversationSample& s) { return eval_suite_of(s) != "pope"; });
  REQUIRE(ds.size() == 2);
  CHECK(ds.sample(1).id == "question");
}

TEST_CASE("config: stage 2-3 mistakes are reported with their keys", "[vlm][config]") {
  auto check = [](const std::string& yaml) {
    return message_of<ConfigError>([&] { run_config_from_tree(parse_config_string(yaml, "c.yaml"), "c.yaml"); });
  };
  const std::string base = "trainer: finetune\ndata: {train: t.jsonl, tokenizer: t.model}\n";
  CHECK_THAT(check(base + "init_from: [{checkpoint: runs/x, components: [vision]}]\n"),
             Catch::Contains("init_from[0].components[0]") && Catch::Contains("unknown component 'vision'"));
  CHECK_THAT(check(base + "model: {llm: {hidden_size: 100, num_attention_heads: 3}}\n"),
             Catch::Contains("model.llm.num_attention_heads"));
  CHECK_THAT(check(base + "model: {projector: {type: mlp2x_gelu, spatial_merge: 3}}\n"),
             Catch::Contains("model.projector") && Catch::Contains("does not divide the 8 x 8 patch grid"));
  CHECK_THAT(check("trainer: finetune\ndata: {train: t.jsonl, tokenizer: t.model, max_seq_len: 1024}\n"),
             Catch::Contains("data.max_seq_len"));
  CHECK_THAT(check(base + "model: {projector: {type: qformer}}\n"), Catch::Contains("unknown projector type 'qformer'"));
  CHECK_THAT(check("trainer: contrastive\ndata: {train: t.jsonl, tokenizer: t.model}\ninit_from: [{checkpoint: x, "
                   "components: [vision_model, mm_projector]}]\n"),
             Catch::Contains("init_from[0].components[1]") &&
                 Catch::Contains("unknown component 'mm_projector' for the contrastive trainer"));
}

TEST_CASE("pipeline summary: one readable line per stage from the stages' held-out results", "[vlm][pipeline]") {
  const auto plan = test::demo_plan("runs/demo", {{"s1", "contrastive"}, {"s3", "finetune"}, {"lm", "finetune"},
                                                  {"s4", "preference"}, {"s5", "finetune"}});
  PipelineResult r;
  r.stages["s1"]["eval"] = {{"i2t/R@1", 0.5}, {"i2t/R@5", 0.9}, {"t2i/R@1", 0.25}, {"t2i/R@5", 0.875},
                            {"negatives/all", 0.8}, {"negatives/shape", 0.7}, {"alignment/mutual_knn@10", 0.3},
                            {"alignment/cka", 0.625}};
  r.stages["s3"]["eval"]["vqa"] = {{"exact_match", 0.75}, {"exact_match/colour", 1.0}, {"exact_match/count", 0.5},
                                   {"loss", 0.4}, {"loss_shuffled_images", 0.8}, {"records", 8}};
  r.stages["s3"]["eval"]["probes"] = {{"exact_match", 0.75}, {"pope/accuracy", 0.75}, {"pope/hallucination_rate", 0.25},
                                    {"pope/yes_ratio", 0.5}, {"pope/object/hallucination_rate", 0.125},
                                    {"pope/object/random/accuracy", 0.9}, {"pope/relation/hallucination_rate", 0.5}};
  r.stages["lm"]["eval"] = nlohmann::json();
  r.stages["s4"]["eval"]["val"] = {{"likelihood_accuracy", 0.75}, {"likelihood_accuracy/object", 0.5},
                                   {"likelihood_accuracy/relation", 1.0}, {"preference_accuracy", 0.625}};
  const std::string s = pipeline_summary(plan, r);
  CHECK_THAT(s, Catch::StartsWith("pipeline demo (runs/demo/pipeline.json), held-out results:\n"));
  CHECK_THAT(s, Catch::Contains("  s1       contrastive  retrieval i2t R@1 0.500 R@5 0.900, t2i R@1 0.250 R@5 0.875; "
                                "true caption above a hard negative: shape 0.700; mutual kNN@10 0.300, CKA 0.625\n"));
  CHECK_THAT(s, Catch::Contains("  s3       finetune     probes: yes/no accuracy 0.750, says yes to what is not there "
                                "0.250 (object 0.125, relation 0.500), yes ratio 0.500\n"
                                "                        vqa: exact match 0.750 (colour 1.000, count 0.500); token loss "
                                "0.400 (0.800 with other images)\n"));
  CHECK_THAT(s, Catch::Contains("  lm       finetune     no held-out set configured\n"));
  CHECK_THAT(s, Catch::Contains("  s5       finetune     not run\n"));
  CHECK_THAT(s, Catch::Contains("  s4       preference   val: true caption likelier than its hallucinated twin 0.750 "
                                "(object 0.500, relation 1.000); implicit reward prefers it 0.625\n"));
}

TEST_CASE("eval predictions: one line per scored record, in order, whose right flags make up the exact match",
          "[vlm][eval]") {
  TinyVlmCorpus c;
  RunConfig cfg = load_run_config(c.dir.file("stage3.yaml"));
  const auto tok = Tokenizer::load(cfg.data.tokenizer);
  torch::manual_seed(3);
  VlmModel model = build_vlm_model(cfg, tok);
  auto loss = ce();
  auto run = [&](const std::string& manifest, std::vector<nlohmann::json>& pred, int batch = 4) {
    ConversationDataset ds(manifest, cfg.data, tok, model->tokens_per_image(), false, 6);
    auto j = evaluate_vlm(model, *loss, ds, tok, batch, 4, false, {}, &pred);
    REQUIRE(pred.size() == static_cast<size_t>(ds.size()));
    for (int64_t i = 0; i < ds.size(); ++i) {
      CHECK(pred[static_cast<size_t>(i)]["id"] == ds.sample(i).id);
      CHECK(pred[static_cast<size_t>(i)]["reference"] == ds.sample(i).reference);
    }
    return j;
  };
  std::vector<nlohmann::json> first, one_by_one;
  const auto batched = run(c.dir.file("data/val_vqa.jsonl"), first);
  // The evaluation batch (eval.batch_size) changes how records are padded together, not what is
  // replied or scored.
  const auto single = run(c.dir.file("data/val_vqa.jsonl"), one_by_one, 1);
  for (size_t i = 0; i < first.size(); ++i) CHECK(one_by_one[i]["reply"] == first[i]["reply"]);
  CHECK(single["exact_match"].get<double>() == batched["exact_match"].get<double>());
  CHECK(single["loss"].get<double>() == Approx(batched["loss"].get<double>()).epsilon(1e-5));
  // eval.batch_size caps the training micro-batch; its default (256, stage 1's) leaves it as it is.
  const int micro = cfg.train.batch_size / cfg.train.grad_accum;
  CHECK(cfg.eval.vlm_batch(micro) == micro);
  RunConfig lower = cfg;
  lower.eval.batch_size = 1;
  CHECK(lower.eval.vlm_batch(micro) == 1);
  // The same questions again, the even ones with the untrained model's own reply as their answer:
  // exactly those are right, and exact_match is their share.
  std::ifstream in(c.dir.file("data/val_vqa.jsonl"));
  std::string line, lines;
  for (size_t i = 0; i < first.size() && std::getline(in, line); ++i) {
    auto r = nlohmann::json::parse(line);
    const std::string reply = first[i]["reply"];
    REQUIRE_FALSE(reply.empty());
    if (i % 2 == 0) r["conversations"].back()["value"] = reply;
    else r["conversations"].back()["value"] = reply + " not";
    lines += r.dump() + "\n";
  }
  test::write_file(c.dir.file("data/own.jsonl"), lines);
  std::vector<nlohmann::json> second;
  const auto j = run(c.dir.file("data/own.jsonl"), second);
  for (size_t i = 0; i < second.size(); ++i) {
    CHECK(second[i]["reply"] == first[i]["reply"]);  // greedy: the same prompt, the same reply
    CHECK(second[i]["right"] == (i % 2 == 0));
    CHECK(second[i]["where"] == c.dir.file("data/own.jsonl") + ":" + std::to_string(i + 1));
  }
  CHECK(j["exact_match"].get<double>() == Approx(0.5));

  // Yes/no probes also carry the probe score's reading of each reply: its hallucination flags
  // over the "no" probes make up the printed hallucination rate.
  std::vector<nlohmann::json> probes;
  const auto jp = run(c.dir.file("data/val_pope.jsonl"), probes);
  int64_t no_probes = 0, flagged = 0;
  for (const auto& p : probes) {
    REQUIRE(p.contains("said"));
    CHECK(p["said"] == yes_no_of(p["reply"].get<std::string>()));
    CHECK(p["hallucination"] == (p["reference"] == "no" && p["said"] == "yes"));
    no_probes += p["reference"] == "no";
    flagged += p["hallucination"].get<bool>();
  }
  REQUIRE(no_probes > 0);
  CHECK(jp["pope/hallucination_rate"].get<double>() == Approx(static_cast<double>(flagged) / no_probes));
}
