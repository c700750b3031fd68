// Reader and writer of the safetensors format (https://github.com/huggingface/safetensors).
// The reader trusts nothing: every field, size and offset is checked before a byte is copied, and
// every problem becomes a FormatError that names the tensor or value at fault.
#include "nibble/safetensors.hpp"

#include "nibble/io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "nibble/error.hpp"

namespace nibble {

// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78), continuing from `crc` (0 to start): the
// SSE4.2 instruction 8 bytes at a time where the build has it, else a table; the same values.
std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t bytes) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  crc = ~crc;
#if defined(__SSE4_2__)
  for (; bytes >= 8; bytes -= 8, p += 8) {
    std::uint64_t word;
    std::memcpy(&word, p, 8);
    crc = static_cast<std::uint32_t>(__builtin_ia32_crc32di(crc, word));
  }
  for (; bytes > 0; --bytes, ++p) crc = __builtin_ia32_crc32qi(crc, *p);
#else
  static constexpr auto kTable = [] {
    std::array<std::uint32_t, 256> table{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
      table[i] = c;
    }
    return table;
  }();
  for (; bytes > 0; --bytes, ++p) crc = kTable[(crc ^ *p) & 0xffu] ^ (crc >> 8);
#endif
  return ~crc;
}

namespace {

using Json = nlohmann::json;

// The metadata key under which nibble's writer stores the CRC-32C of the data section (8 hex
// digits); its reader checks it and removes it from the metadata it returns. Files of other
// writers have none and are read as before.
constexpr std::string_view kChecksumKey = "nibble.crc32c";

std::string hex32(std::uint32_t v) {
  char text[9];
  std::snprintf(text, sizeof text, "%08x", v);
  return text;
}

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::size_t kHeaderLengthBytes = 8;
constexpr std::size_t kHeaderAlignment = 8;
// Names and values from a hostile file can be megabytes long; messages show only their start.
constexpr std::size_t kMaxQuotedChars = 96;
// A valid header nests three levels (header, entry, shape). The limit stops a header of a million
// '[' from costing gigabytes of JSON nodes before it is rejected.
constexpr int kMaxHeaderNesting = 16;

// `text` in single quotes, cut short (on a UTF-8 character boundary) when it is long.
std::string quoted_excerpt(std::string_view text) {
  if (text.size() <= kMaxQuotedChars) return "'" + std::string(text) + "'";
  std::size_t cut = kMaxQuotedChars;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return "'" + std::string(text.substr(0, cut)) + "...'";
}

std::string json_excerpt(const Json& value) { return quoted_excerpt(value.dump()); }

std::string tensor_label(std::string_view name) { return "tensor " + quoted_excerpt(name); }

std::uint64_t read_u64_le(const std::uint8_t* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

void write_u64_le(std::uint64_t value, std::uint8_t* bytes) {
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<std::uint8_t>(value >> (8 * i));
}

// Parses the header and rejects duplicate keys in any object: nlohmann keeps the last of two equal
// keys silently, which would let a file carry two different tensors under one name.
Json parse_header_json(std::string_view text) {
  std::vector<std::set<std::string>> keys_per_open_object;
  auto check_keys_and_nesting = [&](int depth, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        // `depth` counts the containers already open around this one.
        if (depth >= kMaxHeaderNesting) {
          throw FormatError("header nests deeper than " + std::to_string(kMaxHeaderNesting) +
                            " levels");
        }
        if (event == Json::parse_event_t::object_start) keys_per_open_object.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        keys_per_open_object.pop_back();
        break;
      case Json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!keys_per_open_object.back().insert(key).second) {
          if (keys_per_open_object.size() == 1) {
            throw FormatError("duplicate tensor name " + quoted_excerpt(key) + " in header");
          }
          throw FormatError("duplicate key " + quoted_excerpt(key) + " in header");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  // nlohmann's lexer takes a NUL byte for the end of input and would ignore whatever follows it;
  // valid JSON text never contains one (inside strings it must be escaped).
  if (const std::size_t nul = text.find('\0'); nul != std::string_view::npos) {
    throw FormatError("header is not valid JSON: NUL byte at header offset " + std::to_string(nul));
  }
  try {
    return Json::parse(text.begin(), text.end(), check_keys_and_nesting);
  } catch (const Json::exception& e) {
    // nlohmann's message quotes the last token read, which may be the rest of the header.
    std::string reason = e.what();
    if (reason.size() > 4 * kMaxQuotedChars) reason = reason.substr(0, 4 * kMaxQuotedChars) + "...";
    throw FormatError("header is not valid JSON: " + reason);
  }
}

// A JSON integer that fits Int; nothing for anything else (floats, strings, out of range).
template <class Int>
std::optional<Int> as_integer(const Json& value) {
  if (value.is_number_unsigned()) {
    const auto v = value.get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(std::numeric_limits<Int>::max())) return std::nullopt;
    return static_cast<Int>(v);
  }
  if (value.is_number_integer()) {
    const auto v = value.get<std::int64_t>();
    if constexpr (std::is_unsigned_v<Int>) {
      if (v < 0) return std::nullopt;
    }
    return static_cast<Int>(v);
  }
  return std::nullopt;
}

struct TensorEntry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
};

const Json& required_field(const Json& entry, const char* key, std::string_view name) {
  const auto it = entry.find(key);
  if (it == entry.end()) {
    throw FormatError(tensor_label(name) + " has no \"" + key + "\" field");
  }
  return *it;
}

DType parse_dtype(const Json& value, std::string_view name) {
  if (!value.is_string()) {
    throw FormatError(tensor_label(name) +
                      " has a dtype that is not a string: " + json_excerpt(value));
  }
  const auto& text = value.get_ref<const std::string&>();
  const std::optional<DType> dtype = dtype_from_name(text);
  if (!dtype) throw FormatError(tensor_label(name) + " has unknown dtype " + quoted_excerpt(text));
  return *dtype;
}

std::vector<std::int64_t> parse_shape(const Json& value, std::string_view name) {
  if (!value.is_array()) {
    throw FormatError(tensor_label(name) +
                      " has a shape that is not an array: " + json_excerpt(value));
  }
  std::vector<std::int64_t> shape;
  shape.reserve(value.size());
  for (const Json& extent : value) {
    if (extent.is_number_integer() && !extent.is_number_unsigned() &&
        extent.get<std::int64_t>() < 0) {
      throw FormatError(tensor_label(name) + " has a negative extent " + extent.dump() +
                        " in its shape");
    }
    const std::optional<std::int64_t> checked = as_integer<std::int64_t>(extent);
    if (!checked) {
      if (extent.is_number_unsigned()) {
        throw FormatError(tensor_label(name) + " has a shape extent " + extent.dump() +
                          " that overflows int64");
      }
      throw FormatError(tensor_label(name) +
                        " has a shape extent that is not an integer: " + json_excerpt(extent));
    }
    shape.push_back(*checked);
  }
  return shape;
}

std::pair<std::uint64_t, std::uint64_t> parse_data_offsets(const Json& value,
                                                           std::string_view name) {
  std::optional<std::uint64_t> begin;
  std::optional<std::uint64_t> end;
  if (value.is_array() && value.size() == 2) {
    begin = as_integer<std::uint64_t>(value[0]);
    end = as_integer<std::uint64_t>(value[1]);
  }
  if (!begin || !end) {
    throw FormatError(
        tensor_label(name) +
        " has data_offsets that are not two non-negative integers: " + json_excerpt(value));
  }
  if (*begin > *end) {
    throw FormatError(tensor_label(name) + " has data_offsets with begin " +
                      std::to_string(*begin) + " after end " + std::to_string(*end));
  }
  return {*begin, *end};
}

TensorEntry parse_entry(const std::string& name, const Json& entry) {
  if (name.empty()) throw FormatError("header has a tensor with an empty name");
  if (!entry.is_object()) {
    throw FormatError("header entry for " + tensor_label(name) + " is not an object");
  }
  for (const auto& [key, value] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      throw FormatError(tensor_label(name) + " has an unexpected key " + quoted_excerpt(key));
    }
  }
  TensorEntry parsed;
  parsed.name = name;
  parsed.dtype = parse_dtype(required_field(entry, "dtype", name), name);
  parsed.shape = parse_shape(required_field(entry, "shape", name), name);
  std::tie(parsed.begin, parsed.end) =
      parse_data_offsets(required_field(entry, "data_offsets", name), name);

