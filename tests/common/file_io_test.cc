// WriteFileAtomically on a real file system: it writes, replaces by rename (a reader holding the
// old file keeps the old bytes), leaves no temporary file behind, and fails with an error naming
// the file when the directory cannot take it.
#include "collm/common/file_io.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace collm {
namespace {

namespace fs = std::filesystem;

// A fresh directory under the system temp dir, removed at the end of the test.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "collm-file-io-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) ADD_FAILURE() << "mkdtemp " << pattern;
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string Read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> Entries(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  return names;
}

TEST(WriteFileAtomicallyTest, WritesTheExactBytes) {
  TempDir dir;
  const std::string path = dir.path() + "/state.bin";
  const std::string contents("header\0\x01\xff tail\n", 15);
  ASSERT_TRUE(WriteFileAtomically(path, contents).ok());
  EXPECT_EQ(Read(path), contents);
  ASSERT_TRUE(WriteFileAtomically(dir.path() + "/empty", "").ok());
  EXPECT_TRUE(fs::exists(dir.path() + "/empty"));
  EXPECT_EQ(fs::file_size(dir.path() + "/empty"), 0u);
}

TEST(WriteFileAtomicallyTest, ReplacesByRenameSoAReaderOfTheOldFileKeepsTheOldBytes) {
  TempDir dir;
  const std::string path = dir.path() + "/adapter_config.json";
  ASSERT_TRUE(WriteFileAtomically(path, "old contents").ok());
  struct stat before {};
  ASSERT_EQ(::stat(path.c_str(), &before), 0);
  std::ifstream reader(path, std::ios::binary);  // Opened before the replacement.
  ASSERT_TRUE(reader);

  ASSERT_TRUE(WriteFileAtomically(path, "new, longer contents").ok());
  EXPECT_EQ(Read(path), "new, longer contents");
  // An in-place rewrite (truncate + write) would show the reader the new or torn bytes; a rename
  // leaves it on the old inode, whole.
  std::ostringstream old;
  old << reader.rdbuf();
  EXPECT_EQ(old.str(), "old contents");
  struct stat after {};
  ASSERT_EQ(::stat(path.c_str(), &after), 0);
  EXPECT_NE(before.st_ino, after.st_ino) << "replaced by a new file, not rewritten";
}

TEST(WriteFileAtomicallyTest, LeavesNoTemporaryFileBehind) {
  TempDir dir;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(
        WriteFileAtomically(dir.path() + "/global.safetensors", std::string(4096, 'x')).ok());
  }
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"global.safetensors"});
}

TEST(WriteFileAtomicallyTest, MissingDirectoryIsAnErrorNamingTheFile) {
  TempDir dir;
  const std::string path = dir.path() + "/no/such/dir/state.json";
  const absl::Status s = WriteFileAtomically(path, "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);  // The code follows errno (ENOENT).
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_NE(s.message().find("No such file or directory"), std::string::npos) << s;
}

// WriteFileAtomically in a child process running as user `nobody` when this test runs as root
// (root ignores directory permissions); directly otherwise.
absl::Status WriteUnprivileged(const std::string& path, const std::string& contents) {
  if (::geteuid() != 0) return WriteFileAtomically(path, contents);
  int fds[2];
  if (::pipe(fds) != 0) return absl::InternalError("pipe failed");
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    constexpr uid_t kNobody = 65534;
    if (::setgid(kNobody) != 0 || ::setuid(kNobody) != 0) ::_exit(99);
    const absl::Status s = WriteFileAtomically(path, contents);
    const std::string out =
        std::to_string(static_cast<int>(s.code())) + " " + std::string(s.message());
    (void)!::write(fds[1], out.data(), out.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string out;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof(buf))) > 0;) out.append(buf, n);
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || out.empty()) {
    return absl::UnknownError("the unprivileged child failed (status " + std::to_string(status) +
                              ")");
  }
  const size_t space = out.find(' ');
  return absl::Status(static_cast<absl::StatusCode>(std::stoi(out.substr(0, space))),
                      out.substr(space + 1));
}

TEST(WriteFileAtomicallyTest, UnwritableDirectoryIsAnErrorNamingTheFileAndLeavesItAlone) {
  TempDir dir;
  const std::string path = dir.path() + "/state.json";
  ASSERT_TRUE(WriteFileAtomically(path, "kept").ok());
  // r-x for everyone: the file can be reached and read, nothing can be created next to it.
  fs::permissions(dir.path(), fs::perms::owner_read | fs::perms::owner_exec |
                                  fs::perms::group_read | fs::perms::group_exec |
                                  fs::perms::others_read | fs::perms::others_exec);
  const absl::Status s = WriteUnprivileged(path, "lost");
  fs::permissions(dir.path(), fs::perms::owner_all);
  EXPECT_EQ(s.code(), absl::StatusCode::kPermissionDenied) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_NE(s.message().find("Permission denied"), std::string::npos) << s;
  EXPECT_EQ(Read(path), "kept");
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"state.json"});
}

TEST(WriteFileAtomicallyTest, TargetThatIsADirectoryFailsAndRemovesTheTemporaryFile) {
  TempDir dir;
  const std::string path = dir.path() + "/occupied";
  fs::create_directories(path + "/child");  // rename(file, non-empty dir) fails for everyone.
  const absl::Status s = WriteFileAtomically(path, "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);  // EISDIR / ENOTEMPTY.
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_NE(s.message().find("rename from"), std::string::npos) << s;
  EXPECT_EQ(Entries(dir.path()), std::vector<std::string>{"occupied"}) << "no temporary file left";
  EXPECT_TRUE(fs::is_directory(path));
}

TEST(ResolveInsideRootsTest, AcceptsPathsInsideAndRefusesEveryWayOut) {
  TempDir dir;
  const std::string root = dir.path() + "/models";
  fs::create_directories(root + "/a/b");
  fs::create_directories(dir.path() + "/models2/x");  // Shares the root's prefix, not its tree.
  fs::create_directories(dir.path() + "/secret");
  fs::create_directory_symlink(dir.path() + "/secret", root + "/escape");
  fs::create_directory_symlink(root + "/a/b", dir.path() + "/alias");  // Outside, pointing in.

  auto inside = ResolveInsideRoots(root + "/a/./b/", {root});
  ASSERT_TRUE(inside.ok()) << inside.status();
  EXPECT_EQ(*inside, fs::canonical(root + "/a/b").string());
  EXPECT_TRUE(ResolveInsideRoots(root, {root}).ok());
  EXPECT_TRUE(ResolveInsideRoots(dir.path() + "/alias", {root}).ok());  // Resolved: inside.
  EXPECT_TRUE(
      ResolveInsideRoots(dir.path() + "/models2/x", {"/nonexistent", dir.path() + "/models2"})
          .ok());

  for (const std::string& out :
       {root + "/../secret", root + "/escape", dir.path() + "/models2/x", std::string("/")}) {
    auto r = ResolveInsideRoots(out, {root});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kPermissionDenied) << out;
    EXPECT_NE(r.status().message().find("outside the allowed roots"), std::string::npos)
        << r.status();
  }
  EXPECT_EQ(ResolveInsideRoots(root + "/missing", {root}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(ResolveInsideRoots(root, {}).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace collm
