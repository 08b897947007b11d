// How much memory a run will need, estimated before the first step from the config and the
// parameter counts, so a run that cannot fit is warned about at start instead of dying in the
// allocator hours later. An upper-bound style estimate, not an accounting: parameters, their
// gradients and AdamW's two moments are exact (fp32); activations kept for backward use the
// per-layer count of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
// Transformer Models", s*b*h*(34 + 5*a*s/h) bytes at 16 bits), doubled for fp32.
#pragma once
#include <cstdint>
#include <string>

#include "core/run_config.h"

namespace trialign {

struct MemoryEstimate {
  double parameters = 0, gradients = 0, optimizer = 0, activations = 0;  // bytes
  double total() const { return parameters + gradients + optimizer + activations; }
};

// Activations of one transformer layer kept for backward: s tokens, b sequences, width h,
// a heads, fp32.
double layer_activation_bytes(double s, double b, double h, double a);
// A stack of `layers` such layers; with activation checkpointing each keeps only its fp32 input
// (4 s b h bytes) and one layer's activations are rebuilt at a time in backward.
double stack_activation_bytes(double s, double b, double h, double a, int layers, bool checkpointed);

// n_params: every parameter of the model(s) held (policy and reference); n_trainable: those the
// optimizer updates.
MemoryEstimate estimate_memory(const RunConfig& cfg, int64_t n_params, int64_t n_trainable);

// Memory this process may use: the cgroup (v2) limit when one is set, else MemAvailable, shared
// by the ranks on this machine; 0 = unknown.
double available_memory_bytes();

// Logs the estimate; warns (and returns the warning) when it exceeds 90% of `available` bytes.
std::string report_memory(const RunConfig& cfg, const MemoryEstimate& m, double available);

}  // namespace trialign
