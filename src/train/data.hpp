// The training data: a byte-level character tokenizer, a text corpus split contiguously into a
// training and a validation part, and seeded random batches of (input, next-token target) windows,
// of text or of random tokens. The default corpus is the text of Debian's `fortunes` package.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "nibble/rng.hpp"

namespace nibble::train {

// The safetensors `__metadata__` key under which a checkpoint stores CharTokenizer::to_metadata().
inline constexpr std::string_view kTokenizerMetadataKey = "nibble.tokenizer";

// Token id i stands for the i-th smallest distinct byte of the text the tokenizer was built from.
class CharTokenizer {
 public:
  // Throws InvalidArgument for an empty text (a vocabulary needs at least one byte).
  explicit CharTokenizer(std::string_view text);

  // Parses to_metadata()'s format: a JSON array of the vocabulary bytes, strictly increasing
  // integers in 0..255, at least one. Throws FormatError naming what is wrong.
  static CharTokenizer from_metadata(std::string_view metadata);
  // The vocabulary as a JSON array of ints, e.g. "[10,32,33]"; equal tokenizers give equal strings.
  std::string to_metadata() const;

  std::int64_t size() const { return static_cast<std::int64_t>(vocabulary_.size()); }
  // The bytes, in id order (sorted ascending).
  const std::vector<std::uint8_t>& vocabulary() const { return vocabulary_; }

  // Throws InvalidArgument naming the byte and its position when a byte is not in the vocabulary.
  std::vector<std::int32_t> encode(std::string_view text) const;
  // Throws InvalidArgument naming the id and its position when an id is outside 0..size()-1.
  std::string decode(std::span<const std::int32_t> ids) const;

  bool operator==(const CharTokenizer& other) const { return vocabulary_ == other.vocabulary_; }

 private:
  explicit CharTokenizer(std::vector<std::uint8_t> vocabulary);

  std::vector<std::uint8_t> vocabulary_;
  std::array<std::int16_t, 256> id_of_{};  // -1 for a byte outside the vocabulary
};

enum class Split { kTrain, kValidation };
std::string_view split_name(Split split);  // "train", "validation"

// A whole text held as token ids: the first (1 - validation_fraction) of it is the training split,
// the rest (rounded to the nearest token) the validation split. Both must hold at least
// context + 1 tokens, so that one window of `context` inputs and their targets fits in each.
class TextDataset {
 public:
  // Reads the whole file. Throws IoError when it cannot be opened or read or is a directory, and
  // InvalidArgument when it is empty, binary (a NUL byte, or over 10% control bytes other than
  // \t \n \r \f) or too short for `context`.
  TextDataset(const std::filesystem::path& path, std::int64_t context, double validation_fraction = 0.1);
  // The same checks on an in-memory text; `name` stands for it in messages.
  TextDataset(std::string name, std::string_view text, std::int64_t context, double validation_fraction = 0.1);

  const std::string& name() const { return name_; }
  const CharTokenizer& tokenizer() const { return tokenizer_; }
  std::int64_t context() const { return context_; }
  double validation_fraction() const { return validation_fraction_; }

  std::int64_t token_count(Split split) const;
  std::int64_t total_tokens() const { return static_cast<std::int64_t>(tokens_.size()); }
  std::span<const std::int32_t> tokens(Split split) const;

  // Fills inputs and targets, each batch * seq int32 row-major [batch][seq], with `batch` windows
  // of the split whose start positions are drawn uniformly (rng.below, once per row, in row
  // order), so equal Rng states give equal batches. targets[b][t] = inputs[b][t + 1] within the
  // window of seq + 1 tokens. Throws InvalidArgument unless batch >= 1, 1 <= seq <= context()
  // and both pointers are non-null.
  void sample_batch(Split split, std::int64_t batch, std::int64_t seq, Rng& rng, std::int32_t* inputs,
                    std::int32_t* targets) const;

 private:
  std::string name_;
  std::int64_t context_ = 0;
  double validation_fraction_ = 0.1;
  CharTokenizer tokenizer_;
  std::vector<std::int32_t> tokens_;
  std::int64_t train_tokens_ = 0;
};

// Where the fortunes package keeps its files.
std::filesystem::path default_corpus_path();
// For messages and logs: "the fortunes package (/usr/share/games/fortunes)".
std::string default_corpus_description();
// The plain-text fortune files of `directory`, concatenated in sorted file-name order; index files
// (*.dat), the *.u8 links, other symlinks, hidden files and subdirectories are left out. Throws
// IoError (saying to install `fortunes`, which scripts/setup does) when the directory is missing
// or holds no fortune file.
std::string default_corpus(const std::filesystem::path& directory = default_corpus_path());

// Where a training run's batches come from: a text's characters (the file `data`, or the default
// corpus when it is empty), or, when random_vocab > 0, uniformly random tokens of that vocabulary.
class Batches {
 public:
  Batches(std::int64_t random_vocab, const std::filesystem::path& data, std::int64_t context,
          double validation_fraction);
  std::int64_t vocab() const;
  // The tokenizer's metadata, or "random:<vocab>".
  std::string vocab_metadata() const;
  std::string describe() const;
  // Random: each row draws seq + 1 tokens; the targets are the inputs shifted by one, as in text.
  void sample(Split split, std::int64_t batch, std::int64_t seq, Rng& rng, std::int32_t* inputs,
              std::int32_t* targets) const;

 private:
  std::int64_t random_vocab_ = 0;
  std::optional<TextDataset> text_;
};

}  // namespace nibble::train
