// The character tokenizer, the text dataset with its contiguous train/validation split and random
// batches, the default corpus (Debian's fortunes) and a run's batch source. Every check runs before
// any work is done, and every message names the file or value that was wrong.
#include "train/data.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <system_error>

#include "nibble/error.hpp"

namespace nibble::train {
namespace {

namespace fs = std::filesystem;

// A context longer than this is a mistake, and the bound keeps size arithmetic far from overflow.
constexpr std::int64_t kMaxContext = std::int64_t{1} << 30;

// A byte as a reader recognises it: 'a' when printable, \xNN otherwise.
std::string describe_byte(unsigned char byte) {
  if (byte >= 0x20 && byte < 0x7F) return fmt::format("'{}'", static_cast<char>(byte));
  return fmt::format("\\x{:02X}", byte);
}

// The start of a string that may be long or hold any byte, for quoting in a message.
std::string excerpt(std::string_view text) {
  constexpr std::size_t kMaxShown = 40;
  std::string shown;
  for (std::size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    shown += (byte >= 0x20 && byte < 0x7F && byte != '\\') ? std::string(1, static_cast<char>(byte))
                                                            : fmt::format("\\x{:02X}", byte);
  }
  if (text.size() > kMaxShown) shown += "...";
  return "\"" + shown + "\"";
}

// Control bytes that do not occur in text; \t \n \v \f \r do.
bool is_binary_control(unsigned char byte) { return byte < 0x09 || (byte >= 0x0E && byte <= 0x1F); }

std::int64_t validation_tokens(std::int64_t total, double validation_fraction) {
  return static_cast<std::int64_t>(std::llround(static_cast<double>(total) * validation_fraction));
}

bool splits_fit(std::int64_t total, std::int64_t needed, double validation_fraction) {
  const std::int64_t validation = validation_tokens(total, validation_fraction);
  return validation >= needed && total - validation >= needed;
}

// The shortest text whose splits both hold `needed` tokens, or 0 when none is representable. Both
// split sizes grow monotonically with the total, so a binary search finds it.
std::int64_t shortest_fitting_text(std::int64_t needed, double validation_fraction) {
  constexpr std::int64_t kLimit = std::int64_t{1} << 60;
  std::int64_t high = 2 * needed;
  while (!splits_fit(high, needed, validation_fraction)) {
    if (high >= kLimit) return 0;
    high *= 2;
  }
  std::int64_t low = 2 * needed - 1;  // never fits: the two splits together would be too small
  while (high - low > 1) {
    const std::int64_t middle = low + (high - low) / 2;
    (splits_fit(middle, needed, validation_fraction) ? high : low) = middle;
  }
  return high;
}

// Every check on a corpus that needs no tokenization; returns `text` so that it can run in a
// member initializer list before the tokenizer is built.
std::string_view checked_text(const std::string& name, std::string_view text, std::int64_t context,
                              double validation_fraction) {
  if (context < 1 || context > kMaxContext) {
    throw InvalidArgument(fmt::format("{}: the context length must be in 1..{}, got {}", name, kMaxContext, context));
  }
  if (!(validation_fraction > 0.0 && validation_fraction < 1.0)) {
    throw InvalidArgument(fmt::format("{}: the validation fraction must lie strictly between 0 and 1, got {}", name,
                                      validation_fraction));
  }
  if (text.empty()) throw InvalidArgument(fmt::format("{} is empty: a training corpus needs text", name));

  const std::size_t nul = text.find('\0');
  if (nul != std::string_view::npos) {
    throw InvalidArgument(fmt::format("{} looks binary, not text: it holds a NUL byte at offset {} (of {} bytes)", name,
                                      nul, text.size()));
  }
  const auto controls = std::count_if(text.begin(), text.end(),
                                      [](char c) { return is_binary_control(static_cast<unsigned char>(c)); });
  if (static_cast<std::size_t>(controls) * 10 > text.size()) {
    throw InvalidArgument(fmt::format(
        "{} looks binary, not text: {} of its {} bytes are control characters (text has at most 10%)", name,
        controls, text.size()));
  }

  const auto total = static_cast<std::int64_t>(text.size());
  const std::int64_t needed = context + 1;
  if (!splits_fit(total, needed, validation_fraction)) {
    const std::int64_t validation = validation_tokens(total, validation_fraction);
    const std::int64_t shortest = shortest_fitting_text(needed, validation_fraction);
    throw InvalidArgument(fmt::format(
        "{} is too short for a context of {}: its {} bytes give {} training and {} validation tokens, but each "
        "split needs at least {} (context + 1){}",
        name, context, total, total - validation, validation, needed,
        shortest > 0 ? fmt::format("; with a validation fraction of {} that takes a text of at least {} bytes",
                                   validation_fraction, shortest)
                     : std::string()));
  }
  return text;
}

// The whole file, read to its end. IoError for anything the operating system refuses.
std::string read_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(fmt::format("cannot open {}: {}", path.string(), std::strerror(errno)));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    throw IoError(fmt::format("cannot read {}: {}", path.string(), std::strerror(error)));
  }
  if (S_ISDIR(info.st_mode)) {
    ::close(fd);
    throw IoError(fmt::format("cannot read {}: it is a directory, not a text file", path.string()));
  }
  std::string text;
  if (S_ISREG(info.st_mode)) text.reserve(static_cast<std::size_t>(info.st_size));
  char chunk[1 << 16];
  for (;;) {
    const ssize_t got = ::read(fd, chunk, sizeof chunk);
    if (got == 0) break;
    if (got < 0) {
      if (errno == EINTR) continue;
      const int error = errno;
      ::close(fd);
      throw IoError(fmt::format("cannot read {}: {}", path.string(), std::strerror(error)));
    }
    text.append(chunk, static_cast<std::size_t>(got));
  }
  ::close(fd);
  return text;
}

