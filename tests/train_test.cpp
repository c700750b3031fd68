// The training loop end to end on the `tiny` model: it learns a generated text with AdamW at fp32
// and 8-bit state, a resumed run equals an uninterrupted one bit for bit, and bad options, data
// and checkpoints fail with a clear error before anything is written.
#include <gtest/gtest.h>

#include <cmath>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/rng.hpp"
#include "nibble/safetensors.hpp"
#include "train/checkpoint.hpp"
#include "train/trainer.hpp"

#include "test_util.hpp"

namespace nibble::train {
namespace {

namespace fs = std::filesystem;

class TrainTest : public ::testing::Test {
 protected:
  // Sentences from a small grammar: predictable enough that a 2-layer model learns it in a few
  // hundred steps, varied enough that it cannot be memorised as one string.
  fs::path write_text(const std::string& name, std::size_t bytes) {
    const char* subjects[] = {"the cat", "a dog", "my friend", "the bird"};
    const char* verbs[] = {"sees", "likes", "finds", "hears"};
    const char* objects[] = {"the sun.", "a tree.", "the sea.", "my hat."};
    Rng rng(5);
    std::string text;
    while (text.size() < bytes) {
      text += subjects[rng.below(4)];
      text += ' ';
      text += verbs[rng.below(4)];
      text += ' ';
      text += objects[rng.below(4)];
      text += '\n';
    }
    const fs::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }

  TrainOptions tiny(const fs::path& data) const {
    TrainOptions o;
    o.preset = "tiny";
    o.data = data;
    o.batch = 8;
    o.seq = 32;
    o.steps = 200;
    o.warmup = 20;
    o.lr = 3e-3f;
    o.eval_every = 0;
    o.eval_batches = 4;
    o.quiet = true;
    return o;
  }

