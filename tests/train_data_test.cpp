// Tests of the training data layer: the character tokenizer and its metadata, the text dataset's
// split and batches, one case per rejected input, and the default corpus (the fortunes package).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/rng.hpp"
#include "train/data.hpp"

#include "test_util.hpp"

namespace nibble::train {
namespace {

namespace fs = std::filesystem;
using test::TempDir;
using test::thrown_message;
using test::write_file;

// `length` bytes of varied text with every position's byte a known function of the position, so
// that a window can be located in the text.
std::string sample_text(std::size_t length) {
  const std::string_view alphabet = "abcdefghijklmnopqrstuvwxyz ,.\nABCDEFGHIJ";
  std::string text(length, ' ');
  for (std::size_t i = 0; i < length; ++i) text[i] = alphabet[(i * 7 + i / 13) % alphabet.size()];
  return text;
}

// Whether `text` contains `part`, shown in full when it does not.
::testing::AssertionResult contains(const std::string& text, std::string_view part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "\"" << text << "\" does not contain \"" << part << "\"";
}

// ---------------------------------------------------------------------------------------------
// CharTokenizer

TEST(CharTokenizer, VocabularyIsTheSortedDistinctBytes) {
  const CharTokenizer tokenizer("hello, world\n\xff");
  const std::vector<std::uint8_t> expected = {'\n', ' ', ',', 'd', 'e', 'h', 'l', 'o', 'r', 'w', 0xff};
  EXPECT_EQ(tokenizer.vocabulary(), expected);
  EXPECT_EQ(tokenizer.size(), 11);
  EXPECT_TRUE(std::is_sorted(tokenizer.vocabulary().begin(), tokenizer.vocabulary().end()));
}

TEST(CharTokenizer, IdsAreRanksInTheVocabulary) {
  const CharTokenizer tokenizer("cab");
  EXPECT_EQ(tokenizer.encode("abcabc"), (std::vector<std::int32_t>{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(tokenizer.encode(""), std::vector<std::int32_t>{});
}

TEST(CharTokenizer, RoundTripsEveryByte) {
  std::string text;
  for (int byte = 255; byte >= 0; --byte) text += static_cast<char>(byte);
  text += "repeated text, repeated text";
  const CharTokenizer tokenizer(text);
  EXPECT_EQ(tokenizer.size(), 256);
  const std::vector<std::int32_t> ids = tokenizer.encode(text);
  ASSERT_EQ(ids.size(), text.size());
  EXPECT_EQ(ids[0], 255);
  EXPECT_EQ(ids[255], 0);
  EXPECT_EQ(tokenizer.decode(ids), text);
}

TEST(CharTokenizer, EncodeNamesAnUnknownByteAndItsPosition) {
  const CharTokenizer tokenizer("abc");
  std::string message = thrown_message<InvalidArgument>([&] { tokenizer.encode("abcz"); });
  EXPECT_TRUE(contains(message, "'z'"));
  EXPECT_TRUE(contains(message, "position 3"));
  message = thrown_message<InvalidArgument>([&] { tokenizer.encode(std::string("a\x07", 2)); });
  EXPECT_TRUE(contains(message, "\\x07"));
  EXPECT_TRUE(contains(message, "position 1"));
  message = thrown_message<InvalidArgument>([&] { tokenizer.encode("ab\xe9"); });
  EXPECT_TRUE(contains(message, "\\xE9"));
  EXPECT_TRUE(contains(message, "position 2"));
}

TEST(CharTokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  const CharTokenizer tokenizer("abc");
  const std::vector<std::int32_t> too_big = {0, 3};
  EXPECT_TRUE(contains(thrown_message<InvalidArgument>([&] { tokenizer.decode(too_big); }), "token id 3 at position 1"));
  const std::vector<std::int32_t> negative = {-1};
  EXPECT_TRUE(contains(thrown_message<InvalidArgument>([&] { tokenizer.decode(negative); }), "token id -1"));
}

TEST(CharTokenizer, EmptyTextIsRejected) {
  EXPECT_THROW(CharTokenizer(""), InvalidArgument);
}

TEST(CharTokenizer, MetadataRoundTrips) {
  const CharTokenizer tokenizer(std::string("\x00\x01 hello \xff", 10));
  const std::string metadata = tokenizer.to_metadata();
  EXPECT_EQ(metadata, "[0,1,32,101,104,108,111,255]");
  const CharTokenizer loaded = CharTokenizer::from_metadata(metadata);
  EXPECT_EQ(loaded, tokenizer);
  EXPECT_EQ(loaded.to_metadata(), metadata);
  EXPECT_EQ(loaded.encode("hello"), tokenizer.encode("hello"));
  // Whitespace is allowed; the format is JSON, not a fixed string.
  EXPECT_EQ(CharTokenizer::from_metadata(" [ 0, 1, 32, 101, 104, 108, 111, 255 ]\n"), tokenizer);
}

TEST(CharTokenizer, MetadataRejectsEachMalformedInput) {
  struct Case {
    std::string metadata;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"", "not valid JSON"},
      {"[1, 2", "not valid JSON"},
      {"{\"vocab\": [1, 2]}", "array"},
      {"\"abc\"", "array"},
      {"42", "array"},
      {"[]", "empty"},
      {"[65, \"B\"]", "entry 1"},
      {"[65, 66.5]", "not an integer"},
      {"[65, true]", "not an integer"},
      {"[-1, 65]", "outside the byte range"},
      {"[65, 256]", "outside the byte range"},
      {"[65, 18446744073709551615]", "outside the byte range"},
      {"[65, 66, 66]", "entry 2 repeats byte 66"},
      {"[65, 67, 66]", "not sorted"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.metadata);
    EXPECT_TRUE(contains(thrown_message<FormatError>([&] { CharTokenizer::from_metadata(c.metadata); }), c.says));
  }
}

// ---------------------------------------------------------------------------------------------
// TextDataset

TEST(TextDataset, SplitsContiguouslyNinetyTen) {
  TempDir dir;
  const std::string text = sample_text(1000);
  const fs::path path = write_file(dir / "corpus.txt", text);
  const TextDataset dataset(path, 16);
  EXPECT_EQ(dataset.name(), path.string());
  EXPECT_EQ(dataset.context(), 16);
  EXPECT_EQ(dataset.total_tokens(), 1000);
  EXPECT_EQ(dataset.token_count(Split::kTrain), 900);
  EXPECT_EQ(dataset.token_count(Split::kValidation), 100);
  EXPECT_EQ(dataset.tokenizer(), CharTokenizer(text));
  EXPECT_EQ(dataset.tokenizer().decode(dataset.tokens(Split::kTrain)), text.substr(0, 900));
  EXPECT_EQ(dataset.tokenizer().decode(dataset.tokens(Split::kValidation)), text.substr(900));
}

TEST(TextDataset, ValidationFractionIsConfigurable) {
  const TextDataset quarter("quarter", sample_text(1000), 8, 0.25);
  EXPECT_EQ(quarter.token_count(Split::kTrain), 750);
  EXPECT_EQ(quarter.token_count(Split::kValidation), 250);
  EXPECT_DOUBLE_EQ(quarter.validation_fraction(), 0.25);
  // Rounded to the nearest token: 0.29 * 100 is 28.999... in binary floating point.
  const TextDataset rounded("rounded", sample_text(100), 8, 0.29);
  EXPECT_EQ(rounded.token_count(Split::kValidation), 29);
  EXPECT_EQ(rounded.token_count(Split::kTrain), 71);
}

TEST(TextDataset, RejectsBadContextAndFraction) {
  const std::string text = sample_text(1000);
  EXPECT_TRUE(contains(thrown_message<InvalidArgument>([&] { TextDataset("t", text, 0); }), "context"));
  EXPECT_TRUE(contains(thrown_message<InvalidArgument>([&] { TextDataset("t", text, -5); }), "got -5"));
  for (const double fraction : {0.0, 1.0, -0.1, 1.5, std::nan("")}) {
    SCOPED_TRACE(fraction);
    EXPECT_TRUE(contains(thrown_message<InvalidArgument>([&] { TextDataset("t", text, 8, fraction); }),
                "validation fraction"));
  }
}

// Finds `window` in `split`'s tokens; -1 when absent.
std::int64_t find_window(const TextDataset& dataset, Split split, std::span<const std::int32_t> window) {
  const std::span<const std::int32_t> source = dataset.tokens(split);
  const auto it = std::search(source.begin(), source.end(), window.begin(), window.end());
  return it == source.end() ? -1 : it - source.begin();
}

TEST(TextDataset, BatchesAreShiftedWindowsInsideTheSplit) {
  const TextDataset dataset("batches", sample_text(20000), 32);
  constexpr std::int64_t B = 8, T = 32;
  for (const Split split : {Split::kTrain, Split::kValidation}) {
    SCOPED_TRACE(std::string(split_name(split)));
    Rng rng(7);
    std::vector<std::int32_t> inputs(B * T, -1), targets(B * T, -1);
    for (int draw = 0; draw < 20; ++draw) {
      dataset.sample_batch(split, B, T, rng, inputs.data(), targets.data());
      for (std::int64_t b = 0; b < B; ++b) {
        const std::int32_t* in = inputs.data() + b * T;
        const std::int32_t* out = targets.data() + b * T;
        for (std::int64_t t = 0; t + 1 < T; ++t) ASSERT_EQ(out[t], in[t + 1]);
        // inputs followed by the last target is one window of T + 1 tokens of this split.
        std::vector<std::int32_t> window(in, in + T);
        window.push_back(out[T - 1]);
        ASSERT_GE(find_window(dataset, split, window), 0) << "row " << b << " is not a window of the split";
      }
    }
  }
}

TEST(TextDataset, BatchStartsCoverTheWholeSplitUniformly) {
  // A text of distinct-enough positions: every byte value from a counter, so a window's first
  // token identifies its start. 60 tokens of validation, T = 4: starts 0..55 are all possible.
  std::string text;
  for (int i = 0; i < 600; ++i) text += static_cast<char>(0x20 + i % 90);
  const TextDataset dataset("uniform", text, 4);
  ASSERT_EQ(dataset.token_count(Split::kValidation), 60);
  std::set<std::int64_t> starts;
  Rng rng(3);
  std::vector<std::int32_t> inputs(4), targets(4);
  std::int64_t first_seen = 0, last_seen = 0;
  for (int draw = 0; draw < 5000; ++draw) {
    dataset.sample_batch(Split::kValidation, 1, 4, rng, inputs.data(), targets.data());
    std::vector<std::int32_t> window(inputs);
    window.push_back(targets.back());
    const std::int64_t start = find_window(dataset, Split::kValidation, window);
    ASSERT_GE(start, 0);
    ASSERT_LE(start, 55);
    starts.insert(start);
    first_seen += start == 0;
    last_seen += start == 55;
  }
  EXPECT_EQ(starts.size(), 56u);
  // 5000 / 56 = 89 expected each; bounds are over 6 standard deviations wide.
  EXPECT_GT(first_seen, 30);
  EXPECT_GT(last_seen, 30);
}

TEST(TextDataset, SameSeedSameBatchDifferentSeedDifferentBatch) {
  const TextDataset dataset("seeds", sample_text(50000), 64);
  constexpr std::int64_t B = 4, T = 64;
  auto batch_for = [&](std::uint64_t seed) {
    Rng rng(seed);
    std::vector<std::int32_t> inputs(B * T), targets(B * T);
    dataset.sample_batch(Split::kTrain, B, T, rng, inputs.data(), targets.data());
    return std::pair(inputs, targets);
  };
  EXPECT_EQ(batch_for(42), batch_for(42));
  EXPECT_NE(batch_for(42).first, batch_for(43).first);

  // A restored Rng state resumes the same stream of batches.
  Rng rng(9);
  std::vector<std::int32_t> inputs(B * T), targets(B * T);
  dataset.sample_batch(Split::kTrain, B, T, rng, inputs.data(), targets.data());
  const auto saved = rng.state();
  dataset.sample_batch(Split::kTrain, B, T, rng, inputs.data(), targets.data());
  const std::vector<std::int32_t> expected = inputs;
  rng.set_state(saved);
  dataset.sample_batch(Split::kTrain, B, T, rng, inputs.data(), targets.data());
  EXPECT_EQ(inputs, expected);
}

TEST(TextDataset, ShorterSequencesThanTheContextWork) {
  const TextDataset dataset("short seq", sample_text(1000), 64);
  Rng rng(1);
  std::vector<std::int32_t> inputs(3 * 5), targets(3 * 5);
  dataset.sample_batch(Split::kValidation, 3, 5, rng, inputs.data(), targets.data());
  for (std::int64_t b = 0; b < 3; ++b) {
    for (std::int64_t t = 0; t + 1 < 5; ++t) EXPECT_EQ(targets[b * 5 + t], inputs[b * 5 + t + 1]);
  }
}

TEST(TextDataset, SampleBatchRejectsBadArguments) {
  const TextDataset dataset("args", sample_text(1000), 16);
  Rng rng(1);
  std::vector<std::int32_t> inputs(64), targets(64);
  EXPECT_TRUE(contains(thrown_message<InvalidArgument>(
                  [&] { dataset.sample_batch(Split::kTrain, 0, 8, rng, inputs.data(), targets.data()); }),
              "batch size"));
  EXPECT_TRUE(contains(thrown_message<InvalidArgument>(
                  [&] { dataset.sample_batch(Split::kTrain, 2, 17, rng, inputs.data(), targets.data()); }),
              "got 17"));
  EXPECT_TRUE(contains(thrown_message<InvalidArgument>(
                  [&] { dataset.sample_batch(Split::kTrain, 2, 0, rng, inputs.data(), targets.data()); }),
              "sequence length"));
  EXPECT_THROW(dataset.sample_batch(Split::kTrain, 2, 8, rng, nullptr, targets.data()), InvalidArgument);
  EXPECT_THROW(dataset.sample_batch(Split::kTrain, 2, 8, rng, inputs.data(), nullptr), InvalidArgument);
}

TEST(TextDataset, MissingFileIsAnIoError) {
  TempDir dir;
  const fs::path path = dir / "no_such_file.txt";
  const std::string message = thrown_message<IoError>([&] { TextDataset(path, 8); });
  EXPECT_TRUE(contains(message, path.string()));
  EXPECT_TRUE(contains(message, "No such file"));
}

TEST(TextDataset, DirectoryIsAnIoError) {
  TempDir dir;
  const std::string message = thrown_message<IoError>([&] { TextDataset(dir.path(), 8); });
  EXPECT_TRUE(contains(message, dir.path().string()));
  EXPECT_TRUE(contains(message, "directory"));
}

TEST(TextDataset, EmptyFileIsRejected) {
  TempDir dir;
  const fs::path path = write_file(dir / "empty.txt", "");
  const std::string message = thrown_message<InvalidArgument>([&] { TextDataset(path, 8); });
  EXPECT_TRUE(contains(message, path.string()));
  EXPECT_TRUE(contains(message, "empty"));
}

TEST(TextDataset, BinaryFileWithANulByteIsRejected) {
  TempDir dir;
  std::string text = sample_text(1000);
  text[500] = '\0';
  const fs::path path = write_file(dir / "nul.bin", text);
  const std::string message = thrown_message<InvalidArgument>([&] { TextDataset(path, 8); });
  EXPECT_TRUE(contains(message, path.string()));
  EXPECT_TRUE(contains(message, "binary"));
  EXPECT_TRUE(contains(message, "offset 500"));
}

TEST(TextDataset, BinaryFileWithManyControlBytesIsRejected) {
  TempDir dir;
  std::string text = sample_text(1000);
  // 101 of 1000 bytes are control bytes: just over the 10% a text may hold.
  for (int i = 0; i < 101; ++i) text[i * 9] = static_cast<char>(i % 2 == 0 ? 0x01 : 0x1B);
  const fs::path path = write_file(dir / "controls.bin", text);
  const std::string message = thrown_message<InvalidArgument>([&] { TextDataset(path, 8); });
  EXPECT_TRUE(contains(message, path.string()));
  EXPECT_TRUE(contains(message, "101 of its 1000 bytes"));

  // Exactly 10% is still text, and \t \n \r \f never count.
  text = sample_text(1000);
  for (int i = 0; i < 100; ++i) text[i * 9] = '\x07';
  for (int i = 0; i < 200; ++i) text[i * 5 + 1] = "\t\n\r\f"[i % 4];
  EXPECT_NO_THROW(TextDataset("tabs and bells", text, 8));
}

TEST(TextDataset, TooShortForTheTrainSplitIsRejected) {
  TempDir dir;
  // With a validation fraction of 0.9, 100 bytes leave 10 training tokens: fewer than T + 1 = 17.
  const fs::path path = write_file(dir / "short_train.txt", sample_text(100));
  const std::string message = thrown_message<InvalidArgument>([&] { TextDataset(path, 16, 0.9); });
  EXPECT_TRUE(contains(message, path.string()));
  EXPECT_TRUE(contains(message, "100 bytes give 10 training and 90 validation tokens"));
  EXPECT_TRUE(contains(message, "at least 17"));
  // 166 bytes: round(149.4) = 149 validation and 17 training tokens; 165 rounds 148.5 up to 149
  // validation tokens and leaves 16.
  EXPECT_TRUE(contains(message, "at least 166 bytes"));
  EXPECT_NO_THROW(TextDataset("just long enough", sample_text(166), 16, 0.9));
  EXPECT_THROW(TextDataset("one byte short", sample_text(165), 16, 0.9), InvalidArgument);
}

TEST(TextDataset, TooShortForTheValidationSplitIsRejected) {
  TempDir dir;
  // 100 bytes: 90 training tokens are plenty for T = 16, but 10 validation tokens are not.
  const fs::path path = write_file(dir / "short_validation.txt", sample_text(100));
  const std::string message = thrown_message<InvalidArgument>([&] { TextDataset(path, 16); });
  EXPECT_TRUE(contains(message, path.string()));
  EXPECT_TRUE(contains(message, "90 training and 10 validation tokens"));
  EXPECT_TRUE(contains(message, "at least 17"));
  // 17 validation tokens need 0.1 * n >= 16.5 once rounded, so n = 165.
  EXPECT_TRUE(contains(message, "at least 165 bytes"));
  EXPECT_NO_THROW(TextDataset("just long enough", sample_text(165), 16));
  EXPECT_THROW(TextDataset("one byte short", sample_text(164), 16), InvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// The default corpus

TEST(DefaultCorpus, LoadsTheFortunesPackage) {
  if (!fs::is_directory(default_corpus_path())) {
    GTEST_SKIP() << default_corpus_path() << " is missing: install the fortunes package (scripts/setup does)";
  }
  const std::string corpus = default_corpus();
  EXPECT_GT(corpus.size(), 100'000u);
  const TextDataset dataset(default_corpus_description(), corpus, 256);
  EXPECT_GE(dataset.tokenizer().size(), 60);
  EXPECT_EQ(dataset.total_tokens(), static_cast<std::int64_t>(corpus.size()));
  EXPECT_TRUE(contains(dataset.name(), "fortunes"));
  // Deterministic: a second read is byte for byte the same.
  EXPECT_EQ(default_corpus(), corpus);
}

TEST(DefaultCorpus, ConcatenatesPlainFilesInNameOrderAndSkipsTheRest) {
  TempDir dir;
  write_file(dir / "zeta", "last\n%\n");
  write_file(dir / "alpha", "first\n%\n");
  write_file(dir / "middle", "no final newline");
  write_file(dir / "alpha.dat", std::string("\x00\x01\x02", 3));
  write_file(dir / ".hidden", "hidden\n");
  fs::create_symlink("alpha", dir / "alpha.u8");
  fs::create_symlink("zeta", dir / "link");
  fs::create_directory(dir / "off");
  write_file(dir / "off" / "inside", "inside\n");
  EXPECT_EQ(default_corpus(dir.path()), "first\n%\nno final newline\nlast\n%\n");
}

TEST(DefaultCorpus, MissingDirectorySaysToInstallFortunes) {
  TempDir dir;
  const fs::path missing = dir / "fortunes";
  std::string message = thrown_message<IoError>([&] { default_corpus(missing); });
  EXPECT_TRUE(contains(message, missing.string()));
  EXPECT_TRUE(contains(message, "fortunes"));
  EXPECT_TRUE(contains(message, "scripts/setup"));

  // A directory with only index files holds no corpus either.
  write_file(dir / "cookie.dat", "index");
  message = thrown_message<IoError>([&] { default_corpus(dir.path()); });
  EXPECT_TRUE(contains(message, "no fortune files"));
}

}  // namespace
}  // namespace nibble::train