  std::int64_t numel = 0;
  try {
    numel = shape_numel(parsed.shape);
  } catch (const InvalidArgument&) {
    throw FormatError(tensor_label(name) + " has shape " + shape_string(parsed.shape) +
                      " whose element count overflows");
  }
  std::uint64_t nbytes = 0;
  if (__builtin_mul_overflow(static_cast<std::uint64_t>(numel), dtype_size(parsed.dtype),
                             &nbytes) ||
      nbytes > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    throw FormatError(tensor_label(name) + " has shape " + shape_string(parsed.shape) + " of " +
                      std::string(dtype_name(parsed.dtype)) + " whose byte size overflows");
  }
  if (nbytes != parsed.end - parsed.begin) {
    throw FormatError(tensor_label(name) + " has shape " + shape_string(parsed.shape) + " of " +
                      std::string(dtype_name(parsed.dtype)) + " (" + std::to_string(nbytes) +
                      " bytes) but data_offsets [" + std::to_string(parsed.begin) + ", " +
                      std::to_string(parsed.end) + "] span " +
                      std::to_string(parsed.end - parsed.begin) + " bytes");
  }
  return parsed;
}

std::map<std::string, std::string> parse_metadata(const Json& value) {
  if (!value.is_object()) {
    throw FormatError("__metadata__ is not an object of strings: " + json_excerpt(value));
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      throw FormatError("__metadata__ value for key " + quoted_excerpt(key) +
                        " is not a string: " + json_excerpt(item));
    }
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

// Sorted by begin, the tensors must tile [0, data_size) exactly: no hole, no overlap, no tail.
void check_offsets_tile_data(const std::vector<TensorEntry>& entries, std::uint64_t data_size) {
  std::uint64_t expected_begin = 0;
  for (const TensorEntry& entry : entries) {
    if (entry.begin != expected_begin) {
      const char* problem = entry.begin > expected_begin ? "a hole" : "an overlap";
      throw FormatError(tensor_label(entry.name) + " starts at data offset " +
                        std::to_string(entry.begin) + " but the previous tensor ends at " +
                        std::to_string(expected_begin) + " (" + problem + " in the data section)");
    }
    expected_begin = entry.end;
  }
  if (expected_begin != data_size) {
    throw FormatError("data section is " + std::to_string(data_size) +
                      " bytes but the tensors end at data offset " +
                      std::to_string(expected_begin));
  }
}

std::string errno_text(int error) { return std::strerror(error); }

}  // namespace

const Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const NamedTensor& named : tensors) {
    if (named.name == name) return &named.tensor;
  }
  return nullptr;
}

const Tensor& SafetensorsFile::at(const std::string& name) const {
  const Tensor* tensor = find(name);
  if (tensor == nullptr) throw FormatError("safetensors file has no " + tensor_label(name));
  return *tensor;
}

std::vector<std::uint8_t> encode_safetensors(std::span<const TensorView> tensors,
                                             const std::map<std::string, std::string>& metadata) {
  // ordered_json keeps the tensors in the caller's order in the header, as in the data section.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (metadata.count(std::string(kChecksumKey)) != 0)
    throw InvalidArgument("safetensors: metadata key '" + std::string(kChecksumKey) + "' is reserved for the writer");

  std::set<std::string_view> names;
  std::vector<std::uint64_t> sizes;
  sizes.reserve(tensors.size());
  std::uint64_t data_size = 0;
  for (const TensorView& view : tensors) {
    if (view.name.empty()) throw InvalidArgument("safetensors: tensor name is empty");
    if (view.name == kMetadataKey) {
      throw InvalidArgument("safetensors: tensor name '__metadata__' is reserved");
    }
    if (!names.insert(view.name).second) {
      throw InvalidArgument("safetensors: duplicate tensor name " + quoted_excerpt(view.name));
    }
    const std::int64_t numel = shape_numel(view.shape);
    std::uint64_t nbytes = 0;
    if (__builtin_mul_overflow(static_cast<std::uint64_t>(numel), dtype_size(view.dtype),
                               &nbytes) ||
        nbytes > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) ||
        __builtin_add_overflow(data_size, nbytes, &data_size)) {
      throw InvalidArgument("safetensors: " + tensor_label(view.name) + " of shape " +
                            shape_string(view.shape) + " is too large to store");
    }
    if (view.data == nullptr && nbytes != 0) {
      throw InvalidArgument("safetensors: " + tensor_label(view.name) + " has no data pointer");
    }
    sizes.push_back(nbytes);
  }
  // The data section's checksum goes into the metadata, which the header holds first.
  std::uint32_t crc = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i)
    if (sizes[i] != 0) crc = crc32c(crc, tensors[i].data, sizes[i]);
  std::map<std::string, std::string> with_checksum = metadata;
  with_checksum.emplace(std::string(kChecksumKey), hex32(crc));
  header[std::string(kMetadataKey)] = with_checksum;
  std::uint64_t end = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    end += sizes[i];
    header[tensors[i].name] = {{"dtype", dtype_name(tensors[i].dtype)},
                               {"shape", tensors[i].shape},
                               {"data_offsets", {end - sizes[i], end}}};
  }

  std::string header_text;
  try {
    header_text = header.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::strict);
  } catch (const nlohmann::ordered_json::exception& e) {
    throw InvalidArgument(std::string("safetensors: a tensor name or metadata string is not valid "
                                      "UTF-8: ") +
                          e.what());
  }
  // Padding to 8 bytes keeps the data section aligned for readers that map the file.
  header_text.append((kHeaderAlignment - header_text.size() % kHeaderAlignment) % kHeaderAlignment,
                     ' ');
  if (header_text.size() > kMaxSafetensorsHeader) {
    throw InvalidArgument("safetensors: header of " + std::to_string(header_text.size()) +
                          " bytes exceeds the limit of " + std::to_string(kMaxSafetensorsHeader));
  }

  std::vector<std::uint8_t> image(kHeaderLengthBytes + header_text.size() + data_size);
  write_u64_le(header_text.size(), image.data());
  std::memcpy(image.data() + kHeaderLengthBytes, header_text.data(), header_text.size());
  std::uint8_t* out = image.data() + kHeaderLengthBytes + header_text.size();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (sizes[i] != 0) std::memcpy(out, tensors[i].data, sizes[i]);
    out += sizes[i];
  }
  return image;
}

