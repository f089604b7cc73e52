// Scalar arithmetic of masked softmax attention, shared by the CPU and CUDA kernels so that the
// CPU tests exercise the exact expressions the GPU runs. All math is in fp32.
//
// Conventions: a masked key has logit -inf; a row with no visible key keeps running max -inf and
// sum 0, gets output 0 and log-sum-exp +inf, so that exp(logit - lse) is 0 in the backward pass
// for every key of that row (never NaN).
#pragma once

#include <cmath>

#include "host_device.h"

namespace vlfast {
namespace attention_math {

VLFAST_HOST_DEVICE float masked_logit(float dot, float scale, bool visible) {
  return visible ? dot * scale : -INFINITY;
}

// Factor that rescales accumulators when a row's running max grows from old_max to new_max.
VLFAST_HOST_DEVICE float rescale_factor(float old_max, float new_max) {
  return old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
}

// Unnormalised probability of a logit relative to the row's running max.
VLFAST_HOST_DEVICE float unnormalized_prob(float logit, float row_max) {
  return logit == -INFINITY ? 0.0f : expf(logit - row_max);
}

VLFAST_HOST_DEVICE float output_normalizer(float row_sum) {
  return row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
}

VLFAST_HOST_DEVICE float log_sum_exp(float row_max, float row_sum) {
  return row_sum > 0.0f ? row_max + logf(row_sum) : INFINITY;
}

// Backward: the normalised probability, recomputed from the saved log-sum-exp.
VLFAST_HOST_DEVICE float prob_from_lse(float logit, float lse) {
  return lse == INFINITY ? 0.0f : expf(logit - lse);
}

// d(loss)/d(q.k) for one score: softmax backward (p * (dp - rowsum(dO * O))) times the scale.
VLFAST_HOST_DEVICE float score_grad(float prob, float dprob, float delta, float scale) {
  return prob * (dprob - delta) * scale;
}

}  // namespace attention_math
}  // namespace vlfast
