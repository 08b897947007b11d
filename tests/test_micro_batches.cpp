// Micro-batches of a step on threads (trainers/micro_batches.h): gradients added in micro-batch
// order equal backward() in order, workers really run at once with their share of the LibTorch
// threads, a failing micro-batch is reported, and the config keys are checked. The trainers'
// equivalences (same losses and weights with and without threads) are in test_vlm.cpp and
// test_train_preference.cpp.
#include <atomic>
#include <chrono>
#include <set>
#include <stdexcept>
#include <thread>

#include "core/errors.h"
#include "test_helpers.h"
#include "trainers/micro_batches.h"

using namespace trialign;

namespace {

// Parameters w [3] and u [2, 2] (u transposed, so its .grad must follow its strides), and v,
// which no loss reaches.
struct Params {
  torch::Tensor w = torch::tensor({1.0f, -2.0f, 0.5f}).requires_grad_();
  torch::Tensor u = torch::tensor({{1.0f, 2.0f}, {3.0f, 4.0f}}).t().requires_grad_();
  torch::Tensor v = torch::zeros({2}).requires_grad_();
  std::vector<torch::Tensor> all() const { return {w, u, v}; }
};

// Micro-batch j's loss: (j + 1) * sum(w * x_j) + sum(u) * j, with x_j = [j, 1, -j]. So
// d/dw = (j + 1) x_j and d/du = j everywhere (the expanded gradient of a sum).
LossOutput micro_loss(const Params& p, int64_t j) {
  const auto x = torch::tensor({static_cast<float>(j), 1.0f, static_cast<float>(-j)});
  LossOutput o;
  o.loss = static_cast<double>(j + 1) * (p.w * x).sum() + p.u.sum() * static_cast<double>(j);
  o.metrics["j"] = torch::tensor(static_cast<double>(j));
  return o;
}

}  // namespace

TEST_CASE("micro-batches on threads: gradients add up in order, as backward() in order does", "[micro_batches]") {
  // Hand-worked for j = 0, 1, 2: dw = x_0 + 2 x_1 + 3 x_2 = [0, 1, 0] + [2, 2, -2] + [6, 3, -6].
  const auto expected_w = torch::tensor({8.0f, 6.0f, -8.0f});
  const auto expected_u = torch::full({2, 2}, 3.0f);  // 0 + 1 + 2
  for (const int threads : {1, 2, 3}) {
    INFO("threads " << threads);
    Params p;
    MicroBatchThreads pool(threads, 2, p.all());
    CHECK(pool.threads() == threads);
    const auto outs = pool.run(3, [&](int64_t j) { return micro_loss(p, j); });
    REQUIRE(outs.size() == 3);
    for (int64_t j = 0; j < 3; ++j) {
      CHECK(outs[static_cast<size_t>(j)].metrics.at("j").item<double>() == static_cast<double>(j));
      CHECK_FALSE(outs[static_cast<size_t>(j)].loss.requires_grad());
    }
    // loss_j: (j + 1) * (w . x_j) + 10 j, w . x_j = j - 2 - 0.5 j = 0.5 j - 2
    CHECK(outs[0].loss.item<double>() == Approx(-2.0));
    CHECK(outs[1].loss.item<double>() == Approx(2 * -1.5 + 10));
    CHECK(outs[2].loss.item<double>() == Approx(3 * -1.0 + 20));
    CHECK(torch::equal(p.w.grad(), expected_w));
    CHECK(torch::equal(p.u.grad(), expected_u));
    CHECK(p.u.grad().strides() == p.u.strides());  // the layout autograd gives a transposed parameter
    CHECK_FALSE(p.v.grad().defined());             // no loss reaches it, as with backward()
    // A second step adds onto what is there (the caller releases .grad between optimizer steps).
    pool.run(1, [&](int64_t j) { return micro_loss(p, j + 1); });
    CHECK(torch::equal(p.w.grad(), expected_w + 2 * torch::tensor({1.0f, 1.0f, -1.0f})));
    CHECK(torch::equal(p.u.grad(), expected_u + 1));
  }
  // The same with run_micro_batches and no pool: backward() in order.
  Params p;
  run_micro_batches(nullptr, 3, [&](int64_t j) { return micro_loss(p, j); });
  CHECK(torch::equal(p.w.grad(), expected_w));
  CHECK(torch::equal(p.u.grad(), expected_u));
}

