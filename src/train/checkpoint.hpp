// Training checkpoints: the model (fp32 parameters, config, vocabulary, step and data RNG) in one
// safetensors file and the optimizer's state in another, written so that a run resumes bit for
// bit, and read back with every field checked before live state changes.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "model/gpt.hpp"
#include "nibble/optim.hpp"
#include "train/engine.hpp"
#include "train/trainer.hpp"

namespace nibble::train {

// Where a run stands: steps taken and the training batches' generator.
struct RunPosition {
  std::int64_t step = 0;
  std::array<std::uint64_t, 4> rng{};
};

// Writes `dir`/optimizer.safetensors, then `dir`/model.safetensors (creating `dir`).
void save_checkpoint(const std::filesystem::path& dir, const Engine& gpt, const Optimizer& opt,
                     const std::string& vocab_metadata, const RunPosition& at, const TrainOptions& options);
// Checks the checkpoint in `dir` against this run (model config, vocabulary, step in
// [0, max_step], the optimizer file's step), then loads the parameters into `gpt` and the state
// into `opt`; returns the position to go on from. Throws on a mismatch, leaving the model as it was.
RunPosition resume_from_checkpoint(const std::filesystem::path& dir, const model::GptConfig& config,
                                   const std::string& vocab_metadata, std::int64_t max_step, Engine& gpt,
                                   Optimizer& opt);

// The model a checkpoint holds, for sampling: config, tokenizer vocabulary metadata, parameters.
struct LoadedModel {
  model::GptConfig config;
  std::string vocab_metadata;
  std::vector<float> params;
};
LoadedModel load_model(const std::filesystem::path& checkpoint_dir);

}  // namespace nibble::train
