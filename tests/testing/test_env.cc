#include "testing/test_env.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <vector>

namespace collm::testing {
namespace fs = std::filesystem;
namespace {

// Removes every temp dir made by this process at exit, so failed tests leave nothing behind.
class TempDirRegistry {
 public:
  static TempDirRegistry& Get() {
    static TempDirRegistry* registry = [] {
      auto* r = new TempDirRegistry();
      std::atexit([] { Get().RemoveAll(); });
      return r;
    }();
    return *registry;
  }
  void Add(const std::string& dir) {
    std::lock_guard<std::mutex> lock(mu_);
    dirs_.push_back(dir);
  }
  void RemoveAll() {
    std::lock_guard<std::mutex> lock(mu_);
    if (std::getenv("COLLM_KEEP_TEST_DIRS") != nullptr) return;
    for (const auto& d : dirs_) {
      std::error_code ec;
      fs::remove_all(d, ec);
    }
    dirs_.clear();
  }

 private:
  std::mutex mu_;
  std::vector<std::string> dirs_;
};

}  // namespace

std::string MakeTempDir(const std::string& prefix) {
  std::string pattern = (fs::temp_directory_path() / (prefix + "-XXXXXX")).string();
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp failed for " << pattern;
    return "";
  }
  std::string dir(buf.data());
  TempDirRegistry::Get().Add(dir);
  return dir;
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    ADD_FAILURE() << "cannot read " << path;
    return "";
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFileOrDie(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  if (!out) ADD_FAILURE() << "cannot write " << path;
}

std::string ResolveSharedPath(const char* env_var, const std::string& relative,
                              std::string* skip_reason, std::string* error) {
  const char* root = std::getenv(env_var);
  if (root == nullptr || *root == '\0') {
    *skip_reason = std::string(env_var) + " is not set; skipping the test that needs " + relative +
                   " (CI sets it to ../shared/...)";
    return "";
  }
  fs::path path = fs::path(root) / relative;
  if (!fs::exists(path)) {
    *error = std::string(env_var) + "=" + root + " is set but " + path.string() + " does not exist";
    return "";
  }
  return path.string();
}

}  // namespace collm::testing
