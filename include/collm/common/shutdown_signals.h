// SIGTERM/SIGINT handling for the daemons (collmd, collm-aggregator, collm-router): the signals
// are blocked in every thread and taken synchronously by one sigwait, so shutdown runs as
// ordinary code on the main thread instead of in a signal handler. SIGXFSZ is ignored.
#ifndef COLLM_COMMON_SHUTDOWN_SIGNALS_H_
#define COLLM_COMMON_SHUTDOWN_SIGNALS_H_

#include <pthread.h>
#include <signal.h>

namespace collm {

// Construct first in main(), before any thread starts: threads inherit the blocked mask, so
// only Wait() receives the signals. Owned by the main thread.
class ShutdownSignals {
 public:
  ShutdownSignals() {
    sigemptyset(&signals_);
    sigaddset(&signals_, SIGTERM);
    sigaddset(&signals_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals_, nullptr);
    // Past a file-size limit (ulimit -f, RLIMIT_FSIZE) a write fails with EFBIG, which the
    // state and checkpoint writers report like a full disk, keeping the previous file; the
    // default SIGXFSZ action would kill the daemon instead.
    signal(SIGXFSZ, SIG_IGN);
  }
  ShutdownSignals(const ShutdownSignals&) = delete;
  ShutdownSignals& operator=(const ShutdownSignals&) = delete;

  // Blocks until SIGTERM or SIGINT arrives; returns it.
  int Wait() const {
    int sig = 0;
    sigwait(&signals_, &sig);
    return sig;
  }

 private:
  sigset_t signals_;
};

}  // namespace collm

#endif  // COLLM_COMMON_SHUTDOWN_SIGNALS_H_
