// The loss a training step reports, defined once for every engine and path (CPU, CUDA eager, CUDA
// graph): each micro-batch's mean per-token loss, summed in double and rounded to float, then the
// mean of those over the accumulated micro-batches, again in double and rounded to float.
#pragma once

#include <cstdint>
#include <span>

namespace nibble::model {

// The mean of one micro-batch's per-token losses.
inline float mean_token_loss(std::span<const float> token_losses) {
  double sum = 0.0;
  for (float x : token_losses) sum += x;
  return token_losses.empty() ? 0.0f : static_cast<float>(sum / static_cast<double>(token_losses.size()));
}

// A step's loss from its micro-batches' losses (each from mean_token_loss).
inline float step_loss(std::span<const float> micro_batch_losses) {
  double sum = 0.0;
  for (float x : micro_batch_losses) sum += x;
  return micro_batch_losses.empty() ? 0.0f
                                    : static_cast<float>(sum / static_cast<double>(micro_batch_losses.size()));
}

// A step's loss from all its per-token losses, micro-batch after micro-batch, `tokens_per_micro`
// each: the same value as step_loss over the micro-batches' mean_token_loss.
inline float step_loss(std::span<const float> token_losses, std::int64_t tokens_per_micro) {
  if (tokens_per_micro <= 0) return 0.0f;
  double sum = 0.0;
  std::int64_t micro_batches = 0;
  for (std::size_t first = 0; first < token_losses.size(); first += static_cast<std::size_t>(tokens_per_micro)) {
    sum += mean_token_loss(token_losses.subspan(first, static_cast<std::size_t>(tokens_per_micro)));
    ++micro_batches;
  }
  return micro_batches == 0 ? 0.0f : static_cast<float>(sum / static_cast<double>(micro_batches));
}

}  // namespace nibble::model
