// Tests of the safetensors reader and writer: round trips, atomic saves, one hand-made file per
// rejection rule, and a seeded mutation fuzz test that may only ever see success or FormatError.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <typeinfo>
#include <vector>

#include "nibble/error.hpp"
#include "nibble/rng.hpp"
#include "nibble/safetensors.hpp"

#include "test_util.hpp"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using test::Bytes;
using test::read_bytes;
using test::write_file;

// A tensor to write: its view plus the bytes the view points at.
struct SampleTensor {
  std::string name;
  DType dtype;
  std::vector<std::int64_t> shape;
  Bytes data;
};

SampleTensor make_sample(std::string name, DType dtype, std::vector<std::int64_t> shape,
                         std::uint8_t first_byte) {
  const auto nbytes = static_cast<std::size_t>(shape_numel(shape)) * dtype_size(dtype);
  Bytes data(nbytes);
  for (std::size_t i = 0; i < nbytes; ++i) data[i] = static_cast<std::uint8_t>(first_byte + 3 * i);
  return {std::move(name), dtype, std::move(shape), std::move(data)};
}

std::vector<SampleTensor> sample_tensors() {
  std::vector<SampleTensor> samples;
  samples.push_back(make_sample("weight", DType::F32, {2, 3}, 1));
  samples.push_back(make_sample("scalar", DType::F64, {}, 50));
  samples.push_back(make_sample("empty", DType::BF16, {0, 4}, 0));
  samples.push_back(make_sample("codes", DType::U8, {5}, 9));
  samples.push_back(make_sample("step", DType::I64, {1}, 77));
  samples.push_back(make_sample("mask", DType::BOOL, {2, 2}, 0));
  samples.push_back(make_sample("half", DType::F16, {1, 1, 3}, 200));
  samples.push_back(make_sample("counts", DType::U32, {3}, 4));
  samples.push_back(make_sample("small", DType::I8, {2}, 128));
  samples.push_back(make_sample("wide", DType::U64, {1}, 33));
  samples.push_back(make_sample("short", DType::I16, {2}, 11));
  samples.push_back(make_sample("ushort", DType::U16, {2}, 12));
  samples.push_back(make_sample("int", DType::I32, {1}, 13));
  return samples;
}

std::vector<TensorView> views_of(const std::vector<SampleTensor>& samples) {
  std::vector<TensorView> views;
  for (const SampleTensor& sample : samples) {
    views.push_back({sample.name, sample.dtype, sample.shape,
                     sample.data.empty() ? nullptr : sample.data.data()});
  }
  return views;
}

Bytes tensor_bytes(const Tensor& tensor) {
  const auto* begin = static_cast<const std::uint8_t*>(tensor.data());
  return tensor.nbytes() == 0 ? Bytes{} : Bytes(begin, begin + tensor.nbytes());
}

std::uint64_t header_length_of(const Bytes& image) {
  std::uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | image[i];
  return length;
}

void set_header_length(Bytes& image, std::uint64_t length) {
  for (int i = 0; i < 8; ++i) image[i] = static_cast<std::uint8_t>(length >> (8 * i));
}

// A file image with exactly this header text and data section, no padding added.
Bytes make_image(std::string_view header, const Bytes& data = {}) {
  Bytes image(8 + header.size() + data.size());
  set_header_length(image, header.size());
  std::copy(header.begin(), header.end(), image.begin() + 8);
  std::copy(data.begin(), data.end(),
            image.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return image;
}

// Asserts that parsing fails with a FormatError whose message contains `expected`.
void expect_format_error(const Bytes& image, std::string_view expected) {
  try {
    parse_safetensors(image);
    ADD_FAILURE() << "parsed without error; expected a message with \"" << expected << "\"";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string_view(e.what()).find(expected), std::string_view::npos)
        << "message \"" << e.what() << "\" lacks \"" << expected << "\"";
  }
}

// One tensor named "a": F32 of shape [2] at [0, 8], followed by `data` (8 bytes unless given).
Bytes one_tensor_image(std::string_view entry, const Bytes& data = Bytes(8, 0)) {
  return make_image("{\"a\":" + std::string(entry) + "}", data);
}

TEST(SafetensorsRoundTrip, AllDTypesAndShapes) {
  const std::vector<SampleTensor> samples = sample_tensors();
  const std::vector<TensorView> views = views_of(samples);
  const SafetensorsFile file = parse_safetensors(encode_safetensors(views, {}));

  ASSERT_EQ(file.tensors.size(), samples.size());
  EXPECT_TRUE(file.metadata.empty());
  for (std::size_t i = 0; i < samples.size(); ++i) {
    const NamedTensor& named = file.tensors[i];
    // The writer lays tensors out in the given order, and the reader returns data-offset order.
    EXPECT_EQ(named.name, samples[i].name);
    EXPECT_EQ(named.tensor.dtype(), samples[i].dtype) << named.name;
    EXPECT_EQ(named.tensor.shape(), samples[i].shape) << named.name;
    EXPECT_EQ(tensor_bytes(named.tensor), samples[i].data) << named.name;
  }
  EXPECT_EQ(file.at("scalar").numel(), 1);
  EXPECT_EQ(file.at("scalar").nbytes(), 8u);
  EXPECT_EQ(file.at("empty").numel(), 0);
}

