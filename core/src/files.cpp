#include "keysel/core/files.h"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <span>
#include <system_error>

#include "keysel/core/error.h"

namespace keysel {
namespace {

namespace fs = std::filesystem;

std::string quoted(const fs::path& path) {
  std::string text = "\"";  // appended piecewise: GCC 12 warns (-Wrestrict) on "\"" + string + "\""
  text += path.string();
  text += '"';
  return text;
}

bool writable(const fs::path& path) { return ::access(path.c_str(), W_OK) == 0; }

/// A temporary name beside `path` that no other writer in this or another process picks.
fs::path temporary_name(const fs::path& path) {
  static std::atomic<unsigned> counter{0};
  std::string name = ".";  // appended piecewise: GCC 12 warns (-Wrestrict) on a chain of operator+ here
  name += path.filename().string();
  name += ".tmp-";
  name += std::to_string(::getpid());
  name += '-';
  name += std::to_string(counter.fetch_add(1));
  return path.parent_path() / name;
}

/// Writes `contents` to `temp`; returns the error text, empty on success.
std::string write_temporary(const fs::path& temp, std::string_view contents) {
  std::FILE* file = std::fopen(temp.c_str(), "wb");
  if (file == nullptr) return std::string("cannot open for writing: ") + std::strerror(errno);
  const bool written = std::fwrite(contents.data(), 1, contents.size(), file) == contents.size();
  const int write_errno = errno;
  const bool flushed = std::fflush(file) == 0 && ::fsync(::fileno(file)) == 0;
  const bool closed = std::fclose(file) == 0;
  if (!written) return std::string("cannot write: ") + std::strerror(write_errno);
  if (!flushed || !closed) return std::string("cannot write: ") + std::strerror(errno);
  return {};
}

}  // namespace

void check_output_path(const fs::path& path, OutputKind kind, std::string_view function, std::string_view argument) {
  const std::string what = kind == OutputKind::file ? "a writable file path" : "a writable directory path";
  if (path.empty()) detail::throw_argument_error(function, argument, what, "an empty path");
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (fs::exists(status)) {
    if (kind == OutputKind::file && fs::is_directory(status)) {
      detail::throw_argument_error(function, argument, what, quoted(path) + ", which is a directory");
    }
    if (kind == OutputKind::directory && !fs::is_directory(status)) {
      detail::throw_argument_error(function, argument, what, quoted(path) + ", which is not a directory");
    }
    const fs::path directory = kind == OutputKind::file ? fs::absolute(path, ec).parent_path() : path;
    if (!writable(directory) || (kind == OutputKind::file && !writable(path))) {
      detail::throw_argument_error(function, argument, what, quoted(path) + ", which is not writable");
    }
    return;
  }
  // A new path: the nearest existing ancestor must be a writable directory (a new file's parent must exist).
  fs::path ancestor = fs::absolute(path, ec).parent_path();
  if (kind == OutputKind::directory) {
    while (!ancestor.empty() && !fs::exists(ancestor, ec) && ancestor != ancestor.root_path()) {
      ancestor = ancestor.parent_path();
    }
  }
  if (!fs::is_directory(ancestor, ec)) {
    detail::throw_argument_error(function, argument, what,
                                 quoted(path) + ", whose directory " + quoted(ancestor) + " does not exist");
  }
  if (!writable(ancestor)) {
    detail::throw_argument_error(function, argument, what,
                                 quoted(path) + ", whose directory " + quoted(ancestor) + " is not writable");
  }
}

namespace {

/// Writes every file to a temporary name beside it, then renames them all (write_files_atomically).
void write_all_atomically(std::span<const std::pair<fs::path, std::string_view>> files, std::string_view function,
                          std::string_view argument) {
  std::vector<fs::path> temporaries;
  const auto discard = [&] {
    std::error_code ignored;
    for (const fs::path& t : temporaries) fs::remove(t, ignored);
  };
  for (const auto& [path, contents] : files) {
    if (path.empty()) {
      discard();
      detail::throw_argument_error(function, argument, "a file path", "an empty path");
    }
    temporaries.push_back(temporary_name(path));
    const std::string failure = write_temporary(temporaries.back(), contents);
    if (!failure.empty()) {
      discard();
      detail::throw_argument_error(function, argument, "a writable file path",
                                   quoted(path) + " (" + failure + ")");
    }
  }
  for (std::size_t i = 0; i < files.size(); ++i) {
    std::error_code ec;
    fs::rename(temporaries[i], files[i].first, ec);
    if (ec) {
      // Renames already done stay (each file is whole); the rest are discarded.
      for (std::size_t j = i; j < temporaries.size(); ++j) {
        std::error_code ignored;
        fs::remove(temporaries[j], ignored);
      }
      detail::throw_argument_error(function, argument, "a writable file path",
                                   quoted(files[i].first) + " (" + ec.message() + ")");
    }
  }
}

}  // namespace

void write_files_atomically(const std::vector<std::pair<fs::path, std::string>>& files, std::string_view function,
                            std::string_view argument) {
  std::vector<std::pair<fs::path, std::string_view>> views;
  views.reserve(files.size());
  for (const auto& [path, contents] : files) views.emplace_back(path, contents);
  write_all_atomically(views, function, argument);
}

void write_file_atomically(const fs::path& path, std::string_view contents, std::string_view function,
                           std::string_view argument) {
  // No copy of `contents`: safetensors and .npy writers hand over whole files.
  const std::pair<fs::path, std::string_view> file{path, contents};
  write_all_atomically({&file, 1}, function, argument);
}

}  // namespace keysel
