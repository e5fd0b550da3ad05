// Injectable time source. Schedulers, controllers and deadline logic take a Clock& so tests can
// drive time with FakeClock instead of sleeping.
#ifndef COLLM_COMMON_CLOCK_H_
#define COLLM_COMMON_CLOCK_H_

#include <atomic>
#include <chrono>
#include <cstdint>

namespace collm {

// Monotonic time in nanoseconds. Implementations are thread-safe.
class Clock {
 public:
  virtual ~Clock() = default;
  virtual int64_t NowNanos() const = 0;
  double NowSeconds() const { return static_cast<double>(NowNanos()) * 1e-9; }

  // The process-wide steady clock. Never destroyed.
  static Clock& Real();
};

// A clock that only moves when told to. Thread-safe.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(int64_t start_nanos = 0) : now_(start_nanos) {}
  int64_t NowNanos() const override { return now_.load(std::memory_order_acquire); }
  void AdvanceNanos(int64_t delta) { now_.fetch_add(delta, std::memory_order_acq_rel); }
  void AdvanceSeconds(double seconds) { AdvanceNanos(static_cast<int64_t>(seconds * 1e9)); }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace collm

#endif  // COLLM_COMMON_CLOCK_H_