TEST(SafetensorsRoundTrip, NoTensors) {
  const Bytes image = encode_safetensors({}, {});
  const SafetensorsFile file = parse_safetensors(image);
  EXPECT_TRUE(file.tensors.empty());
  EXPECT_TRUE(file.metadata.empty());
  EXPECT_EQ(image.size(), 8 + header_length_of(image));
}

TEST(SafetensorsRoundTrip, Metadata) {
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"step", "120"}, {"note", "quotes \" and \\ and ünïcode"}, {"empty", ""}};
  const std::vector<SampleTensor> samples = sample_tensors();
  const SafetensorsFile file = parse_safetensors(encode_safetensors(views_of(samples), metadata));
  EXPECT_EQ(file.metadata, metadata);
  EXPECT_EQ(file.tensors.size(), samples.size());
}

// The writer records the data section's CRC-32C in the metadata; the reader checks it and
// returns the caller's metadata alone. Any flipped data bit is refused, naming the checksum; a
// file of another writer, without the record, reads as before.
TEST(SafetensorsChecksum, RecordedCheckedAndNotReturned) {
  EXPECT_EQ(crc32c(0, "123456789", 9), 0xe3069283u);  // the CRC-32C check value
  EXPECT_EQ(crc32c(crc32c(0, "1234", 4), "56789", 5), 0xe3069283u);
  const Bytes image = encode_safetensors(views_of(sample_tensors()), {{"k", "v"}});
  const std::string header(image.begin() + 8, image.begin() + 8 + header_length_of(image));
  EXPECT_NE(header.find("\"nibble.crc32c\""), std::string::npos) << header;
  const SafetensorsFile file = parse_safetensors(image);
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"k", "v"}}));
  const std::size_t data_begin = 8 + header_length_of(image);
  ASSERT_LT(data_begin, image.size());
  for (std::size_t at = data_begin; at < image.size(); at += 7)
    for (int bit = 0; bit < 8; bit += 3) {
      Bytes flipped = image;
      flipped[at] = static_cast<std::uint8_t>(flipped[at] ^ (1u << bit));
      const std::string message = test::thrown_message<FormatError>([&] { (void)parse_safetensors(flipped); }, "flip");
      EXPECT_NE(message.find("checksum"), std::string::npos) << message;
    }
  EXPECT_THROW(encode_safetensors(views_of(sample_tensors()), {{"nibble.crc32c", "00000000"}}), InvalidArgument);
}

TEST(SafetensorsChecksum, FilesWithoutTheRecordRead) {
  // A hand-written file (as other writers make them): no metadata, one U8 tensor.
  const std::string header = "{\"x\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}}";
  std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  Bytes image(8);
  for (int i = 0; i < 8; ++i) image[i] = static_cast<std::uint8_t>((padded.size() >> (8 * i)) & 0xffu);
  image.insert(image.end(), padded.begin(), padded.end());
  image.insert(image.end(), {1, 2, 3});
  const SafetensorsFile file = parse_safetensors(image);
  EXPECT_TRUE(file.metadata.empty());
  ASSERT_EQ(file.tensors.size(), 1u);
  EXPECT_EQ(file.tensors[0].tensor.data_as<std::uint8_t>()[2], 3);
}

TEST(SafetensorsRoundTrip, HeaderIsPaddedWithSpacesAndParses) {
  for (std::size_t name_length = 1; name_length <= 17; ++name_length) {
    SampleTensor sample = make_sample(std::string(name_length, 'n'), DType::U8, {3}, 1);
    const Bytes image = encode_safetensors(views_of({sample}), {{"k", "v"}});
    const std::uint64_t header_length = header_length_of(image);
    EXPECT_EQ(header_length % 8, 0u) << name_length;
    ASSERT_EQ(image.size(), 8 + header_length + 3);
    const std::string header(image.begin() + 8, image.begin() + 8 + header_length);
    const std::size_t last = header.find_last_not_of(' ');
    ASSERT_NE(last, std::string::npos);
    EXPECT_EQ(header[last], '}');
    EXPECT_LT(header.size() - last - 1, 8u) << "more padding than needed";

    const nlohmann::json json = nlohmann::json::parse(header);
    EXPECT_EQ(json[sample.name]["dtype"], "U8");
    EXPECT_EQ(json[sample.name]["shape"], nlohmann::json::array({3}));
    EXPECT_EQ(json[sample.name]["data_offsets"], nlohmann::json::array({0, 3}));
    EXPECT_EQ(json["__metadata__"]["k"], "v");
  }
}

