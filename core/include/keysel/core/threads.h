// Thread control. keysel parallelises with OpenMP; these set how many threads its parallel regions use.
#pragma once

namespace keysel {

/// Threads keysel's parallel regions use (the OpenMP default unless set_num_threads was called).
int num_threads();
/// Sets the threads for keysel's parallel regions; `threads` must be in [1, max_threads()]. 0 restores the
/// default.
void set_num_threads(int threads);
/// The largest thread count set_num_threads accepts: max(1024, hardware_threads()).
int max_threads();
/// Logical processors available to this process.
int hardware_threads();

/// Sets the thread count for its lifetime, then restores the previous one.
class ScopedThreads {
 public:
  explicit ScopedThreads(int threads);
  ~ScopedThreads();
  ScopedThreads(const ScopedThreads&) = delete;
  ScopedThreads& operator=(const ScopedThreads&) = delete;

 private:
  int previous_;
};

}  // namespace keysel
