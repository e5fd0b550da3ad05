#include "testing/tcp_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace collm::testing {
namespace {

// SO_LINGER 0 makes close() send RST: what a NAT timeout or a dropped uplink looks like to gRPC.
void CloseWithReset(int fd) {
  if (fd < 0) return;
  linger l{};
  l.l_onoff = 1;
  l.l_linger = 0;
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
  close(fd);
}

sockaddr_in Loopback(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  return a;
}

bool WriteAll(int fd, const char* data, ssize_t n) {
  while (n > 0) {
    const ssize_t w = send(fd, data, static_cast<size_t>(n), MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    data += w;
    n -= w;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TcpProxy>> TcpProxy::Start(int target_port) {
  std::unique_ptr<TcpProxy> p(new TcpProxy());
  p->target_port_ = target_port;
  p->listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
  if (p->listen_fd_ < 0) return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  const int one = 1;
  setsockopt(p->listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a = Loopback(0);
  if (bind(p->listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      listen(p->listen_fd_, 64) != 0) {
    return absl::InternalError(absl::StrCat("bind/listen on 127.0.0.1:0: ", strerror(errno)));
  }
  socklen_t len = sizeof(a);
  getsockname(p->listen_fd_, reinterpret_cast<sockaddr*>(&a), &len);
  p->port_ = ntohs(a.sin_port);
  p->acceptor_ = std::thread([raw = p.get()] { raw->AcceptLoop(); });
  return p;
}

TcpProxy::~TcpProxy() {
  stopping_ = true;
  if (acceptor_.joinable()) acceptor_.join();
  close(listen_fd_);
  std::vector<std::thread> pumps;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pumps.swap(pumps_);
  }
  for (auto& t : pumps) t.join();
}

void TcpProxy::Cut() {
  cut_ = true;
  ++generation_;
}

void TcpProxy::Restore() { cut_ = false; }

void TcpProxy::ResetAll() { ++generation_; }

void TcpProxy::SetDelay(std::chrono::milliseconds delay) { delay_ms_ = delay.count(); }

void TcpProxy::AcceptLoop() {
  while (!stopping_) {
    pollfd pfd{listen_fd_, POLLIN, 0};
    if (poll(&pfd, 1, 50) <= 0) continue;
    const int client = accept(listen_fd_, nullptr, nullptr);
    if (client < 0) continue;
    ++accepted_;
    if (cut_) {
      ++reset_;
      CloseWithReset(client);
      continue;
    }
    const int upstream = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in target = Loopback(target_port_);
    if (upstream < 0 ||
        connect(upstream, reinterpret_cast<sockaddr*>(&target), sizeof(target)) != 0) {
      ++reset_;
      CloseWithReset(upstream);
      CloseWithReset(client);
      continue;
    }
    const int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    const uint64_t generation = generation_.load();
    std::lock_guard<std::mutex> lock(mu_);
    pumps_.emplace_back(
        [this, client, upstream, generation] { Pump(client, upstream, generation); });
  }
}

void TcpProxy::Pump(int client, int upstream, uint64_t generation) {
  // fds[i] reads what goes to fds[1 - i]; open[i]: fds[i] has not sent EOF yet.
  const int fds[2] = {client, upstream};
  bool open[2] = {true, true};
  char buf[64 * 1024];
  bool reset = false;
  while (open[0] || open[1]) {
    if (stopping_ || generation_.load() != generation) {
      reset = true;
      break;
    }
    pollfd pfds[2] = {{fds[0], static_cast<short>(open[0] ? POLLIN : 0), 0},
                      {fds[1], static_cast<short>(open[1] ? POLLIN : 0), 0}};
    if (poll(pfds, 2, 50) <= 0) continue;
    for (int i = 0; i < 2 && !reset; ++i) {
      if (!open[i] || !(pfds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      const ssize_t n = recv(fds[i], buf, sizeof(buf), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {  // The peer reset: pass the reset on.
        reset = true;
        break;
      }
      if (n == 0) {
        open[i] = false;
        shutdown(fds[1 - i], SHUT_WR);
        continue;
      }
      if (const int64_t ms = delay_ms_.load(); ms > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
      }
      if (generation_.load() != generation || !WriteAll(fds[1 - i], buf, n)) reset = true;
    }
    if (reset) break;
  }
  if (reset) {
    ++reset_;
    CloseWithReset(client);
    CloseWithReset(upstream);
  } else {
    close(client);
    close(upstream);
  }
}

}  // namespace collm::testing
