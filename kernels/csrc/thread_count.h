// at::parallel_for that leaves the calling thread's torch thread count as it was.
//
// ATen initialises a thread's OpenMP count on its first parallel work, from the process-wide count that every
// set_num_threads also writes, and it keeps the "done" flag in an inline function: one flag per shared library.
// A thread's own torch ops set libtorch's flag; this library's was still unset on its first kernel call. A
// detector thread that had set its own count (1 of 2 threads, two calls at once) was then switched to whatever
// another thread had stored meanwhile, and the oneDNN work after the kernel ran with that count: the weights
// repacked for it and, on an AMD EPYC Zen 4, the first frame's mask features differed from run to run.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace vita_threads {

// this library's once-per-thread initialisation, done now, with the caller's count kept
inline void keep_thread_count() {
  thread_local bool kept = false;
  if (kept) return;
  const int count = at::get_num_threads();  // libtorch's own initialisation: this thread's count
  at::internal::lazy_init_num_threads();   // this library's: it may set the process-wide count instead
  if (at::get_num_threads() != count) at::set_num_threads(count);
  kept = true;
}

template <typename F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  keep_thread_count();
  at::parallel_for(begin, end, grain, f);
}

}  // namespace vita_threads