// The sorted set of bytes that occur in `text`.
std::vector<std::uint8_t> distinct_bytes(std::string_view text) {
  if (text.empty()) throw InvalidArgument("cannot build a character tokenizer from an empty text");
  std::array<bool, 256> seen{};
  for (const char c : text) seen[static_cast<unsigned char>(c)] = true;
  std::vector<std::uint8_t> bytes;
  for (int byte = 0; byte < 256; ++byte) {
    if (seen[byte]) bytes.push_back(static_cast<std::uint8_t>(byte));
  }
  return bytes;
}

std::string install_hint() {
  return "install the `fortunes` package (scripts/setup does: apt-get install fortunes) or pass a text file";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CharTokenizer

CharTokenizer::CharTokenizer(std::vector<std::uint8_t> vocabulary) : vocabulary_(std::move(vocabulary)) {
  id_of_.fill(-1);
  for (std::size_t id = 0; id < vocabulary_.size(); ++id) id_of_[vocabulary_[id]] = static_cast<std::int16_t>(id);
}

CharTokenizer::CharTokenizer(std::string_view text) : CharTokenizer(distinct_bytes(text)) {}

CharTokenizer CharTokenizer::from_metadata(std::string_view metadata) {
  const nlohmann::json json = nlohmann::json::parse(metadata, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded()) {
    throw FormatError("tokenizer metadata is not valid JSON: " + excerpt(metadata));
  }
  if (!json.is_array()) {
    throw FormatError(fmt::format("tokenizer metadata must be a JSON array of byte values, not a JSON {}: {}",
                                  json.type_name(), excerpt(metadata)));
  }
  if (json.empty()) throw FormatError("tokenizer metadata is an empty vocabulary: it needs at least one byte");

  std::vector<std::uint8_t> vocabulary;
  vocabulary.reserve(json.size());
  for (std::size_t i = 0; i < json.size(); ++i) {
    const nlohmann::json& entry = json[i];
    if (!entry.is_number_integer()) {
      throw FormatError(fmt::format("tokenizer metadata entry {} is {}, not an integer byte value", i,
                                    excerpt(entry.dump())));
    }
    if (!entry.is_number_unsigned() || entry.get<std::uint64_t>() > 255) {
      throw FormatError(
          fmt::format("tokenizer metadata entry {} is {}, outside the byte range 0..255", i, entry.dump()));
    }
    const auto byte = static_cast<std::uint8_t>(entry.get<std::uint64_t>());
    if (!vocabulary.empty() && byte == vocabulary.back()) {
      throw FormatError(fmt::format("tokenizer metadata entry {} repeats byte {}", i, byte));
    }
    if (!vocabulary.empty() && byte < vocabulary.back()) {
      throw FormatError(fmt::format(
          "tokenizer metadata is not sorted: entry {} ({}) is smaller than entry {} ({})", i, byte, i - 1,
          vocabulary.back()));
    }
    vocabulary.push_back(byte);
  }
  return CharTokenizer(std::move(vocabulary));
}

std::string CharTokenizer::to_metadata() const {
  nlohmann::json json = nlohmann::json::array();
  for (const std::uint8_t byte : vocabulary_) json.push_back(static_cast<int>(byte));
  return json.dump();
}

std::vector<std::int32_t> CharTokenizer::encode(std::string_view text) const {
  std::vector<std::int32_t> ids(text.size());
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    const std::int16_t id = id_of_[byte];
    if (id < 0) {
      throw InvalidArgument(fmt::format("cannot encode byte {} at position {}: it is not in the tokenizer's "
                                        "vocabulary of {} characters",
                                        describe_byte(byte), i, vocabulary_.size()));
    }
    ids[i] = id;
  }
  return ids;
}

