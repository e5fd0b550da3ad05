#include "collm/common/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "collm/common/crash_point.h"

namespace collm {
void FsyncDirectory(const std::string& dir) {
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<absl::string_view>& pieces) {
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  // Codes follow errno, so a full disk (ENOSPC) or a file-size limit (EFBIG) says so.
  auto failed = [](int err, const std::string& file, absl::string_view op) {
    return absl::Status(absl::ErrnoToStatusCode(err),
                        absl::StrCat(file, ": ", op, " failed: ", std::strerror(err)));
  };
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return failed(errno, tmp, "create");
  for (absl::string_view piece : pieces) {
    size_t done = 0;
    while (done < piece.size()) {
      const ssize_t n = ::write(fd, piece.data() + done, piece.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int err = n < 0 ? errno : ENOSPC;
        ::close(fd);
        ::unlink(tmp.c_str());
        return failed(err, tmp, "write");
      }
      done += static_cast<size_t>(n);
    }
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return failed(err, tmp, "fsync");
  }
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return failed(err, tmp, "close");
  }
  CrashPoint("rename", std::filesystem::path(path).filename().string());
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return failed(err, path, absl::StrCat("rename from ", tmp));
  }
  // The rename is durable only once the directory entry is.
  FsyncDirectory(std::filesystem::path(path).parent_path().string());
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents) {
  return WriteFileAtomically(path, std::vector<absl::string_view>{contents});
}

absl::StatusOr<std::string> ResolveInsideRoots(const std::string& path,
                                               const std::vector<std::string>& roots) {
  namespace fs = std::filesystem;
  if (roots.empty()) return absl::FailedPreconditionError("no allowed roots are configured");
  std::error_code ec;
  const fs::path resolved = fs::canonical(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat(path, ": ", ec.message()));
  std::vector<std::string> shown;
  for (const std::string& root : roots) {
    const fs::path r = fs::canonical(root, ec);
    if (ec) {
      shown.push_back(absl::StrCat(root, " (", ec.message(), ")"));
      continue;
    }
    shown.push_back(r.string());
    // Component-wise, so /models2 is not inside /models.
    if (std::mismatch(r.begin(), r.end(), resolved.begin(), resolved.end()).first == r.end())
      return resolved.string();
  }
  return absl::PermissionDeniedError(absl::StrCat(path, " resolves to ", resolved.string(),
                                                  ", which is outside the allowed roots [",
                                                  absl::StrJoin(shown, ", "), "]"));
}

}  // namespace collm