TEST_CASE("micro-batches on threads: workers run at once, each with its share of the LibTorch threads",
          "[micro_batches]") {
  const int before = at::get_num_threads();
  Params p;
  MicroBatchThreads pool(2, 4, p.all());
  CHECK(at::get_num_threads() == before);  // the caller's count, whatever the workers set for themselves
  std::atomic<int> started{0};
  std::mutex m;
  std::set<std::thread::id> ids;
  std::vector<int> worker_threads(2, 0);
  std::vector<char> met(2, 0);
  pool.run(2, [&](int64_t j) {
    {
      std::lock_guard<std::mutex> lock(m);
      ids.insert(std::this_thread::get_id());
    }
    // After a LibTorch op: its parallel_for (compiled inside LibTorch, with OpenMP) sets the
    // thread's count from the process-wide default on first use, unless the worker did first.
    (void)torch::rand({1 << 16}).exp_().sum().item<float>();
    worker_threads[static_cast<size_t>(j)] = at::get_num_threads();
    // Each micro-batch waits for the other to start: it can only see it when both run at once.
    // (The bound only keeps a broken pool from hanging the suite.)
    ++started;
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (started.load() < 2 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    met[static_cast<size_t>(j)] = started.load() == 2;
    return micro_loss(p, j);
  });
  CHECK(met == std::vector<char>{1, 1});
  CHECK(ids.size() == 2);
  CHECK(ids.count(std::this_thread::get_id()) == 0);
  CHECK(worker_threads == std::vector<int>{2, 2});  // 4 LibTorch threads shared by 2 workers
  CHECK(at::get_num_threads() == before);
}

TEST_CASE("micro-batches on threads: a failing micro-batch is reported and the pool stays usable", "[micro_batches]") {
  Params p;
  MicroBatchThreads pool(2, 2, p.all());
  std::atomic<int> ran{0};
  try {
    pool.run(6, [&](int64_t j) {
      ++ran;
      if (j == 1) throw std::runtime_error("micro-batch 1 broke");
      return micro_loss(p, j);
    });
    FAIL("no exception");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()) == "micro-batch 1 broke");
  }
  // Micro-batches 0 and 1 ran; 2 may have started before 1's failure was known (a worker runs at
  // most one ahead of the additions); none after.
  CHECK(ran.load() >= 2);
  CHECK(ran.load() <= 3);
  // What micro-batch 0 added stays, as with backward() in order; nothing after the failure is added.
  REQUIRE(p.w.grad().defined());
  CHECK(torch::equal(p.w.grad(), torch::tensor({0.0f, 1.0f, 0.0f})));
  p.w.mutable_grad() = torch::Tensor();
  p.u.mutable_grad() = torch::Tensor();
  pool.run(2, [&](int64_t j) { return micro_loss(p, j); });
  CHECK(torch::equal(p.w.grad(), torch::tensor({2.0f, 3.0f, -2.0f})));
}

TEST_CASE("micro-batches on threads: config keys are checked against grad_accum and the trainer", "[micro_batches][config]") {
  const auto error_of = test::message_of<ConfigError>;
  const std::vector<std::string> base = {"data.train=t.jsonl", "data.tokenizer=t.model", "train.batch_size=8"};
  auto with = [&](std::vector<std::string> extra) {
    auto s = base;
    s.insert(s.end(), extra.begin(), extra.end());
    return s;
  };
  CHECK_THAT(error_of([&] {
               test::config_from_overrides(with({"trainer=finetune", "train.micro_batch_threads=2"}), "c");
             }),
             Catch::Contains("train.micro_batch_threads: 2 micro-batches at once, but a step has train.grad_accum = 1; "
                             "set train.grad_accum to a multiple of 2") &&
                 Catch::Contains("or lower train.micro_batch_threads"));
  // Stage 1 gets the one message that applies to it, whatever its grad_accum.
  const auto contrastive = error_of([&] { test::config_from_overrides(with({"train.micro_batch_threads=2"}), "c"); });
  CHECK_THAT(contrastive, Catch::Contains("train.micro_batch_threads: applies to the VLM and preference trainers"));
  CHECK_THAT(contrastive, !Catch::Contains("train.grad_accum = 1"));
  CHECK_THAT(error_of([&] {
               test::config_from_overrides(with({"trainer=finetune", "train.grad_accum=2", "train.micro_batch_threads=2",
                                                 "model.llm.gradient_checkpointing=true"}),
                                           "c");
             }),
             Catch::Contains("model.llm.gradient_checkpointing: cannot be combined with train.micro_batch_threads > 1"));
  CHECK_THAT(error_of([&] { test::config_from_overrides(with({"train.micro_batch_threads=0"}), "c"); }),
             Catch::Contains("train.micro_batch_threads"));
  const auto ok = test::config_from_overrides(
      with({"trainer=preference", "train.grad_accum=4", "train.micro_batch_threads=2"}), "c");
  CHECK(ok.train.micro_batch_threads == 2);
}

TEST_CASE("micro-batches on threads: added in micro-batch order when they finish in reverse, shared gradients copied",
          "[micro_batches]") {
  // In fp32, (1 + 1e8) - 1e8 = 0 but (-1e8 + 1e8) + 1 = 1: the order of the additions shows.
  const std::vector<float> scale = {1.0f, 1e8f, -1e8f};
  auto in_order = [&](int threads) {
    auto w = torch::zeros({1}).requires_grad_();
    MicroBatchThreads pool(threads, threads, {w});
    std::atomic<int> finished{0};
    pool.run(3, [&](int64_t j) {
      // Micro-batch j waits until every later one has finished (bounded so a broken pool fails
      // instead of hanging): they finish 2, 1, 0.
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (threads == 3 && finished.load() < 2 - j && std::chrono::steady_clock::now() < give_up)
        std::this_thread::yield();
      LossOutput o;
      o.loss = (w * scale[static_cast<size_t>(j)]).sum();
      ++finished;
      return o;
    });
    return w.grad().item<float>();
  };
  CHECK(in_order(1) == 0.0f);  // backward() in order
  CHECK(in_order(3) == 0.0f);  // finished in reverse, added in order

  // `a + b` hands both parameters the same gradient tensor: each .grad must be its own.
  auto a = torch::zeros({3}).requires_grad_(), b = torch::zeros({3}).requires_grad_();
  MicroBatchThreads pool(2, 2, {a, b});
  pool.run(2, [&](int64_t j) {
    LossOutput o;
    o.loss = ((a + b) * torch::tensor({1.0f, 2.0f, 3.0f}) * static_cast<double>(j + 1)).sum();
    return o;
  });
  CHECK(torch::equal(a.grad(), torch::tensor({3.0f, 6.0f, 9.0f})));
  CHECK(torch::equal(b.grad(), torch::tensor({3.0f, 6.0f, 9.0f})));
}