std::string CharTokenizer::decode(std::span<const std::int32_t> ids) const {
  std::string text(ids.size(), '\0');
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= size()) {
      throw InvalidArgument(fmt::format("cannot decode token id {} at position {}: the vocabulary has ids 0..{}",
                                        ids[i], i, size() - 1));
    }
    text[i] = static_cast<char>(vocabulary_[static_cast<std::size_t>(ids[i])]);
  }
  return text;
}

// ---------------------------------------------------------------------------------------------
// TextDataset

std::string_view split_name(Split split) { return split == Split::kTrain ? "train" : "validation"; }

TextDataset::TextDataset(const std::filesystem::path& path, std::int64_t context, double validation_fraction)
    : TextDataset(path.string(), read_file(path), context, validation_fraction) {}

TextDataset::TextDataset(std::string name, std::string_view text, std::int64_t context, double validation_fraction)
    : name_(std::move(name)),
      context_(context),
      validation_fraction_(validation_fraction),
      tokenizer_(checked_text(name_, text, context, validation_fraction)),
      tokens_(tokenizer_.encode(text)),
      train_tokens_(total_tokens() - validation_tokens(total_tokens(), validation_fraction)) {}

std::int64_t TextDataset::token_count(Split split) const {
  return split == Split::kTrain ? train_tokens_ : total_tokens() - train_tokens_;
}

std::span<const std::int32_t> TextDataset::tokens(Split split) const {
  const std::span<const std::int32_t> all(tokens_);
  return split == Split::kTrain ? all.first(static_cast<std::size_t>(train_tokens_))
                                : all.subspan(static_cast<std::size_t>(train_tokens_));
}

void TextDataset::sample_batch(Split split, std::int64_t batch, std::int64_t seq, Rng& rng, std::int32_t* inputs,
                               std::int32_t* targets) const {
  if (batch < 1) throw InvalidArgument(fmt::format("sample_batch: the batch size must be at least 1, got {}", batch));
  if (seq < 1 || seq > context_) {
    throw InvalidArgument(fmt::format(
        "sample_batch: the sequence length must be in 1..{} (the dataset's context), got {}", context_, seq));
  }
  if (inputs == nullptr || targets == nullptr) {
    throw InvalidArgument("sample_batch: the inputs and targets buffers must not be null");
  }
  const std::span<const std::int32_t> source = tokens(split);
  // A window is seq + 1 tokens; the construction checks guarantee at least context + 1.
  const auto starts = static_cast<std::uint64_t>(source.size()) - static_cast<std::uint64_t>(seq);
  for (std::int64_t row = 0; row < batch; ++row) {
    const std::int32_t* window = source.data() + rng.below(starts);
    std::copy_n(window, seq, inputs + row * seq);
    std::copy_n(window + 1, seq, targets + row * seq);
  }
}