TEST(SafetensorsRoundTrip, HeaderListsTensorsInGivenOrderWithContiguousOffsets) {
  const std::vector<SampleTensor> samples = sample_tensors();
  const Bytes image = encode_safetensors(views_of(samples), {});
  const std::string header(image.begin() + 8, image.begin() + 8 + header_length_of(image));
  const nlohmann::json json = nlohmann::json::parse(header);
  std::size_t previous_position = 0;
  std::uint64_t expected_begin = 0;
  for (const SampleTensor& sample : samples) {
    const std::size_t position = header.find("\"" + sample.name + "\"");
    ASSERT_NE(position, std::string::npos);
    EXPECT_GT(position, previous_position) << sample.name;
    previous_position = position;
    const auto offsets = json[sample.name]["data_offsets"].get<std::vector<std::uint64_t>>();
    EXPECT_EQ(offsets[0], expected_begin) << sample.name;
    EXPECT_EQ(offsets[1] - offsets[0], sample.data.size()) << sample.name;
    expected_begin = offsets[1];
  }
}

TEST(SafetensorsRoundTrip, ReaderAcceptsAnyKeyOrderAndReturnsOffsetOrder) {
  const Bytes data = {1, 2, 3, 4, 5, 6};
  const Bytes image = make_image(R"({"z":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                                 R"("y":{"data_offsets":[2,2],"shape":[0],"dtype":"F32"},)"
                                 R"("a":{"shape":[4],"dtype":"U8","data_offsets":[2,6]}})",
                                 data);
  const SafetensorsFile file = parse_safetensors(image);
  ASSERT_EQ(file.tensors.size(), 3u);
  EXPECT_EQ(file.tensors[0].name, "z");
  EXPECT_EQ(file.tensors[1].name, "y");
  EXPECT_EQ(file.tensors[2].name, "a");
  EXPECT_EQ(tensor_bytes(file.tensors[2].tensor), (Bytes{3, 4, 5, 6}));
}

TEST(SafetensorsFile, FindAndAt) {
  const SafetensorsFile file =
      parse_safetensors(encode_safetensors(views_of(sample_tensors()), {}));
  EXPECT_NE(file.find("weight"), nullptr);
  EXPECT_EQ(file.find("missing"), nullptr);
  try {
    file.at("missing");
    FAIL() << "no exception";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'missing'"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsWriter, RejectsBadTensors) {
  const float value = 1.0f;
  auto encode_one = [&](TensorView view) {
    return encode_safetensors(std::vector<TensorView>{view}, {});
  };
  EXPECT_THROW(encode_one({"", DType::F32, {1}, &value}), InvalidArgument);
  EXPECT_THROW(encode_one({"__metadata__", DType::F32, {1}, &value}), InvalidArgument);
  EXPECT_THROW(encode_one({"x", DType::F32, {1}, nullptr}), InvalidArgument);
  EXPECT_THROW(encode_one({"x", DType::F32, {-1}, &value}), InvalidArgument);
  EXPECT_THROW(encode_one({"x", DType::F32, {std::int64_t{1} << 62}, &value}), InvalidArgument);
  EXPECT_THROW(encode_one({"\xff", DType::F32, {1}, &value}), InvalidArgument);
  EXPECT_NO_THROW(encode_one({"x", DType::F32, {0}, nullptr}));

  const std::vector<TensorView> duplicates = {{"x", DType::F32, {1}, &value},
                                              {"x", DType::F32, {1}, &value}};
  try {
    encode_safetensors(duplicates, {});
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("duplicate tensor name 'x'"), std::string::npos)
        << e.what();
  }
}

// A fresh directory per test, removed afterwards.
class SafetensorsFiles : public ::testing::Test {
 protected:
  std::set<std::string> directory_entries() const {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(directory_)) {
      names.insert(entry.path().filename().string());
    }
    return names;
  }

  const test::TempDir temp_;
  const fs::path directory_ = temp_.path();
};

TEST_F(SafetensorsFiles, SaveThenLoad) {
  const std::vector<SampleTensor> samples = sample_tensors();
  const fs::path path = directory_ / "model.safetensors";
  save_safetensors(path, views_of(samples), {{"step", "3"}});
  EXPECT_EQ(directory_entries(), std::set<std::string>{"model.safetensors"});
  EXPECT_EQ(read_bytes(path), encode_safetensors(views_of(samples), {{"step", "3"}}));

  const SafetensorsFile file = load_safetensors(path);
  EXPECT_EQ(file.metadata.at("step"), "3");
  ASSERT_EQ(file.tensors.size(), samples.size());
  for (std::size_t i = 0; i < samples.size(); ++i) {
    EXPECT_EQ(tensor_bytes(file.tensors[i].tensor), samples[i].data) << samples[i].name;
  }
}

TEST_F(SafetensorsFiles, SaveReplacesExistingFile) {
  const fs::path path = directory_ / "state.safetensors";
  write_file(path, Bytes(1000, 0xAB));
  const std::vector<SampleTensor> samples = sample_tensors();
  save_safetensors(path, views_of(samples));
  EXPECT_EQ(read_bytes(path), encode_safetensors(views_of(samples), {}));
  EXPECT_EQ(directory_entries(), std::set<std::string>{"state.safetensors"});
}

