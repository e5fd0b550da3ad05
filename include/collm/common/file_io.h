// Crash-safe whole-file writes, shared by every module that persists state (PEFT adapters, the
// aggregator's state dir, pulled adapters), and confinement of client-named paths to allowed roots.
#ifndef COLLM_COMMON_FILE_IO_H_
#define COLLM_COMMON_FILE_IO_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace collm {

// Temporary file in the same directory, fsync, rename, fsync the directory: a reader sees the old
// file or the new one, never a torn one. InternalError naming the file on failure (the temporary
// file is removed); the code follows errno (ResourceExhausted for a full disk, NotFound for a
// missing directory). The crash point "rename/<file name>" sits between the fsync and the rename.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);
// The same for a file written as consecutive pieces (a header and tensor data) without joining
// them in memory first.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<absl::string_view>& pieces);

// fsyncs a directory so renames into it are durable; best effort ("" = the current directory).
void FsyncDirectory(const std::string& dir);

// `path` with every symlink and ".." resolved, when that lies inside one of `roots` (each resolved
// the same way; a root is inside itself). For paths a remote client names: NotFound when `path`
// does not exist, PermissionDenied naming both the resolved path and the roots when it escapes
// them (a "../" or a symlink out of a root is an escape), FailedPrecondition when `roots` is empty.
absl::StatusOr<std::string> ResolveInsideRoots(const std::string& path,
                                               const std::vector<std::string>& roots);

}  // namespace collm

#endif  // COLLM_COMMON_FILE_IO_H_
