// What the C++ tests share: a temporary directory per test, whole-file reads and writes, the
// message of an expected exception, uniform random values, and the names of generated tensors. Header-only, test-side.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

namespace nibble::test {

// A fresh directory under the system temp directory, removed with its contents at scope exit
// (after giving the owner back every permission a test may have taken away).
class TempDir {
 public:
  TempDir() {
    namespace fs = std::filesystem;
    static int counter = 0;
    const auto now = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    for (int attempt = 0; attempt < 1000; ++attempt) {
      path_ = fs::temp_directory_path() / ("nibble_test_" + std::to_string(::getpid()) + "_" +
                                           std::to_string(counter++) + "_" + std::to_string(now % 1000003));
      if (fs::create_directory(path_)) return;
    }
    throw std::runtime_error("cannot create a temporary directory");
  }
  ~TempDir() {
    namespace fs = std::filesystem;
    std::error_code ignored;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ignored);
    fs::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

using Bytes = std::vector<std::uint8_t>;

// The whole file; throws when it cannot be opened.
inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("test: cannot read " + path.string());
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
inline Bytes read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("test: cannot read " + path.string());
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Replaces the file with `bytes`; throws when that fails. Returns the path.
inline std::filesystem::path write_file(const std::filesystem::path& path, std::span<const std::uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("test: cannot write " + path.string());
  return path;
}
inline std::filesystem::path write_file(const std::filesystem::path& path, std::string_view text) {
  return write_file(path, std::span(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
}

// Runs `f`, which must throw E (or a subclass of it), and returns the message. Throwing anything
// else or nothing fails the test (naming `what` when given) and returns "".
template <class E, class F>
std::string thrown_message(F&& f, const std::string& what = "") {
  const std::string context = what.empty() ? "" : what + ": ";
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << context << "threw " << typeid(e).name() << " (" << e.what() << "), expected "
                  << typeid(E).name();
    return {};
  } catch (...) {
    ADD_FAILURE() << context << "threw something that is not a std::exception";
    return {};
  }
  ADD_FAILURE() << context << "threw nothing, expected " << typeid(E).name();
  return {};
}

// n values drawn uniformly from [lo, hi), one draw of `rng` each.
inline std::vector<float> uniform_values(std::mt19937& rng, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// "t0", "t1", ... (appended, not operator+: GCC 12 warns falsely on the latter).
inline std::string tensor_name(std::size_t i) {
  std::string name = "t";
  name += std::to_string(i);
  return name;
}

}  // namespace nibble::test
