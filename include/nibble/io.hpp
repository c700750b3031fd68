// Atomic file writes: every file nibble saves (checkpoints, reports, plots) goes through here, so
// a reader never sees a half-written file and a failed write leaves the old one untouched.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <string_view>

namespace nibble {

// Writes to "<path>.tmp-<pid>" beside `path`, flushes and fsyncs it, renames it over `path`, then
// syncs the directory (best effort). Throws IoError naming the path and the failing step; a
// failed write removes its temporary and leaves an existing file at `path` unchanged.
void write_file_atomic(const std::filesystem::path& path, std::span<const std::byte> bytes);
void write_file_atomic(const std::filesystem::path& path, std::string_view text);

}  // namespace nibble
