// The optimizer and RNG parts of a checkpoint, restored on resume. Kept out of trainers/common.h
// so that only the trainers that resume include it.
#pragma once
#include <torch/torch.h>

#include <string>

namespace trialign {

// Loads `dir`/optimizer.pt into `optim` and `dir`/rng.safetensors ("torch_cpu") into the CPU
// generator. A file that does not fit (damaged, another model's optimizer, a wrong-size RNG
// state) is a DataError naming the file and what to do, not LibTorch's internal message.
void load_resume_state(const std::string& dir, torch::optim::Optimizer& optim);

}  // namespace trialign
