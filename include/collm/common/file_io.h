// Crash-safe whole-file writes, shared by every module that persists state (PEFT adapters, the
// aggregator's state dir, pulled adapters).
#ifndef COLLM_COMMON_FILE_IO_H_
#define COLLM_COMMON_FILE_IO_H_

#include <string>

#include "absl/status/status.h"

namespace collm {

// Temporary file in the same directory, fsync, rename, fsync the directory: a reader sees the old
// file or the new one, never a torn one. InternalError naming the file on failure (the temporary
// file is removed).
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

// fsyncs a directory so renames into it are durable; best effort ("" = the current directory).
void FsyncDirectory(const std::string& dir);

}  // namespace collm

#endif  // COLLM_COMMON_FILE_IO_H_
