// Atomic file writes: temporary beside the target, flush + fsync, rename, directory sync.
#include "nibble/io.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <system_error>

#include "nibble/error.hpp"

namespace nibble {

void write_file_atomic(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  // The temporary lives beside the target so that the rename stays on one file system and is
  // atomic; the pid keeps two processes writing one path from sharing a temporary.
  std::filesystem::path temp_path = path;
  temp_path += ".tmp-" + std::to_string(::getpid());
  auto fail = [&](const std::string& action, int error) {
    std::error_code ignored;
    std::filesystem::remove(temp_path, ignored);
    throw IoError("cannot write '" + path.string() + "': " + action + ": " + std::strerror(error));
  };

  std::FILE* file = std::fopen(temp_path.c_str(), "wb");
  if (file == nullptr) {
    // Nothing of ours to remove: whatever stands at temp_path is not the temporary.
    throw IoError("cannot write '" + path.string() + "': cannot create '" + temp_path.string() +
                  "': " + std::strerror(errno));
  }
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), file) != bytes.size()) {
    const int error = errno;
    std::fclose(file);
    fail("write failed", error);
  }
  if (std::fflush(file) != 0 || ::fsync(::fileno(file)) != 0) {
    const int error = errno;
    std::fclose(file);
    fail("flush failed", error);
  }
  if (std::fclose(file) != 0) fail("close failed", errno);
  std::error_code rename_error;
  std::filesystem::rename(temp_path, path, rename_error);
  if (rename_error) {
    std::error_code ignored;
    std::filesystem::remove(temp_path, ignored);
    throw IoError("cannot write '" + path.string() + "': rename from '" + temp_path.string() +
                  "' failed: " + rename_error.message());
  }
  // Syncing the directory makes the rename itself survive a power loss. Best effort: some file
  // systems do not support it, and the file's contents are already safe.
  const std::filesystem::path directory = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const int directory_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY);
  if (directory_fd >= 0) {
    ::fsync(directory_fd);
    ::close(directory_fd);
  }
}

void write_file_atomic(const std::filesystem::path& path, std::string_view text) {
  write_file_atomic(path, std::as_bytes(std::span<const char>(text.data(), text.size())));
}

}  // namespace nibble
