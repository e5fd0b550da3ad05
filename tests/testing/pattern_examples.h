// Synthetic training data the tiny random model can learn quickly: BOS, two random prompt tokens,
// then six target tokens first_target, first_target + stride, ... (the same for every example).
#ifndef COLLM_TESTING_PATTERN_EXAMPLES_H_
#define COLLM_TESTING_PATTERN_EXAMPLES_H_

#include <cstdint>
#include <random>
#include <vector>

#include "collm/engine/dataset.h"

namespace collm::testing {

inline std::vector<engine::TrainingExample> FixedCompletionExamples(int n, uint32_t seed,
                                                                    int32_t first_target,
                                                                    int32_t stride) {
  std::mt19937 rng(seed);
  std::vector<engine::TrainingExample> out;
  for (int i = 0; i < n; ++i) {
    engine::TrainingExample e;
    // push_back rather than `= {...}`: GCC 12 -O3 warns falsely (-Wnonnull) on that assignment.
    e.tokens.push_back(1);
    for (int k = 0; k < 2; ++k) e.tokens.push_back(static_cast<int32_t>(3 + rng() % 500));
    e.loss_mask.assign(3, 0);
    for (int k = 0; k < 6; ++k) {
      e.tokens.push_back(first_target + k * stride);
      e.loss_mask.push_back(1);
    }
    out.push_back(e);
  }
  return out;
}

}  // namespace collm::testing

#endif  // COLLM_TESTING_PATTERN_EXAMPLES_H_
