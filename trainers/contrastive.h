// Stage 1: contrastive pretraining of the CLIP-style encoder pair (model/clip_model.h) with a
// registered contrastive loss (losses/infonce.h, losses/siglip.h).
//
// Gradient accumulation keeps full-batch negatives (the "gradient cache" scheme, Gao et al. 2021,
// also used by OpenCLIP): embeddings of all micro-batches are computed without a graph, the loss
// over the whole batch is differentiated w.r.t. those embeddings, then each micro-batch is
// re-encoded with a graph and back-propagated with its slice of that gradient. The update equals
// the one-big-batch update exactly (tested), at the cost of a second encoder forward.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "core/run_config.h"
#include "data/caption_dataset.h"
#include "losses/loss.h"
#include "models/clip_model.h"
#include "trainers/common.h"

namespace trialign {

using ContrastiveResult = TrainResult;

// One optimizer step's forward and backward over a batch split into `accum` micro-batches
// (gradients accumulate into the parameters; the caller zeroes and steps). Returns the loss
// over the whole batch and its metrics.
// bf16: run the encoders under bf16 autocast (the loss stays fp32).
LossOutput contrastive_step(ClipModel& model, ContrastiveLossImpl& loss, const CaptionBatch& batch, int accum,
                            bool bf16 = false);

// What the optimizer of stage 1 updates: the encoders' parameters that require grad and the
// loss's own (logit scale / bias), the latter named "loss.<name>".
std::vector<std::pair<std::string, torch::Tensor>> trainable_params(ClipModel& model, ContrastiveLossImpl& loss);

ContrastiveResult train_contrastive(const RunConfig& cfg, const TrainOptions& opt);

// Encodes a whole dataset (no augmentation) and returns retrieval recall for cfg.eval.recall_at,
// plus the mean cosine of matched pairs and of mismatched pairs.
nlohmann::json evaluate_retrieval(ClipModel& model, const CaptionDataset& data, const EvalSection& eval,
                                  bool bf16 = false);

// Builds the model for a config whose text vocab may come from the tokenizer.
ClipModel build_clip_model(RunConfig& cfg, const Tokenizer& tok);

}  // namespace trialign
