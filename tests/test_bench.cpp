// `trialign bench`: model FLOPs against hand-worked counts, the figures of a run consistent with
// its own step times, and activation checkpointing equal to the plain forward and backward.
#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>
#include <set>

#include "core/errors.h"
#include "models/clip_layers.h"
#include "models/clip_model.h"
#include "models/llama.h"
#include "models/recompute.h"
#include "models/vlm.h"
#include "test_helpers.h"
#include "trainers/bench.h"
#include "trainers/pipeline.h"

using namespace trialign;

TEST_CASE("model FLOPs of the towers, worked by hand", "[bench][flops]") {
  VisionConfig v;  // 4x4 image, 2x2 patches: 4 patches + CLS = 5 tokens
  v.image_size = 4, v.patch_size = 2, v.num_channels = 3, v.hidden_size = 4, v.intermediate_size = 8,
  v.num_hidden_layers = 1;
  // patch embedding 2*3*2*2*4 per patch x 4 = 384; layer: 2*5*(q,k,v,o 4*16 + mlp 2*32) = 1280,
  // QK^T and AV 4*5*5*4 = 400
  CHECK(vision_forward_flops(v) == Approx(2064));
  CHECK(vision_forward_flops(v, 0) == Approx(384));  // a tap at the embeddings runs no layer
  // Pooled at CLS, the layer computes k and v for all 5 tokens (2*5*2*16 = 320) and q, o, the MLP
  // (2*(2*16 + 2*32) = 192) and QK^T, AV (4*5*4 = 80) for the CLS row: 384 + 592.
  CHECK(vision_pooled_flops(v) == Approx(976));
  v.pooling = "mean";  // every patch's last state is read
  CHECK(vision_pooled_flops(v) == Approx(2064));

  TextConfig t;
  t.hidden_size = 4, t.intermediate_size = 8, t.num_hidden_layers = 2;
  // layer 1: 2*3*(64 + 64) + 4*3*3*4 = 912; layer 2 at the end-of-text row only: k, v for all
  // 3 tokens 2*3*32 = 192, q, o, MLP for the row 2*(32 + 64) = 192, QK^T and AV 4*3*4 = 48;
  // projection 2*4*5 = 40
  CHECK(text_forward_flops(t, 3, 5) == Approx(912 + 432 + 40));

  LlamaConfig l;  // head_dim 4, one KV head: k and v are 8 -> 4
  l.vocab_size = 10, l.hidden_size = 8, l.intermediate_size = 6, l.num_hidden_layers = 1, l.num_attention_heads = 2,
  l.num_key_value_heads = 1;
  // 2*3*(q,o 2*64 + k,v 2*32 + gate,up,down 3*48) = 2016, attention 4*3*3*8 = 288, head 2*3*8*10 = 480
  CHECK(llm_forward_flops(l, 3, 3) == Approx(2784));
  // Loss at one position: the layer computes k, v for all 3 (2*3*2*8*4 = 384), q, o and the MLP
  // for one row (2*(128 + 144) = 544), attention 4*1*3*8 = 96; the head 2*8*10 = 160.
  CHECK(llm_forward_flops(l, 3, 1) == Approx(384 + 544 + 96 + 160));
  l.num_hidden_layers = 2;  // the first layer whole
  CHECK(llm_forward_flops(l, 3, 1) == Approx(2304 + 384 + 544 + 96 + 160));

  CHECK(backward_multiple(true, false) == 2);
  CHECK(backward_multiple(false, true) == 1);
  CHECK(backward_multiple(false, false) == 0);
}

