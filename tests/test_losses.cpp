// Contrastive losses against values worked by hand (see the comments; recomputed independently
// with plain floating point, no torch).
#include <catch2/catch.hpp>

#include <cmath>

#include "core/config_reader.h"
#include "losses/infonce.h"
#include "losses/siglip.h"

using namespace trialign;

namespace {

// img = [[1,0],[0,1]], txt = [[1,0],[0.6,0.8]] (unit rows) -> similarities S = [[1, 0.6], [0, 0.8]].
ContrastiveInputs two_pairs() {
  return {torch::tensor({{1.f, 0.f}, {0.f, 1.f}}), torch::tensor({{1.f, 0.f}, {0.6f, 0.8f}})};
}

}  // namespace

TEST_CASE("InfoNCE matches hand-worked values", "[loss]") {
  // scale 1: i2t rows: CE([1, .6], 0) = log(1 + e^-0.4) = 0.512772, CE([0, .8], 1) = log(1 + e^-0.8) = 0.371100
  //          t2i rows: CE([1, 0], 0) = log(1 + e^-1) = 0.313262, CE([.6, .8], 1) = log(1 + e^-0.2) = 0.598139
  //          loss = ((0.512772 + 0.371100) / 2 + (0.313262 + 0.598139) / 2) / 2 = 0.448879
  InfoNceOptions o;
  o.init_logit_scale = 0.0;
  InfoNceLossImpl loss(o);
  auto out = loss.forward(two_pairs());
  CHECK(out.loss.item<double>() == Approx(0.448879).epsilon(1e-5));
  CHECK(out.metrics.at("logit_scale").item<double>() == Approx(1.0));
  CHECK(out.metrics.at("acc/i2t").item<double>() == Approx(1.0));  // argmax rows: 0, 1
  CHECK(out.metrics.at("acc/t2i").item<double>() == Approx(1.0));  // argmax cols: 0, 1
  CHECK_FALSE(out.metrics.at("acc/i2t").requires_grad());

  // scale 2 (s = ln 2): same recipe on 2S gives 0.298736.
  o.init_logit_scale = std::log(2.0);
  InfoNceLossImpl loss2(o);
  CHECK(loss2.forward(two_pairs()).loss.item<double>() == Approx(0.298736).epsilon(1e-5));
}

TEST_CASE("InfoNCE starts at ln(1/0.07), learns the temperature and clamps it to ln 100", "[loss]") {
  InfoNceLossImpl loss{InfoNceOptions{}};
  CHECK(loss.logit_scale.item<double>() == Approx(std::log(1 / 0.07)));
  auto out = loss.forward(two_pairs());
  out.loss.backward();
  // d loss / d s < 0 here: both pairs already rank first, so a sharper softmax lowers the loss.
  CHECK(loss.logit_scale.grad().item<double>() < 0);
  {
    torch::NoGradGuard ng;
    loss.logit_scale.fill_(7.0);
  }
  loss.post_step();
  CHECK(loss.logit_scale.item<double>() == Approx(std::log(100.0)));
}

TEST_CASE("SigLIP matches hand-worked values", "[loss]") {
  // t = 0, b = 0: logits = S; z = +1 diagonal, -1 off.
  // loss = [softplus(-1) + softplus(0.6) + softplus(0) + softplus(-0.8)] / 2
  //      = [0.313262 + 1.037488 + 0.693147 + 0.371100] / 2 = 1.207499
  SiglipOptions o;
  o.init_logit_scale = 0.0;
  o.init_logit_bias = 0.0;
  SiglipLossImpl loss(o);
  CHECK(loss.forward(two_pairs()).loss.item<double>() == Approx(1.207499).epsilon(1e-5));
  // The paper's init (t = ln 10, b = -10): logits = 10 S - 10 = [[0, -4], [-10, -2]]
  // loss = [softplus(0) + softplus(-4) + softplus(-10) + softplus(2)] / 2 = 1.419135
  SiglipLossImpl init{SiglipOptions{}};
  auto out = init.forward(two_pairs());
  CHECK(out.loss.item<double>() == Approx(1.419135).epsilon(1e-5));
  CHECK(out.metrics.at("logit_bias").item<double>() == Approx(-10.0));
}

TEST_CASE("hard-negative captions join the image->text side of InfoNCE and SigLIP only", "[loss]") {
  // One negative H = [0, 1]: img . H = [0, 1]. Scale 1 (s = 0, b = 0).
  // InfoNCE i2t rows: CE([1, .6, 0], 0) = 0.712067, CE([0, .8, 1], 1) = 0.982352; t2i as without
  // negatives: (0.313262 + 0.598139) / 2. loss = ((0.712067 + 0.982352) / 2 + 0.455701) / 2 = 0.651455
  auto in = two_pairs();
  in.negative_text_embeds = torch::tensor({{0.f, 1.f}});
  InfoNceOptions o;
  o.init_logit_scale = 0.0;
  InfoNceLossImpl infonce(o);
  auto out = infonce.forward(in);
  CHECK(out.loss.item<double>() == Approx(0.651455).epsilon(1e-5));
  CHECK(out.metrics.at("acc/i2t").item<double>() == Approx(0.5));  // image 1 prefers the negative
  CHECK(out.metrics.at("acc/t2i").item<double>() == Approx(1.0));
  // SigLIP: the two (image, negative) pairs are negatives: + [softplus(0) + softplus(1)] / 2
  //       = 1.207499 + (0.693147 + 1.313262) / 2 = 2.210703
  SiglipOptions so;
  so.init_logit_scale = 0.0;
  so.init_logit_bias = 0.0;
  SiglipLossImpl siglip(so);
  CHECK(siglip.forward(in).loss.item<double>() == Approx(2.210703).epsilon(1e-5));
  // An empty negative set is the same as none.
  in.negative_text_embeds = torch::zeros({0, 2});
  CHECK(infonce.forward(in).loss.item<double>() == Approx(0.448879).epsilon(1e-5));
}

TEST_CASE("losses are built from the registry with their own validated options", "[loss][registry]") {
  CHECK(contrastive_losses().names() == std::vector<std::string>{"infonce", "siglip"});
  TypedSpec spec{"infonce", parse_config_string("init_logit_scale: 0.5\nlearnable: false\n", "inline"), "loss"};
  auto loss = contrastive_losses().create_or_throw(spec);
  auto* info = dynamic_cast<InfoNceLossImpl*>(loss.get());
  REQUIRE(info != nullptr);
  CHECK(info->logit_scale.item<double>() == Approx(0.5));
  CHECK_FALSE(info->logit_scale.requires_grad());
}
