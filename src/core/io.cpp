// Atomic file writes: temporary beside the target, flush + fsync, rename, directory sync.
#include "nibble/io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <system_error>

#include "nibble/error.hpp"

namespace nibble {
namespace {

// The process's umask, read without setting it (umask() sets it, for every thread at once): from
// /proc/self/status (Linux 4.7 and later), else the usual 022.
mode_t process_umask() {
  if (std::FILE* status = std::fopen("/proc/self/status", "r")) {
    char line[256];
    unsigned mask = 0;
    while (std::fgets(line, sizeof line, status) != nullptr)
      if (std::sscanf(line, "Umask: %o", &mask) == 1) {
        std::fclose(status);
        return static_cast<mode_t>(mask);
      }
    std::fclose(status);
  }
  return 022;
}

}  // namespace

void write_file_atomic(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  // The temporary lives beside the target so that the rename stays on one file system and is
  // atomic. mkstemp makes a name no one else holds (another process, or another thread of this
  // one, writing the same path) and creates it exclusively, so it follows no link already there.
  std::string temp_name = path.string() + ".tmp-XXXXXX";
  const int fd = ::mkstemp(temp_name.data());
  if (fd < 0)
    throw IoError("cannot write '" + path.string() + "': cannot create a temporary beside it: " + std::strerror(errno));
  const std::filesystem::path temp_path = temp_name;
  auto fail = [&](const std::string& action, int error) {
    std::error_code ignored;
    std::filesystem::remove(temp_path, ignored);
    throw IoError("cannot write '" + path.string() + "': " + action + ": " + std::strerror(error));
  };
  // mkstemp's mode is 0600; the file gets the mode a new file would (0666 less the umask).
  if (::fchmod(fd, 0666 & ~process_umask()) != 0) {
    const int error = errno;
    ::close(fd);
    fail("chmod failed", error);
  }
  std::FILE* file = ::fdopen(fd, "wb");
  if (file == nullptr) {
    const int error = errno;
    ::close(fd);
    fail("fdopen failed", error);
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
