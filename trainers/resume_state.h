// The optimizer and RNG parts of a checkpoint, restored on resume. Kept out of trainers/common.h
// so that only the trainers that resume include it.
#pragma once
#include <torch/torch.h>

#include <string>

namespace trialign {

// Writes an AdamW optimizer's state to `path` (safetensors): per parameter, in parameter-group
// order, "state.{i}.exp_avg", "state.{i}.exp_avg_sq" (and "state.{i}.max_exp_avg_sq" with
// amsgrad) and "state.{i}.step"; the groups' options and sizes in the metadata. Keyed by index,
// not by the tensor addresses torch::save uses, so identical runs write identical bytes.
void save_optimizer_state(torch::optim::Optimizer& optim, const std::string& path);

// Loads `dir`/optimizer.safetensors (or, from checkpoints written before it, optimizer.pt) into
// `optim` and `dir`/rng.safetensors ("torch_cpu") into the CPU generator. A file that does not
// fit (damaged, another model's optimizer, a wrong-size RNG state) is a DataError naming the
// file and what to do, not LibTorch's internal message.
void load_resume_state(const std::string& dir, torch::optim::Optimizer& optim);

}  // namespace trialign