// ---------------------------------------------------------------------------------------------
// The default corpus

std::filesystem::path default_corpus_path() { return "/usr/share/games/fortunes"; }

std::string default_corpus_description() {
  return "the fortunes package (" + default_corpus_path().string() + ")";
}

std::string default_corpus(const std::filesystem::path& directory) {
  std::error_code error;
  const fs::file_status status = fs::status(directory, error);
  if (!fs::is_directory(status)) {
    throw IoError(fmt::format("the default corpus is read from {}, which {}; {}", directory.string(),
                              fs::exists(status) ? "is not a directory" : "does not exist", install_hint()));
  }

  std::vector<fs::path> files;
  fs::directory_iterator it(directory, error);
  for (; !error && it != fs::directory_iterator(); it.increment(error)) {
    const fs::path& path = it->path();
    const std::string file_name = path.filename().string();
    if (file_name.starts_with('.') || file_name.ends_with(".dat") || file_name.ends_with(".u8")) continue;
    // *.u8 are symlinks to the plain files; any other link would duplicate or leave the corpus.
    std::error_code type_error;
    if (!fs::is_regular_file(it->symlink_status(type_error)) || type_error) continue;
    files.push_back(path);
  }
  if (error) throw IoError(fmt::format("cannot list {}: {}", directory.string(), error.message()));
  if (files.empty()) {
    throw IoError(fmt::format("{} holds no fortune files; {}", directory.string(), install_hint()));
  }
  std::sort(files.begin(), files.end(),
            [](const fs::path& a, const fs::path& b) { return a.filename().string() < b.filename().string(); });

  std::string corpus;
  for (const fs::path& file : files) {
    corpus += read_file(file);
    if (!corpus.empty() && corpus.back() != '\n') corpus += '\n';
  }
  return corpus;
}

Batches::Batches(std::int64_t random_vocab, const std::filesystem::path& data, std::int64_t context,
                 double validation_fraction)
    : random_vocab_(random_vocab) {
  if (random_vocab_ > 0) return;
  text_.emplace(data.empty() ? TextDataset(default_corpus_description(), default_corpus(), context, validation_fraction)
                             : TextDataset(data, context, validation_fraction));
}

std::int64_t Batches::vocab() const { return text_ ? text_->tokenizer().size() : random_vocab_; }

std::string Batches::vocab_metadata() const {
  return text_ ? text_->tokenizer().to_metadata() : fmt::format("random:{}", random_vocab_);
}

std::string Batches::describe() const {
  if (!text_) return fmt::format("random tokens from a vocabulary of {}", random_vocab_);
  return fmt::format("{} ({} train / {} validation tokens)", text_->name(), text_->token_count(Split::kTrain),
                     text_->token_count(Split::kValidation));
}

void Batches::sample(Split split, std::int64_t batch, std::int64_t seq, Rng& rng, std::int32_t* inputs,
                     std::int32_t* targets) const {
  if (text_) return text_->sample_batch(split, batch, seq, rng, inputs, targets);
  for (std::int64_t b = 0; b < batch; ++b) {
    std::int32_t prev = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(random_vocab_)));
    for (std::int64_t t = 0; t < seq; ++t) {
      const auto next = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(random_vocab_)));
      inputs[b * seq + t] = prev;
      targets[b * seq + t] = next;
      prev = next;
    }
  }
}

}  // namespace nibble::train