TEST_F(SafetensorsFiles, SaveOntoDirectoryFailsCleanly) {
  const fs::path path = directory_ / "taken";
  fs::create_directory(path);
  try {
    save_safetensors(path, views_of(sample_tensors()));
    FAIL() << "no exception";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
  EXPECT_TRUE(fs::is_directory(path));
  EXPECT_EQ(directory_entries(), std::set<std::string>{"taken"}) << "temporary file left behind";
}

TEST_F(SafetensorsFiles, SaveIntoMissingDirectoryThrowsIoError) {
  const fs::path path = directory_ / "no" / "such" / "dir.safetensors";
  try {
    save_safetensors(path, views_of(sample_tensors()));
    FAIL() << "no exception";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::strerror(ENOENT)), std::string::npos) << e.what();
  }
}

TEST_F(SafetensorsFiles, FailedWriteLeavesOldFileUntouched) {
  const fs::path path = directory_ / "checkpoint.safetensors";
  const std::vector<SampleTensor> old_samples = sample_tensors();
  save_safetensors(path, views_of(old_samples));
  const Bytes old_bytes = read_bytes(path);

  // A file-size limit makes the write fail part-way, as a full disk would. SIGXFSZ is ignored so
  // that the write returns EFBIG instead of killing the process.
  const std::vector<SampleTensor> big = {make_sample("big", DType::F32, {1 << 18}, 5)};
  rlimit saved_limit{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved_limit), 0);
  rlimit small_limit = saved_limit;
  small_limit.rlim_cur = 64 * 1024;
  const auto saved_handler = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small_limit), 0);
  std::string error_message;
  try {
    save_safetensors(path, views_of(big));
  } catch (const IoError& e) {
    error_message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved_limit);
  ::signal(SIGXFSZ, saved_handler);

  ASSERT_FALSE(error_message.empty()) << "the oversized save did not fail";
  EXPECT_NE(error_message.find(path.string()), std::string::npos) << error_message;
  EXPECT_NE(error_message.find(std::strerror(EFBIG)), std::string::npos) << error_message;
  EXPECT_EQ(read_bytes(path), old_bytes);
  EXPECT_EQ(directory_entries(), std::set<std::string>{"checkpoint.safetensors"});
}

TEST_F(SafetensorsFiles, UnwritableDirectoryLeavesOldFileUntouched) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions";
  const fs::path path = directory_ / "checkpoint.safetensors";
  save_safetensors(path, views_of(sample_tensors()));
  const Bytes old_bytes = read_bytes(path);
  fs::permissions(directory_, fs::perms::owner_write, fs::perm_options::remove);
  EXPECT_THROW(save_safetensors(path, {}), IoError);
  fs::permissions(directory_, fs::perms::owner_write, fs::perm_options::add);
  EXPECT_EQ(read_bytes(path), old_bytes);
  EXPECT_EQ(directory_entries(), std::set<std::string>{"checkpoint.safetensors"});
}

TEST_F(SafetensorsFiles, WhatStandsBesideTheFileIsLeftAlone) {
  // Names like a temporary's, a file and a directory: a save takes a fresh name of its own.
  const fs::path path = directory_ / "checkpoint.safetensors";
  write_file(directory_ / "checkpoint.safetensors.tmp-aaaaaa", Bytes{1, 2, 3});
  fs::create_directory(directory_ / "checkpoint.safetensors.tmp-bbbbbb");
  save_safetensors(path, views_of(sample_tensors()));
  EXPECT_EQ(load_safetensors(path).tensors.size(), sample_tensors().size());
  EXPECT_EQ(read_bytes(directory_ / "checkpoint.safetensors.tmp-aaaaaa"), (Bytes{1, 2, 3}));
  EXPECT_TRUE(fs::is_directory(directory_ / "checkpoint.safetensors.tmp-bbbbbb"));
  EXPECT_EQ(directory_entries(), (std::set<std::string>{"checkpoint.safetensors", "checkpoint.safetensors.tmp-aaaaaa",
                                                        "checkpoint.safetensors.tmp-bbbbbb"}));
}

TEST_F(SafetensorsFiles, ConcurrentSavesToOnePathEachPublishAWholeFile) {
  // Two threads of one process saving one path (a temporary named by the process alone was shared
  // by both: one's rename found it gone, or published the other's half-written bytes).
  const fs::path path = directory_ / "checkpoint.safetensors";
  const std::vector<SampleTensor> a = {make_sample("a", DType::F32, {4096}, 1)};
  const std::vector<SampleTensor> b = {make_sample("b", DType::F32, {8192}, 2)};
  std::atomic<int> failures{0};
  auto writer = [&](const std::vector<SampleTensor>& samples) {
    for (int i = 0; i < 40; ++i) {
      try {
        save_safetensors(path, views_of(samples));
      } catch (const IoError&) {
        ++failures;
      }
    }
  };
  std::thread first(writer, std::cref(a)), second(writer, std::cref(b));
  first.join();
  second.join();
  EXPECT_EQ(failures.load(), 0);
  const SafetensorsFile file = load_safetensors(path);  // whole: one writer's, not a mix
  ASSERT_EQ(file.tensors.size(), 1u);
  EXPECT_TRUE(file.find("a") != nullptr || file.find("b") != nullptr);
  EXPECT_EQ(directory_entries(), std::set<std::string>{"checkpoint.safetensors"});
}

