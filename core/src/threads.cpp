#include "keysel/core/threads.h"

#include <omp.h>

#include <thread>

#include "keysel/core/error.h"

namespace keysel {
namespace {
int g_default_threads = 0;  // the OpenMP default, captured before the first change
int g_threads = 0;          // 0: not set
}  // namespace

int num_threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

void set_num_threads(int threads) {
  KEYSEL_CHECK_ARG(threads >= 0, "threads", ">= 1, or 0 for the default", threads);
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