namespace {

std::vector<std::string> tiny_card(const std::string& trainer, const std::string& out) {
  std::vector<std::string> s = {
      "trainer=" + trainer, "run.out_dir=" + out, "run.threads=1", "run.precision=fp32", "bench.card=true",
      "bench.warmup=1", "bench.steps=3", "bench.images=4", "bench.matmul_size=32", "data.image_size=16",
      "data.workers=1", "model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.hidden_size=16",
      "model.vision.intermediate_size=32", "model.vision.num_hidden_layers=2", "model.vision.num_attention_heads=2",
      "train.batch_size=4", "schedule.type=constant"};
  if (trainer == "contrastive") {
    for (const char* k : {"model.text.vocab_size=50", "model.text.max_position_embeddings=8", "model.text.hidden_size=16",
                          "model.text.intermediate_size=32", "model.text.num_hidden_layers=1",
                          "model.text.num_attention_heads=2", "data.max_text_len=8", "model.projection_dim=8"})
      s.push_back(k);
  } else {
    for (const char* k : {"model.llm.vocab_size=40", "model.llm.hidden_size=16", "model.llm.intermediate_size=24",
                          "model.llm.num_hidden_layers=1", "model.llm.num_attention_heads=2", "model.llm.max_position_embeddings=32",
                          "data.max_seq_len=16", "bench.text_tokens=8", "bench.loss_tokens=3", "model.projector.type=mlp2x_gelu",
                          "optim.param_groups=[{match: vision_model, freeze: true}]"})
      s.push_back(k);
  }
  return s;
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// The figures follow from the measured step times and the card's shapes.
void check_figures(const nlohmann::json& j, const RunConfig& cfg, double samples, double tokens) {
  const auto steps = j["step_s"].get<std::vector<double>>();
  REQUIRE(steps.size() == 3);
  const double med = median_of(steps);
  CHECK(j["median_step_s"].get<double>() == Approx(med));
  CHECK(j["samples_per_s"].get<double>() == Approx(samples / med));
  CHECK(j["tokens_per_step"].get<double>() == Approx(tokens));
  CHECK(j["tokens_per_s"].get<double>() == Approx(tokens / med));
  CHECK(j["model_flops_per_s"].get<double>() == Approx(j["model_flops_per_step"].get<double>() / med));
  CHECK(j["fraction_of_matmul_peak"].get<double>() ==
        Approx(j["model_flops_per_s"].get<double>() / j["matmul_peak_flops_per_s"].get<double>()));
  CHECK(j["data_wait_share"].get<double>() >= 0.0);
  CHECK(j["data_wait_share"].get<double>() <= 1.0);
  CHECK(j["peak_rss_mb"].get<double>() > 0.0);
  CHECK(j["decode_transform_images_per_s_per_core"].get<double>() > 0.0);
  std::ifstream f(cfg.run.out_dir + "/bench.json");
  CHECK(nlohmann::json::parse(f) == j);  // what RUN/bench.json holds
}

}  // namespace

TEST_CASE("bench: stage-1 card figures follow from its step times and shapes", "[bench]") {
  test::TempDir dir("bench1");
  const auto cfg = test::config_from_overrides(tiny_card("contrastive", dir.file("run")), "card");
  BenchOptions o;
  o.quiet = true;
  const auto j = run_bench(cfg, o);
  // two 8x8 patches... 16/8 = 2 per side: 4 patches + CLS, and 8 text tokens, per pair
  check_figures(j, cfg, 4, 4 * (5 + 8));
  RunConfig resolved = cfg;
  resolved.model.text.vocab_size = 50;
  CHECK(j["model_flops_per_step"].get<double>() == Approx(bench_step_flops(resolved, {}, 0, false)));
  CHECK(j["model_flops_per_step"].get<double>() ==
        Approx(3.0 * 4 * (vision_pooled_flops(cfg.model.vision) + 2.0 * 16 * 8 + text_forward_flops(cfg.model.text, 8, 8))));
  SECTION("an output file that cannot be written is refused before the steps") {
    BenchOptions bad;
    bad.quiet = true;
    bad.json_out = dir.file("missing/folder/out.json");
    CHECK_THAT(test::message_of<ConfigError>([&] { run_bench(cfg, bad); }),
               Catch::Contains("bench --json: cannot write") && Catch::Contains("missing/folder/out.json"));
  }
  SECTION("the command restarts itself with GOMP_SPINCOUNT=10000 and gives OpenBLAS the threads") {
    std::string args = std::string(TRIALIGN_BINARY) + " bench " + dir.file("card.yaml");
    for (const auto& kv : tiny_card("contrastive", dir.file("cli"))) args += " --set '" + kv + "'";
    args += " --set run.threads=2";
    test::write_file(dir.file("card.yaml"), "trainer: contrastive\n");
    std::string out;
    auto bench_json = [&](const std::string& env) {
      REQUIRE(test::run_command("env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT -u TRIALIGN_NO_RESTART " + env + " " + args,
                                &out) == 0);
      std::ifstream f(dir.file("cli/bench.json"));
      return nlohmann::json::parse(f);
    };
    const auto cli = bench_json("");
    CHECK(cli["gomp_spincount"] == "10000");
    CHECK(cli["omp_wait_policy"] == "");
    CHECK(cli["blas_threads"] == 2);
    // What the user chose is kept. A short spin or PASSIVE still frees the cores for OpenBLAS; a
    // long spin or ACTIVE keeps OpenBLAS at one thread.
    const auto passive = bench_json("OMP_WAIT_POLICY=PASSIVE");
    CHECK(passive["omp_wait_policy"] == "PASSIVE");
    CHECK(passive["gomp_spincount"] == "");
    CHECK(passive["blas_threads"] == 2);
    const auto short_spin = bench_json("GOMP_SPINCOUNT=500");
    CHECK(short_spin["gomp_spincount"] == "500");
    CHECK(short_spin["blas_threads"] == 2);
    for (const std::string& busy : {"OMP_WAIT_POLICY=ACTIVE", "GOMP_SPINCOUNT=2000000", "GOMP_SPINCOUNT=infinite"}) {
      INFO(busy);
      const auto kept = bench_json(busy);
      CHECK(kept["gomp_spincount"] == (busy.rfind("GOMP", 0) == 0 ? busy.substr(busy.find('=') + 1) : ""));
      CHECK(kept["blas_threads"] == 1);
    }
  }
  SECTION("a bench card is not trained") {
    CHECK_THAT(test::message_of<ConfigError>([&] { train_any(cfg, test::quiet()); }),
               Catch::Contains("bench.card is true"));
  }
}

TEST_CASE("bench: a stop signal ends it between steps, exit 75, no figures written", "[bench][cli]") {
  test::TempDir dir("bench-stop");
  const std::string run = dir.file("run"), log = dir.file("bench.out");
  std::vector<std::string> args = {TRIALIGN_BINARY, "bench", test::source_dir() + "/configs/bench/stage1.yaml"};
  for (auto s : tiny_card("contrastive", run)) {
    if (s.rfind("bench.steps=", 0) == 0) s = "bench.steps=100000";  // far more than the test waits for
    args.push_back("--set"), args.push_back(s);
  }
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::freopen(log.c_str(), "w", stdout);
    std::freopen(log.c_str(), "a", stderr);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    ::execv(TRIALIGN_BINARY, argv.data());
    ::_exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  bool stepping = false;
  while (!stepping && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    std::ifstream in(log);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    stepping = text.find("bench step 3/100001") != std::string::npos;
  }
  ::kill(pid, stepping ? SIGINT : SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::ifstream in(log);
  const std::string said((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  INFO(said);
  REQUIRE(stepping);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 75);
  CHECK_THAT(said, Catch::Contains("bench stopped by a signal before its last step: no figures written"));
  CHECK_THAT(said, !Catch::Contains("bench step 100001/100001"));
  CHECK(!std::filesystem::exists(run + "/bench.json"));
}

TEST_CASE("bench: stage-3 and DPO cards count the frozen tower once and the reference forward only", "[bench]") {
  test::TempDir dir("bench3");
  BenchOptions o;
  o.quiet = true;
  const auto cfg = test::config_from_overrides(tiny_card("finetune", dir.file("s3")), "card");
  const auto j = run_bench(cfg, o);
  const int64_t tpi = visual_tokens_per_image(cfg.model);
  REQUIRE(tpi == 4);
  check_figures(j, cfg, 4, 4 * (4 + 8));
  // the tower's 2 layers, tapped at -2: the second never runs
  const double fv = vision_forward_flops(cfg.model.vision, 1), fl = llm_forward_flops(cfg.model.llm, 4 + 8, 3);
  // mlp2x_gelu 16 -> 16 -> 16: 512 weights, 2 FLOPs each per visual token
  const double fp = 2.0 * 512 * 4;
  CHECK(j["model_flops_per_step"].get<double>() == Approx(4 * (fv + 3 * fp + 3 * fl)));

  const auto dpo = test::config_from_overrides(tiny_card("preference", dir.file("dpo")), "card");
  const auto d = run_bench(dpo, o);
  check_figures(d, dpo, 4, 2 * 4 * (4 + 8));
  // policy over chosen + rejected (8 sequences), and the frozen reference's forward over them
  CHECK(d["model_flops_per_step"].get<double>() == Approx(8 * (fv + 3 * fp + 3 * fl) + 8 * (fv + fp + fl)));

  SECTION("with a real tokenizer, whose <image> id lies inside the drawn ids, every sample has one image") {
    // The synthetic ids once included the tokenizer's <image> id, and a stray placeholder asked
    // for an image the sample does not have.
    test::write_tiny_shapes_corpus(dir.file("corpus"), 4, 2);
    const auto tok = Tokenizer::load(dir.file("corpus/tok.model"));
    REQUIRE(tok.image_id() >= 4);
    REQUIRE(tok.image_id() < tok.vocab_size() - 1);
    for (const std::string trainer : {"finetune", "preference"}) {
      auto s = tiny_card(trainer, dir.file("tok_" + trainer));
      s.push_back("data.tokenizer=" + dir.file("corpus/tok.model"));
      s.push_back("model.llm.vocab_size=0");
      s.push_back("bench.images=32");  // 32 samples of 8 text ids, all of them drawn in 8 steps of 4
      s.push_back("bench.steps=8");
      auto c = test::config_from_overrides(s, "card");
      const auto r = run_bench(c, o);
      CHECK(r["step_s"].size() == 8);
      CHECK(r["tokens_per_step"].get<double>() == Approx((trainer == "finetune" ? 1 : 2) * 4 * (4 + 8)));
    }
  }

  SECTION("micro-batches on threads: recorded in the JSON, the same work, figures from the step times") {
    for (const std::string trainer : {"finetune", "preference"}) {
      INFO(trainer);
      auto s = tiny_card(trainer, dir.file("mb_" + trainer));
      s.push_back("train.grad_accum=2");
      s.push_back("train.micro_batch_threads=2");
      const auto c = test::config_from_overrides(s, "card");
      const auto r = run_bench(c, o);
      CHECK(r["grad_accum"] == 2);
      CHECK(r["micro_batch_threads"] == 2);
      CHECK(r["blas_threads"] == 1);  // each GEMM on its micro-batch's thread
      check_figures(r, c, 4, (trainer == "finetune" ? 1 : 2) * 4 * (4 + 8));
      CHECK(r["model_flops_per_step"].get<double>() ==
            Approx((trainer == "finetune" ? j : d)["model_flops_per_step"].get<double>()));
    }
  }

  SECTION("GRPO's sampling is refused by name") {
    auto s = tiny_card("preference", dir.file("grpo"));
    s.push_back("loss.type=grpo");
    const auto g = test::config_from_overrides(s, "card");
    CHECK_THAT(test::message_of<ConfigError>([&] { run_bench(g, o); }), Catch::Contains("'grpo' samples its completions"));
  }
}

namespace {

// Gradients of every parameter and of the input after backward of a weighted sum of `out`.
std::map<std::string, torch::Tensor> grads_of(torch::nn::Module& m, const torch::Tensor& x, const torch::Tensor& out) {
  const auto w = torch::linspace(-1, 1, out.numel()).view(out.sizes());
  (out * w).sum().backward();
  std::map<std::string, torch::Tensor> g;
  for (const auto& p : m.named_parameters()) g[p.key()] = p.value().grad().clone();
  if (x.requires_grad()) g["input"] = x.grad().clone();
  return g;
}

// Whether the autograd graph behind `t` holds a checkpointed block's backward node.
bool has_recompute_node(const torch::Tensor& t) {
  std::vector<torch::autograd::Node*> todo = {t.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  while (!todo.empty()) {
    auto* n = todo.back();
    todo.pop_back();
    if (!n || !seen.insert(n).second) continue;
    if (n->name().find("RecomputeBackward") != std::string::npos) return true;
    for (const auto& e : n->next_edges()) todo.push_back(e.function.get());
  }
  return false;
}

void check_close(const std::map<std::string, torch::Tensor>& a, const std::map<std::string, torch::Tensor>& b,
                 double rtol = 1e-5) {
  REQUIRE(a.size() == b.size());
  for (const auto& [k, t] : a) {
    INFO(k);
    CHECK(torch::allclose(t, b.at(k), rtol, 1e-6));
  }
}

}  // namespace

TEST_CASE("gradient checkpointing gives the plain forward's values and gradients", "[bench][recompute]") {
  SECTION("CLIP encoder, causal mask, fp32 and bf16 autocast") {
    for (bool bf16 : {false, true}) {
      TowerDims c;
      c.hidden_size = 16, c.intermediate_size = 24, c.num_attention_heads = 2;
      torch::manual_seed(3);
      ClipEncoder plain(c, 3);
      c.gradient_checkpointing = true;
      ClipEncoder recomputed(c, 3);
      {
        torch::NoGradGuard ng;
        for (size_t i = 0; i < plain->parameters().size(); ++i) recomputed->parameters()[i].copy_(plain->parameters()[i]);
      }
      const auto mask = torch::full({5, 5}, -INFINITY).triu(1);
      const auto x0 = torch::randn({2, 5, 16});
      AutocastGuard ac(bf16);
      auto x1 = x0.clone().requires_grad_(true), x2 = x0.clone().requires_grad_(true);
      auto y1 = plain->forward(x1, mask), y2 = recomputed->forward(x2, mask);
      CHECK(torch::equal(y1, y2));
      CHECK(has_recompute_node(y2));  // the layers really were checkpointed
      CHECK_FALSE(has_recompute_node(y1));
      check_close(grads_of(*plain, x1, y1), grads_of(*recomputed, x2, y2), bf16 ? 1e-2 : 1e-5);
    }
  }
  SECTION("LLaMA decoder with a frozen embedding input: only the layers' weights train") {
    LlamaConfig c;
    c.vocab_size = 23, c.hidden_size = 16, c.intermediate_size = 24, c.num_hidden_layers = 2, c.num_attention_heads = 2;
    torch::manual_seed(5);
    LlamaForCausalLM plain(c);
    c.gradient_checkpointing = true;
    LlamaForCausalLM recomputed(c);
    {
      torch::NoGradGuard ng;
      for (size_t i = 0; i < plain->parameters().size(); ++i) recomputed->parameters()[i].copy_(plain->parameters()[i]);
    }
    const auto ids = torch::randint(0, 23, {2, 6}, torch::kLong);
    auto y1 = plain->forward(ids), y2 = recomputed->forward(ids);
    CHECK(torch::equal(y1, y2));
    CHECK(has_recompute_node(y2));
    CHECK_FALSE(has_recompute_node(y1));
    const auto no_input = torch::zeros({1});  // ids: no input gradient
    check_close(grads_of(*plain, no_input, y1), grads_of(*recomputed, no_input, y2));
  }
  SECTION("bf16 autocast: a weight the autocast cache would keep still gets its gradient") {
    // at::linear casts its leaf weight and bias through autocast's cache; a cast made in the
    // no-grad first pass and reused by the recompute would carry no graph back to the weight.
    torch::manual_seed(4);
    torch::nn::Linear plain(6, 5), recomputed(6, 5);
    {
      torch::NoGradGuard ng;
      recomputed->weight.copy_(plain->weight);
      recomputed->bias.copy_(plain->bias);
    }
    const auto x0 = torch::randn({3, 6});
    AutocastGuard ac(true);
    auto x1 = x0.clone().requires_grad_(true), x2 = x0.clone().requires_grad_(true);
    auto y1 = torch::linear(x1, plain->weight, plain->bias);
    auto* lin = recomputed.get();
    auto y2 = checkpointed([lin](const torch::Tensor& in) { return torch::linear(in, lin->weight, lin->bias); }, x2,
                           *recomputed);
    CHECK(torch::equal(y1, y2));
    CHECK(has_recompute_node(y2));
    const auto g1 = grads_of(*plain, x1, y1), g2 = grads_of(*recomputed, x2, y2);
    check_close(g1, g2, 1e-2);
  }
  SECTION("nothing to differentiate: no graph is kept") {
    TowerDims c;
    c.hidden_size = 8, c.intermediate_size = 8, c.num_attention_heads = 2, c.gradient_checkpointing = true;
    ClipEncoder frozen(c, 1);
    for (auto& p : frozen->parameters()) p.requires_grad_(false);
    CHECK(frozen->forward(torch::randn({1, 3, 8})).grad_fn() == nullptr);
  }
}

TEST_CASE("VLM patch features stop at the tapped layer and equal the full forward's hidden state", "[bench][vlm]") {
  VisionConfig v;
  v.image_size = 16, v.patch_size = 8, v.hidden_size = 8, v.intermediate_size = 16, v.num_hidden_layers = 3,
  v.num_attention_heads = 2;
  torch::manual_seed(2);
  ClipVisionTransformer tower(v);
  const auto pixels = torch::randn({2, 3, 16, 16});
  const auto full = tower->forward(pixels, true);
  for (int layer : {-4, -2, -1, 0, 2}) {
    INFO(layer);
    const auto f = tower->patch_features(pixels, layer);
    CHECK(f.sizes() == torch::IntArrayRef({2, 4, 8}));
    CHECK(torch::equal(f, select_vision_features(full, layer)));
  }
  // The -2 tap never runs the last layer: poisoning it changes nothing.
  const auto before = tower->patch_features(pixels, -2);
  {
    torch::NoGradGuard ng;
    for (auto& p : tower->encoder->layers[2]->parameters()) p.fill_(NAN);
  }
  CHECK(torch::equal(tower->patch_features(pixels, -2), before));
  CHECK(torch::isnan(tower->patch_features(pixels, -1)).any().item<bool>());
  CHECK_THAT(test::message_of<ConfigError>([&] { tower->patch_features(pixels, -5); }),
             Catch::Contains("vision feature layer -5 is out of range") && Catch::Contains("use -4 .. 3"));
}