TEST_F(SafetensorsFiles, LoadMissingFileThrowsIoError) {
  const fs::path path = directory_ / "absent.safetensors";
  try {
    load_safetensors(path);
    FAIL() << "no exception";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
  }
}

TEST_F(SafetensorsFiles, LoadDirectoryThrowsIoError) {
  EXPECT_THROW(load_safetensors(directory_), IoError);
}

TEST_F(SafetensorsFiles, LoadCorruptFileNamesPathFirst) {
  const fs::path path = directory_ / "corrupt.safetensors";
  Bytes image = encode_safetensors(views_of(sample_tensors()), {});
  image.pop_back();
  write_file(path, image);
  try {
    load_safetensors(path);
    FAIL() << "no exception";
  } catch (const FormatError& e) {
    EXPECT_EQ(std::string(e.what()).rfind(path.string() + ": ", 0), 0u) << e.what();
    EXPECT_NE(std::string(e.what()).find("data section"), std::string::npos) << e.what();
  }
}

TEST(SafetensorsReader, RejectsShortFiles) {
  for (std::size_t size = 0; size < 8; ++size) expect_format_error(Bytes(size, 0), "too short");
}

TEST(SafetensorsReader, RejectsHeaderLengthOverLimit) {
  Bytes image = make_image("{}");
  set_header_length(image, kMaxSafetensorsHeader + 1);
  expect_format_error(image, "exceeds the limit");
  set_header_length(image, ~std::uint64_t{0});
  expect_format_error(image, "exceeds the limit");
}

TEST(SafetensorsReader, RejectsHeaderLengthPastEndOfFile) {
  Bytes image = make_image("{}");
  set_header_length(image, 3);
  expect_format_error(image, "past the end of the file");
}

TEST(SafetensorsReader, RejectsInvalidJson) {
  expect_format_error(make_image(""), "not valid JSON");
  expect_format_error(make_image("{"), "not valid JSON");
  expect_format_error(make_image("{\"a\":}"), "not valid JSON");
  expect_format_error(make_image("{} x"), "not valid JSON");
  // nlohmann stops at a NUL byte; the reader must not ignore what follows it.
  expect_format_error(make_image(std::string("{}\0\0", 4)), "NUL byte at header offset 2");
  expect_format_error(make_image(std::string("{}\0{\"a\":5}", 10)), "NUL byte");
}

TEST(SafetensorsReader, RejectsInvalidUtf8) {
  expect_format_error(make_image("{\"\xff\xfe\":{}}"), "UTF-8");
  expect_format_error(make_image("{\"__metadata__\":{\"k\":\"\xc3\"}}"), "UTF-8");
}

TEST(SafetensorsReader, RejectsHeaderThatIsNotAnObject) {
  expect_format_error(make_image("[1,2]"), "not a JSON object");
  expect_format_error(make_image("\"text\""), "not a JSON object");
  expect_format_error(make_image("null"), "not a JSON object");
}

TEST(SafetensorsReader, RejectsEntryThatIsNotAnObject) {
  expect_format_error(one_tensor_image("5"), "tensor 'a' is not an object");
  expect_format_error(one_tensor_image("[\"F32\",[2],[0,8]]"), "tensor 'a' is not an object");
}

TEST(SafetensorsReader, RejectsMissingFields) {
  expect_format_error(one_tensor_image(R"({"shape":[2],"data_offsets":[0,8]})"),
                      "tensor 'a' has no \"dtype\"");
  expect_format_error(one_tensor_image(R"({"dtype":"F32","data_offsets":[0,8]})"),
                      "tensor 'a' has no \"shape\"");
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[2]})"),
                      "tensor 'a' has no \"data_offsets\"");
}

TEST(SafetensorsReader, RejectsExtraKeys) {
  expect_format_error(
      one_tensor_image(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8],"stride":[1]})"),
      "tensor 'a' has an unexpected key 'stride'");
}

TEST(SafetensorsReader, RejectsMistypedDType) {
  expect_format_error(one_tensor_image(R"({"dtype":4,"shape":[2],"data_offsets":[0,8]})"),
                      "dtype that is not a string");
  expect_format_error(one_tensor_image(R"({"dtype":"F8","shape":[2],"data_offsets":[0,8]})"),
                      "tensor 'a' has unknown dtype 'F8'");
  expect_format_error(one_tensor_image(R"({"dtype":"f32","shape":[2],"data_offsets":[0,8]})"),
                      "unknown dtype 'f32'");
}

TEST(SafetensorsReader, RejectsMistypedShape) {
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})"),
                      "shape that is not an array");
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})"),
                      "shape extent that is not an integer: '2.0'");
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":["2"],"data_offsets":[0,8]})"),
                      "shape extent that is not an integer");
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[[2]],"data_offsets":[0,8]})"),
                      "shape extent that is not an integer");
}

TEST(SafetensorsReader, RejectsNegativeExtent) {
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})"),
                      "tensor 'a' has a negative extent -2");
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[-2,-1],"data_offsets":[0,8]})"),
                      "negative extent");
}