  const test::TempDir temp_;
  const fs::path dir_ = temp_.path();
};

TEST_F(TrainTest, TinyModelLearnsWithAdamWAtFp32And8Bit) {
  const fs::path data = write_text("grammar.txt", 40000);
  for (Precision p : {Precision::kFp32, Precision::kInt8}) {
    SCOPED_TRACE(std::string(precision_name(p)));
    TrainOptions o = tiny(data);
    o.precision = p;
    const TrainSummary s = train(o);
    ASSERT_TRUE(s.first_val_loss && s.last_val_loss);
    // ln(vocabulary of 28) = 3.3 untrained. The grammar's entropy is about 0.45 nats per
    // character; 1.0 after 200 steps means the model has learnt the words and most of the
    // structure. Measured: fp32 and 8-bit both end near 0.6.
    EXPECT_GT(*s.first_val_loss, 3.0f);
    EXPECT_LT(*s.last_val_loss, 1.0f);
    EXPECT_EQ(s.steps, 200);
    EXPECT_GT(s.state_bytes, 0);
  }
}

// Schedule-free AdamW on a constant schedule (its own warm-up) learns like AdamW does above.
TEST_F(TrainTest, TinyModelLearnsWithScheduleFreeAdamW) {
  const fs::path data = write_text("grammar.txt", 40000);
  TrainOptions o = tiny(data);
  o.algorithm = Algorithm::kAdamWScheduleFree;
  o.schedule = ScheduleKind::kConstant;
  o.hyper = {{"warmup_steps", 20.0}};
  const TrainSummary s = train(o);
  ASSERT_TRUE(s.first_val_loss && s.last_val_loss);
  EXPECT_GT(*s.first_val_loss, 3.0f);
  EXPECT_LT(*s.last_val_loss, 1.0f);
  EXPECT_EQ(s.steps, 200);
}

TEST_F(TrainTest, ResumedRunEqualsUninterruptedRunBitForBit) {
  const fs::path data = write_text("grammar.txt", 20000);
  for (Algorithm a : {Algorithm::kAdamW, Algorithm::kSophiaG, Algorithm::kAdamWScheduleFree}) {
    for (Precision p : {Precision::kFp32, Precision::kInt8, Precision::kFp8}) {
      SCOPED_TRACE(std::string(algorithm_name(a)) + " " + std::string(precision_name(p)));
      TrainOptions o = tiny(data);
      o.algorithm = a;
      o.precision = p;
      o.steps = 12;
      // Schedule-free AdamW evaluates (and ends) at x: evaluations at 4 and 8 move the parameters
      // to x and back to y in both runs, and the checkpoint of step 6 is taken at y.
      o.eval_every = 4;
      o.hessian_every = 3;
      o.dropout = 0.1f;
      o.accum = 2;
      o.save_every = 12;
      o.checkpoint_dir = dir_ / "full";
      std::vector<float> full_losses;
      train(o, [&](const StepLog& l) { full_losses.push_back(l.loss); });

      // The same 12-step run (same schedule), saved at step 6 and abandoned during step 7.
      TrainOptions first = o;
      first.checkpoint_dir = dir_ / "split";
      first.save_every = 6;
      std::vector<float> split_losses;
      struct Stop {};
      try {
        train(first, [&](const StepLog& l) {
          if (l.step == 7) throw Stop{};
          split_losses.push_back(l.loss);
        });
      } catch (const Stop&) {
      }
      ASSERT_EQ(split_losses.size(), 6u);
      TrainOptions tail = first;
      tail.resume = true;
      tail.save_every = 12;
      train(tail, [&](const StepLog& l) { split_losses.push_back(l.loss); });
      ASSERT_EQ(split_losses.size(), full_losses.size());
      for (std::size_t i = 0; i < full_losses.size(); ++i) EXPECT_EQ(split_losses[i], full_losses[i]) << "step " << i + 1;
      EXPECT_EQ(test::read_text(dir_ / "full" / "model.safetensors"), test::read_text(dir_ / "split" / "model.safetensors"));
      EXPECT_EQ(test::read_text(dir_ / "full" / "optimizer.safetensors"), test::read_text(dir_ / "split" / "optimizer.safetensors"));
      fs::remove_all(dir_ / "full");
      fs::remove_all(dir_ / "split");
    }
  }
}

TEST_F(TrainTest, BadOptionsAndDataAreRefusedClearly) {
  const fs::path data = write_text("grammar.txt", 5000);
  auto expect_error = [&](TrainOptions o, const std::string& needle) {
    try {
      train(o);
      ADD_FAILURE() << "accepted; expected an error containing '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  TrainOptions o = tiny(data);
  o.preset = "enormous";
  expect_error(o, "enormous");
  o = tiny(data);
  o.heads = 3;
  expect_error(o, "divisible");
  o = tiny(data);
  o.batch = 0;
  expect_error(o, "batch");
  o = tiny(data);
  o.seq = 65;  // the tiny context is 64
  expect_error(o, "65");
  o = tiny(data);
  o.save_every = 5;
  expect_error(o, "checkpoint directory");
  o = tiny(dir_ / "missing.txt");
  expect_error(o, "missing.txt");
  std::ofstream(dir_ / "empty.txt").flush();
  o = tiny(dir_ / "empty.txt");
  expect_error(o, "empty");
  std::ofstream(dir_ / "short.txt") << "too short";
  o = tiny(dir_ / "short.txt");
  expect_error(o, "short.txt");
}

TEST_F(TrainTest, CorruptOrMismatchedCheckpointIsRefusedAndLeftAlone) {
  const fs::path data = write_text("grammar.txt", 20000);
  TrainOptions o = tiny(data);
  o.steps = 4;
  o.save_every = 4;
  o.checkpoint_dir = dir_ / "ckpt";
  train(o);
  const std::string model_bytes = test::read_text(dir_ / "ckpt" / "model.safetensors");
  const std::string opt_bytes = test::read_text(dir_ / "ckpt" / "optimizer.safetensors");

  TrainOptions r = o;
  r.resume = true;
  r.steps = 8;
  r.width = 32;  // another model
  r.heads = 2;
  EXPECT_THROW(train(r), StateMismatch);
  r = o;
  r.resume = true;
  r.steps = 8;
  r.precision = Precision::kInt8;  // another optimizer state
  EXPECT_THROW(train(r), StateMismatch);
  r = o;
  r.resume = true;
  r.steps = 2;  // the checkpoint is past the run's end
  EXPECT_THROW(train(r), FormatError);
  EXPECT_EQ(test::read_text(dir_ / "ckpt" / "model.safetensors"), model_bytes);
  EXPECT_EQ(test::read_text(dir_ / "ckpt" / "optimizer.safetensors"), opt_bytes);

  // A model file without the vocabulary it was trained on: refused by name, nothing changed.
  {
    SafetensorsFile f = load_safetensors(dir_ / "ckpt" / "model.safetensors");
    f.metadata.erase("vocab_bytes");
    std::vector<TensorView> views;
    for (const NamedTensor& t : f.tensors) views.push_back({t.name, t.tensor.dtype(), t.tensor.shape(), t.tensor.data()});
    save_safetensors(dir_ / "ckpt" / "model.safetensors", views, f.metadata);
  }
  r = o;
  r.resume = true;
  r.steps = 8;
  EXPECT_THROW(
      {
        try {
          train(r);
        } catch (const FormatError& e) {
          EXPECT_NE(std::string(e.what()).find("'vocab_bytes' is missing"), std::string::npos) << e.what();
          throw;
        }
      },
      FormatError);
  EXPECT_THROW(load_model(dir_ / "ckpt"), FormatError);
  EXPECT_EQ(test::read_text(dir_ / "ckpt" / "optimizer.safetensors"), opt_bytes);

  // A truncated model file.
  std::ofstream(dir_ / "ckpt" / "model.safetensors", std::ios::binary | std::ios::trunc)
      << model_bytes.substr(0, model_bytes.size() / 2);
  r = o;
  r.resume = true;
  r.steps = 8;
  EXPECT_THROW(train(r), FormatError);
  EXPECT_EQ(test::read_text(dir_ / "ckpt" / "optimizer.safetensors"), opt_bytes);
  EXPECT_THROW(load_model(dir_ / "ckpt"), FormatError);
  EXPECT_THROW(load_model(dir_ / "nowhere"), IoError);
}

TEST_F(TrainTest, CheckpointLoadsForSampling) {
  const fs::path data = write_text("grammar.txt", 20000);
  TrainOptions o = tiny(data);
  o.steps = 2;
  o.save_every = 2;
  o.checkpoint_dir = dir_ / "ckpt";
  train(o);
  const LoadedModel m = load_model(dir_ / "ckpt");
  EXPECT_EQ(m.config.layers, 2);
  EXPECT_EQ(m.config.width, 64);
  EXPECT_EQ(static_cast<std::int64_t>(m.params.size()), model::gpt_param_count(m.config));
  EXPECT_FALSE(m.vocab_metadata.empty());
}

// nanoGPT's model (no biases, exact GELU): it learns, its checkpoint records it and resumes bit for
// bit, a run of GPT-2's model refuses that checkpoint (and the other way round), and GPT-2's files
// carry no new metadata.
TEST_F(TrainTest, NanoGptModelOptionsTrainSaveAndResume) {
  const fs::path data = write_text("grammar.txt", 40000);
  TrainOptions o = tiny(data);
  o.bias = false;
  o.gelu = model::Gelu::kExact;
  o.save_every = 200;
  o.checkpoint_dir = dir_ / "nano";
  const TrainSummary s = train(o);
  ASSERT_TRUE(s.last_val_loss);
  EXPECT_LT(*s.last_val_loss, 1.0f);  // as GPT-2's model in TinyModelLearnsWithAdamWAtFp32And8Bit
  const LoadedModel m = load_model(dir_ / "nano");
  EXPECT_FALSE(m.config.bias);
  EXPECT_EQ(m.config.gelu, model::Gelu::kExact);
  EXPECT_EQ(static_cast<std::int64_t>(m.params.size()), model::gpt_param_count(m.config));
  const SafetensorsFile f = load_safetensors(dir_ / "nano" / "model.safetensors");
  for (const NamedTensor& t : f.tensors) EXPECT_FALSE(t.name.ends_with(".bias")) << t.name;

  // Resumed at step 6 of 12 equals the uninterrupted run.
  o.steps = 12;
  o.save_every = 12;
  o.checkpoint_dir = dir_ / "full";
  std::vector<float> full;
  train(o, [&](const StepLog& l) { full.push_back(l.loss); });
  TrainOptions first = o;
  first.steps = 12;
  first.save_every = 6;
  first.checkpoint_dir = dir_ / "split";
  std::vector<float> split;
  struct Stop {};
  try {
    train(first, [&](const StepLog& l) {
      if (l.step == 7) throw Stop{};
      split.push_back(l.loss);
    });
  } catch (const Stop&) {
  }
  TrainOptions tail = first;
  tail.resume = true;
  tail.save_every = 12;
  train(tail, [&](const StepLog& l) { split.push_back(l.loss); });
  EXPECT_EQ(split, full);
  EXPECT_EQ(test::read_text(dir_ / "full" / "model.safetensors"), test::read_text(dir_ / "split" / "model.safetensors"));

  // Another model's run refuses the checkpoint, naming both models; nothing is changed.
  const std::string bytes = test::read_text(dir_ / "split" / "model.safetensors");
  TrainOptions gpt2 = tail;
  gpt2.steps = 16;
  gpt2.bias = true;
  gpt2.gelu = model::Gelu::kTanh;
  try {
    train(gpt2);
    ADD_FAILURE() << "GPT-2's model resumed nanoGPT's checkpoint";
  } catch (const StateMismatch& e) {
    EXPECT_NE(std::string(e.what()).find("no biases, exact GELU"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("biases, tanh GELU"), std::string::npos) << e.what();
  }
  TrainOptions tanh_only = tail;
  tanh_only.steps = 16;
  tanh_only.gelu = model::Gelu::kTanh;
  EXPECT_THROW(train(tanh_only), StateMismatch);
  EXPECT_EQ(test::read_text(dir_ / "split" / "model.safetensors"), bytes);

  // GPT-2's model writes neither key: its files are as before these options existed.
  TrainOptions plain = tiny(data);
  plain.steps = 1;
  plain.save_every = 1;
  plain.checkpoint_dir = dir_ / "plain";
  train(plain);
  const SafetensorsFile p = load_safetensors(dir_ / "plain" / "model.safetensors");
  EXPECT_EQ(p.metadata.count("bias"), 0u);
  EXPECT_EQ(p.metadata.count("gelu"), 0u);
}

}  // namespace
}  // namespace nibble::train

namespace nibble::train {
namespace {

// Random tokens at a given vocabulary: the model takes that vocabulary, the loss starts near
// log(V) (nothing to learn beyond token frequencies), and the data options exclude each other.
TEST(TrainRandomTokens, ModelTakesTheVocabularyAndLossStartsAtLogV) {
  TrainOptions o;
  o.preset = "tiny";
  o.random_vocab = 500;
  o.batch = 2;
  o.seq = 16;
  o.steps = 2;
  o.warmup = 1;
  o.eval_every = 0;
  o.eval_batches = 1;
  o.quiet = true;
  const TrainSummary s = train(o);
  EXPECT_EQ(s.steps, 2);
  ASSERT_TRUE(s.first_val_loss.has_value());
  EXPECT_NEAR(*s.first_val_loss, std::log(500.0f), 0.1f);
  EXPECT_EQ(s.plan.params, 4 * model::gpt_param_count([] {
                             model::GptConfig c = model::gpt_preset("tiny");
                             c.vocab = 500;
                             return c;
                           }()));
  o.data = "some-file.txt";
  EXPECT_THROW(train(o), InvalidArgument);
  o.data.clear();
  o.random_vocab = -3;
  EXPECT_THROW(train(o), InvalidArgument);
}

}  // namespace
}  // namespace nibble::train
