#include "keysel/core/threads.h"

#include <omp.h>

#include <algorithm>
#include <string>
#include <thread>

#include "keysel/core/error.h"

namespace keysel {
namespace {
int g_default_threads = 0;  // the OpenMP default, captured before the first change
int g_threads = 0;          // 0: not set
}  // namespace

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

int max_threads() { return std::max(1024, hardware_threads()); }

void set_num_threads(int threads) {
  // OpenMP runtimes abort (libgomp near 50 000) or crash when asked for absurd team sizes: bound it.
  KEYSEL_CHECK_ARG(threads >= 0 && threads <= max_threads(), "threads",
                   "an integer in [1, " + std::to_string(max_threads()) + "], or 0 for the default", threads);
  if (g_default_threads == 0) g_default_threads = omp_get_max_threads();
  g_threads = threads;
  omp_set_num_threads(threads > 0 ? threads : g_default_threads);
}

int hardware_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

ScopedThreads::ScopedThreads(int threads) : previous_(g_threads) { set_num_threads(threads); }
ScopedThreads::~ScopedThreads() { set_num_threads(previous_); }

}  // namespace keysel