TEST(SafetensorsReader, RejectsElementCountOverflow) {
  expect_format_error(
      one_tensor_image(R"({"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,8]})"),
      "[4294967296, 4294967296] whose element count overflows");
  expect_format_error(
      one_tensor_image(R"({"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,8]})"),
      "9223372036854775808 that overflows int64");
}

TEST(SafetensorsReader, RejectsByteSizeOverflow) {
  // 2^61 elements fit int64, but 2^61 * 8 bytes do not.
  expect_format_error(
      one_tensor_image(R"({"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]})"),
      "byte size overflows");
  // 2^62 * 8 wraps a 64-bit product.
  expect_format_error(
      one_tensor_image(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]})"),
      "byte size overflows");
}

TEST(SafetensorsReader, RejectsMalformedDataOffsets) {
  const char* bad_offsets[] = {
      "8",    "[8]",     "[0,4,8]", "[-1,7]", "[0,8.0]", "[\"0\",8]", "[0,18446744073709551616]",
      "null", "[0,null]"};
  for (const char* offsets : bad_offsets) {
    expect_format_error(
        one_tensor_image(std::string(R"({"dtype":"F32","shape":[2],"data_offsets":)") + offsets +
                         "}"),
        "data_offsets that are not two non-negative integers");
  }
}

TEST(SafetensorsReader, RejectsBeginAfterEnd) {
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[2],"data_offsets":[8,0]})"),
                      "tensor 'a' has data_offsets with begin 8 after end 0");
}

TEST(SafetensorsReader, RejectsSizeMismatch) {
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})"),
                      "tensor 'a' has shape [3] of F32 (12 bytes) but data_offsets [0, 8] span 8");
  expect_format_error(
      one_tensor_image(R"({"dtype":"F64","shape":[2],"data_offsets":[0,8]})", Bytes(16)),
      "(16 bytes) but data_offsets [0, 8] span 8");
}

TEST(SafetensorsReader, RejectsHoleBetweenTensors) {
  expect_format_error(
      make_image(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                 R"("b":{"dtype":"U8","shape":[4],"data_offsets":[6,10]}})",
                 Bytes(10)),
      "tensor 'b' starts at data offset 6 but the previous tensor ends at 4 (a hole");
}

TEST(SafetensorsReader, RejectsHoleAtStart) {
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})"),
                      "tensor 'a' starts at data offset 4 but the previous tensor ends at 0");
}

TEST(SafetensorsReader, RejectsOverlappingTensors) {
  expect_format_error(make_image(R"({"a":{"dtype":"U8","shape":[6],"data_offsets":[0,6]},)"
                                 R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                                 Bytes(8)),
                      "tensor 'b' starts at data offset 4 but the previous tensor ends at 6 (an "
                      "overlap");
  expect_format_error(make_image(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                 R"("b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})",
                                 Bytes(4)),
                      "overlap");
}

TEST(SafetensorsReader, RejectsDataSectionOfWrongLength) {
  expect_format_error(
      one_tensor_image(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})", Bytes(9)),
      "data section is 9 bytes but the tensors end at data offset 8");
  expect_format_error(
      one_tensor_image(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})", Bytes(7)),
      "data section is 7 bytes but the tensors end at data offset 8");
  expect_format_error(make_image("{}", Bytes(1)), "data section is 1 bytes");
}

TEST(SafetensorsReader, RejectsBadMetadata) {
  expect_format_error(make_image(R"({"__metadata__":["a"]})"), "__metadata__ is not an object");
  expect_format_error(make_image(R"({"__metadata__":null})"), "__metadata__ is not an object");
  expect_format_error(make_image(R"({"__metadata__":{"step":3}})"),
                      "__metadata__ value for key 'step' is not a string: '3'");
  expect_format_error(make_image(R"({"__metadata__":{"nested":{"a":"b"}}})"),
                      "value for key 'nested' is not a string");
}

TEST(SafetensorsReader, RejectsDuplicateTensorNames) {
  expect_format_error(make_image(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
                                 R"("a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                                 Bytes(8)),
                      "duplicate tensor name 'a'");
  expect_format_error(make_image(R"({"__metadata__":{},"__metadata__":{}})"),
                      "duplicate tensor name '__metadata__'");
}

