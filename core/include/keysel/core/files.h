// Output files that are whole or absent: written to a temporary name in the destination's directory, then
// renamed over the destination, so that a failure, a full disk or a kill mid-write never leaves a truncated
// file behind (and never destroys the file that was there).
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace keysel {

enum class OutputKind { file, directory };

/// Checks, before any work, that `path` can receive output: non-empty; an existing path must be of `kind`
/// (a file, or a directory) and writable; a new file's directory, or a new directory's nearest existing
/// ancestor, must exist and be writable. Throws keysel::Error of `function` naming `argument` otherwise.
/// Creates nothing.
void check_output_path(const std::filesystem::path& path, OutputKind kind, std::string_view function,
                       std::string_view argument);

/// Writes `contents` to `path` atomically (temporary file in the same directory, then rename). Throws
/// keysel::Error of `function` naming `argument` and the path when it cannot; the old file, if any, is then
/// untouched and no temporary file is left.
void write_file_atomically(const std::filesystem::path& path, std::string_view contents, std::string_view function,
                           std::string_view argument);

/// Writes several files together: every one goes to a temporary name first; only when all were written are they
/// renamed into place, so a failure while writing leaves none of them changed.
void write_files_atomically(const std::vector<std::pair<std::filesystem::path, std::string>>& files,
                            std::string_view function, std::string_view argument);

}  // namespace keysel
