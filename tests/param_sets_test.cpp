// Tests of the GPT-2-shaped parameter sets: the tensor counts and parameter totals that
// BENCHMARKS.md quotes, names, and lookup by name.
#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <string>

#include "cli/param_sets.hpp"

namespace nibble::cli {
namespace {

TEST(ParamSets, Gpt2SmallMatchesBenchmarks) {
  const auto set = gpt2_124m_shapes();
  EXPECT_EQ(set.size(), 148u);
  EXPECT_EQ(total_elements(set), 124'475'904);
  EXPECT_EQ(set.front().name, "wte");
  EXPECT_EQ(set.front().shape, (std::vector<std::int64_t>{50304, 768}));
  EXPECT_EQ(set[1].name, "wpe");
  EXPECT_EQ(set[1].shape, (std::vector<std::int64_t>{1024, 768}));
  EXPECT_EQ(set[4].name, "h.0.attn.c_attn.weight");
  EXPECT_EQ(set[4].shape, (std::vector<std::int64_t>{768, 2304}));
  EXPECT_EQ(set[set.size() - 3].name, "h.11.mlp.c_proj.bias");
  EXPECT_EQ(set.back().name, "ln_f.bias");
}

TEST(ParamSets, Gpt2XlMatchesBenchmarks) {
  const auto set = gpt2_xl_shapes();
  EXPECT_EQ(set.size(), 580u);
  EXPECT_EQ(total_elements(set), 1'557'686'400);
  EXPECT_EQ(set[set.size() - 3].name, "h.47.mlp.c_proj.bias");
}

TEST(ParamSets, NamesAreUnique) {
  const auto set = gpt2_xl_shapes();
  std::set<std::string> names;
  for (const ParamShape& p : set) names.insert(p.name);
  EXPECT_EQ(names.size(), set.size());
}

TEST(ParamSets, LookupByName) {
  ASSERT_TRUE(param_set_from_name("gpt2-124m").has_value());
  EXPECT_EQ(param_set_from_name("gpt2-124m")->size(), 148u);
  ASSERT_TRUE(param_set_from_name("gpt2-xl").has_value());
  EXPECT_EQ(param_set_from_name("gpt2-xl")->size(), 580u);
  EXPECT_FALSE(param_set_from_name("gpt2-medium").has_value());
}

}  // namespace
}  // namespace nibble::cli