TEST(SafetensorsReader, RejectsDuplicateKeysInsideEntries) {
  expect_format_error(
      one_tensor_image(R"({"dtype":"F32","dtype":"U8","shape":[2],"data_offsets":[0,8]})"),
      "duplicate key 'dtype'");
  expect_format_error(make_image(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate key 'k'");
}

TEST(SafetensorsReader, RejectsDeepNesting) {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  expect_format_error(one_tensor_image(R"({"dtype":"F32","shape":)" + deep + "}"),
                      "nests deeper than 16 levels");
  std::string deep_objects;
  for (int i = 0; i < 1000; ++i) deep_objects += "{\"a\":";
  expect_format_error(make_image(deep_objects), "nests deeper");
  const std::string allowed = std::string(14, '[') + std::string(14, ']');
  expect_format_error(
      one_tensor_image(R"({"dtype":"F32","shape":)" + allowed + R"(,"data_offsets":[0,8]})"),
      "shape extent that is not an integer");
}

TEST(SafetensorsReader, RejectsEmptyTensorName) {
  expect_format_error(make_image(R"({"":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})"),
                      "empty name");
}

TEST(SafetensorsReader, LongNamesAreShortenedInMessages) {
  const std::string name(100000, 'x');
  try {
    parse_safetensors(make_image("{\"" + name + "\":5}"));
    FAIL() << "no exception";
  } catch (const FormatError& e) {
    EXPECT_LT(std::string_view(e.what()).size(), 400u);
    EXPECT_NE(std::string_view(e.what()).find("xxx...'"), std::string_view::npos) << e.what();
  }
}

TEST(SafetensorsReader, AcceptsEdgeCases) {
  EXPECT_TRUE(parse_safetensors(make_image("{}")).tensors.empty());
  EXPECT_TRUE(parse_safetensors(make_image("  {  }  \n\t")).tensors.empty());
  EXPECT_EQ(parse_safetensors(make_image(R"({"__metadata__":{}})")).metadata.size(), 0u);
  const SafetensorsFile file =
      parse_safetensors(make_image(R"({"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                                   R"("e":{"dtype":"F64","shape":[0,5],"data_offsets":[4,4]},)"
                                   R"("z":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
                                   Bytes{1, 2, 3, 4}));
  ASSERT_EQ(file.tensors.size(), 3u);
  EXPECT_EQ(file.tensors[0].name, "z");
  EXPECT_EQ(file.tensors[1].name, "a");
  EXPECT_EQ(file.tensors[2].name, "e");
  EXPECT_EQ(file.at("a").numel(), 1);
  EXPECT_EQ(file.at("e").shape(), (std::vector<std::int64_t>{0, 5}));
}

// --- Mutation fuzz test --------------------------------------------------------------------

// Fragments that steer mutations towards the header rules: structure, keys, edge numbers, strings
// that are not valid UTF-8, and entries that parse.
const std::vector<std::string> kJsonFragments = {
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    " ",
    "\"a\"",
    "\"__metadata__\"",
    "{\"k\":\"v\"}",
    "\"dtype\":\"F32\"",
    "\"dtype\":\"F8\"",
    "\"shape\":[]",
    "\"shape\":[-1]",
    "\"shape\":[4294967296,4294967296]",
    "\"data_offsets\":[0,0]",
    "[0,4]",
    "[4,0]",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "1e308",
    "1.5",
    "-0",
    "0",
    "null",
    "true",
    "\"F64\"",
    "\"BOOL\"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\xff\xfe\"",
    "\"\xc3\xa9\"",
    "\"\xc3\"",
    "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}",
    ",\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}",
    ",\"__metadata__\":{\"x\":\"y\"}",
    "[[[[[[[[[[[[[[[[",
    "]]]]]]]]]]]]]]]]",
    "\"stride\":[1]",
};

Bytes mutate(Bytes image, Rng& rng) {
  const std::uint64_t rounds = 1 + rng.below(3);
  for (std::uint64_t round = 0; round < rounds; ++round) {
    // The header span as the image currently claims it, clamped to what is there.
    const std::uint64_t claimed = image.size() >= 8 ? header_length_of(image) : 0;
    const std::uint64_t header_end =
        image.size() >= 8 ? 8 + std::min<std::uint64_t>(claimed, image.size() - 8) : image.size();
    switch (rng.below(7)) {
      case 0: {  // flip bytes anywhere
        if (image.empty()) break;
        const std::uint64_t flips = 1 + rng.below(8);
        for (std::uint64_t i = 0; i < flips; ++i) {
          image[rng.below(image.size())] ^= static_cast<std::uint8_t>(1 + rng.below(255));
        }
        break;
      }
      case 1:  // truncate
        image.resize(rng.below(image.size() + 1));
        break;
      case 2: {  // extend with random bytes or padding
        const std::uint64_t extra = 1 + rng.below(64);
        const bool spaces = rng.below(2) == 0;
        for (std::uint64_t i = 0; i < extra; ++i) {
          image.push_back(spaces ? ' ' : static_cast<std::uint8_t>(rng.below(256)));
        }
        break;
      }
      case 3: {  // overwrite the header length
        if (image.size() < 8) break;
        const std::uint64_t size = image.size();
        const std::uint64_t choices[] = {
            rng.next_u64(),        claimed + rng.below(17) - 8, size - 8, size - 7,
            kMaxSafetensorsHeader, kMaxSafetensorsHeader + 1,   0,        rng.below(size)};
        set_header_length(image, choices[rng.below(std::size(choices))]);
        break;
      }
      case 4: {  // splice a JSON fragment into the header, usually keeping the length right
        if (image.size() < 8) break;
        const std::string& fragment = kJsonFragments[rng.below(kJsonFragments.size())];
        const std::uint64_t position = 8 + rng.below(header_end - 8 + 1);
        const std::uint64_t removed = std::min<std::uint64_t>(rng.below(12), header_end - position);
        image.erase(image.begin() + static_cast<std::ptrdiff_t>(position),
                    image.begin() + static_cast<std::ptrdiff_t>(position + removed));
        image.insert(image.begin() + static_cast<std::ptrdiff_t>(position), fragment.begin(),
                     fragment.end());
        if (rng.below(4) != 0) set_header_length(image, header_end - 8 - removed + fragment.size());
        break;
      }
      case 5: {  // change one digit in the header, which shifts offsets and extents
        std::vector<std::uint64_t> digits;
        for (std::uint64_t i = 8; i < header_end; ++i) {
          if (image[i] >= '0' && image[i] <= '9') digits.push_back(i);
        }
        if (digits.empty()) break;
        image[digits[rng.below(digits.size())]] = static_cast<std::uint8_t>('0' + rng.below(10));
        break;
      }
      case 6: {  // overwrite data bytes, which a valid header must accept
        if (header_end >= image.size()) break;
        image[header_end + rng.below(image.size() - header_end)] =
            static_cast<std::uint8_t>(rng.below(256));
        break;
      }
    }
  }
  return image;
}

// What a successful parse must satisfy: sizes agree with shapes, names are unique, the tensors
// tile the data section in order, and writing the result back gives an equal file.
void expect_self_consistent(const SafetensorsFile& file, const Bytes& image) {
  std::set<std::string> names;
  Bytes concatenated;
  std::vector<TensorView> views;
  for (const NamedTensor& named : file.tensors) {
    EXPECT_FALSE(named.name.empty());
    EXPECT_NE(named.name, "__metadata__");
    EXPECT_TRUE(names.insert(named.name).second) << "duplicate " << named.name;
    const Tensor& tensor = named.tensor;
    EXPECT_EQ(tensor.numel(), shape_numel(tensor.shape())) << named.name;
    EXPECT_EQ(tensor.nbytes(),
              static_cast<std::size_t>(tensor.numel()) * dtype_size(tensor.dtype()))
        << named.name;
    const Bytes bytes = tensor_bytes(tensor);
    concatenated.insert(concatenated.end(), bytes.begin(), bytes.end());
    views.push_back({named.name, tensor.dtype(), tensor.shape(), tensor.data()});
  }
  const Bytes data(image.begin() + 8 + static_cast<std::ptrdiff_t>(header_length_of(image)),
                   image.end());
  EXPECT_EQ(concatenated, data);

  const SafetensorsFile again = parse_safetensors(encode_safetensors(views, file.metadata));
  EXPECT_EQ(again.metadata, file.metadata);
  ASSERT_EQ(again.tensors.size(), file.tensors.size());
  for (std::size_t i = 0; i < file.tensors.size(); ++i) {
    EXPECT_EQ(again.tensors[i].name, file.tensors[i].name);
    EXPECT_EQ(again.tensors[i].tensor.dtype(), file.tensors[i].tensor.dtype());
    EXPECT_EQ(again.tensors[i].tensor.shape(), file.tensors[i].tensor.shape());
    EXPECT_EQ(tensor_bytes(again.tensors[i].tensor), tensor_bytes(file.tensors[i].tensor));
  }
}

TEST(SafetensorsFuzz, MutatedFilesParseConsistentlyOrThrowFormatError) {
  constexpr int kMutations = 20000;
  const std::vector<SampleTensor> samples = {
      make_sample("alpha", DType::F32, {2, 3}, 1), make_sample("beta", DType::U8, {5}, 2),
      make_sample("gamma", DType::F64, {}, 3), make_sample("delta", DType::BF16, {0}, 4),
      make_sample("eps", DType::I16, {3, 1}, 5)};
  const Bytes valid = encode_safetensors(views_of(samples), {{"format", "pt"}, {"step", "7"}});

  Rng rng(20240601);
  int accepted = 0;
  int rejected = 0;
  int unexpected = 0;
  for (int iteration = 0; iteration < kMutations && unexpected < 5; ++iteration) {
    const Bytes mutated = mutate(valid, rng);
    // An exact-size heap copy, so that AddressSanitizer sees a read past the end.
    auto exact = std::make_unique<std::uint8_t[]>(mutated.size());
    if (!mutated.empty()) std::memcpy(exact.get(), mutated.data(), mutated.size());
    try {
      const SafetensorsFile file =
          parse_safetensors(std::span<const std::uint8_t>(exact.get(), mutated.size()));
      ++accepted;
      expect_self_consistent(file, mutated);
    } catch (const FormatError&) {
      ++rejected;
    } catch (const std::exception& e) {
      ++unexpected;
      ADD_FAILURE() << "mutation " << iteration << " threw " << typeid(e).name() << ": "
                    << e.what();
    }
    if (::testing::Test::HasFailure()) {
      ADD_FAILURE() << "first failing mutation: " << iteration;
      break;
    }
  }
  EXPECT_GT(accepted, 100);
  EXPECT_GT(rejected, kMutations / 2);
  std::cout << "mutations accepted: " << accepted << ", rejected: " << rejected << "\n";
}

}  // namespace
}  // namespace nibble