void save_safetensors(const std::filesystem::path& path, std::span<const TensorView> tensors,
                      const std::map<std::string, std::string>& metadata) {
  const std::vector<std::uint8_t> image = encode_safetensors(tensors, metadata);
  write_file_atomic(path, std::as_bytes(std::span<const std::uint8_t>(image)));
}

SafetensorsFile parse_safetensors(std::span<const std::uint8_t> bytes) {
  if (bytes.size() < kHeaderLengthBytes) {
    throw FormatError("file of " + std::to_string(bytes.size()) +
                      " bytes is too short for the 8-byte header length");
  }
  const std::uint64_t header_length = read_u64_le(bytes.data());
  if (header_length > kMaxSafetensorsHeader) {
    throw FormatError("header length " + std::to_string(header_length) + " exceeds the limit of " +
                      std::to_string(kMaxSafetensorsHeader) + " bytes");
  }
  if (header_length > bytes.size() - kHeaderLengthBytes) {
    throw FormatError("header length " + std::to_string(header_length) +
                      " runs past the end of the file (" + std::to_string(bytes.size()) +
                      " bytes)");
  }
  const std::string_view header_text(
      reinterpret_cast<const char*>(bytes.data()) + kHeaderLengthBytes, header_length);
  const Json header = parse_header_json(header_text);
  if (!header.is_object()) throw FormatError("header is not a JSON object");

  SafetensorsFile file;
  std::vector<TensorEntry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      file.metadata = parse_metadata(value);
    } else {
      entries.push_back(parse_entry(key, value));
    }
  }
  // Ties are zero-byte tensors sharing an offset; ordering them by end keeps a zero-byte tensor
  // ahead of a non-empty one that starts at the same offset, and stable_sort keeps names in order.
  std::stable_sort(entries.begin(), entries.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  const std::span<const std::uint8_t> data = bytes.subspan(kHeaderLengthBytes + header_length);
  check_offsets_tile_data(entries, data.size());

  if (const auto it = file.metadata.find(std::string(kChecksumKey)); it != file.metadata.end()) {
    const std::string found = hex32(crc32c(0, data.data(), data.size()));
    if (it->second != found)
      throw FormatError("data section checksum (CRC-32C) is " + found + ", the header records " +
                        quoted_excerpt(it->second) + ": the tensors' bytes are corrupt");
    file.metadata.erase(it);
  }
  file.tensors.reserve(entries.size());
  for (TensorEntry& entry : entries) {
    Tensor tensor(entry.dtype, std::move(entry.shape));
    if (tensor.nbytes() != 0) {
      std::memcpy(tensor.data(), data.data() + entry.begin, tensor.nbytes());
    }
    file.tensors.push_back({std::move(entry.name), std::move(tensor)});
  }
  return file;
}

SafetensorsFile load_safetensors(const std::filesystem::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open " + path.string() + ": " + errno_text(errno));
  std::vector<std::uint8_t> bytes;
  struct stat info {};
  std::size_t expected_size = 0;
  if (::fstat(fd, &info) == 0 && S_ISREG(info.st_mode)) {
    expected_size = static_cast<std::size_t>(info.st_size);
  }
  // Read to end of file rather than trusting st_size, so pipes and growing files work too.
  constexpr std::size_t kReadChunk = std::size_t{1} << 20;
  std::size_t filled = 0;
  for (;;) {
    if (filled == bytes.size()) bytes.resize(std::max(filled + kReadChunk, expected_size + 1));
    const ssize_t got = ::read(fd, bytes.data() + filled, bytes.size() - filled);
    if (got == 0) break;
    if (got < 0) {
      if (errno == EINTR) continue;
      const int error = errno;
      ::close(fd);
      throw IoError("cannot read " + path.string() + ": " + errno_text(error));
    }
    filled += static_cast<std::size_t>(got);
  }
  bytes.resize(filled);
  ::close(fd);
  try {
    return parse_safetensors(bytes);
  } catch (const FormatError& e) {
    throw FormatError(path.string() + ": " + e.what());
  }
}

}  // namespace nibble
