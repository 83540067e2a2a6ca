//! Fork-join for kernels called once per layer: the calling thread and idle pool threads take chunks of one
//! call's work from a shared counter.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `work(i)` for every `i < chunks`, on the calling thread and on up to `helpers` pool threads, each
/// taking the next chunk not yet taken. Returns once every chunk is done.
///
/// Unlike a parallel iterator started from outside the pool, the caller never sleeps waiting for the pool:
/// it starts on the chunks at once (pool threads join as they wake), and once none is left it spins (then
/// yields) only until the chunks other threads took are done, at most one chunk's time. Helpers that start
/// later find nothing to do. (From a thread outside the pool, a parallel iterator costs about 14 µs on the
/// development machine even when empty: the sleeping and waking of threads on both ends. That is half of a
/// 576×576 bf16 decode.) A panic in `work` unwinds from the caller once the helpers' chunks are done; in a
/// helper it aborts, as any panic in a `rayon::spawn` job does by default.
pub(crate) fn share(chunks: usize, helpers: usize, work: &(dyn Fn(usize) + Sync)) {
    // SAFETY: the lifetime is erased only so that pool jobs can hold the pointer; they call it only for a
    // chunk they took, and `Wait` (below) keeps this frame, hence `work`, alive until every taken chunk is
    // done, even when unwinding.
    let work = unsafe {
        std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync + 'static)>(work)
    };
    let shared = Arc::new(Shared { next: AtomicUsize::new(0), done: AtomicUsize::new(0), chunks, work });
    let _wait = Wait(&shared);
    for _ in 0..helpers.min(chunks.saturating_sub(1)) {
        let shared = Arc::clone(&shared);
        rayon::spawn(move || shared.take_all());
    }
    shared.take_all();
}

/// The state [`share`] and its helpers have in common.
struct Shared {
    /// The next chunk to take; values at or past `chunks` mean none is left.
    next: AtomicUsize,
    /// Chunks done (or abandoned by a panic).
    done: AtomicUsize,
    chunks: usize,
    work: *const (dyn Fn(usize) + Sync),
}

// SAFETY: `work` points to a `Sync` closure, called (through `&`) only under the protocol of `share`.
unsafe impl Send for Shared {}
// SAFETY: as above; the counters are atomics.
unsafe impl Sync for Shared {}

impl Shared {
    /// Takes and runs chunks until none is left.
    fn take_all(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.chunks {
                return;
            }
            let _done = Done(&self.done);
            // SAFETY: chunk `i` was taken before `Wait` closed the counter, so the caller of `share` waits for
            // `_done` to count it: `work` is alive.
            unsafe { (*self.work)(i) };
        }
    }
}

/// Counts a taken chunk as done when dropped, panicking or not.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        // Release: the chunk's writes happen before the caller's acquiring load sees the count.
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Closes the chunk counter and waits for every chunk taken before that to be done.
struct Wait<'a>(&'a Shared);

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        // Any `fetch_add` after this swap sees a value past `chunks`: no chunk can be taken any more.
        let taken = self.0.next.swap(usize::MAX / 2, Ordering::Relaxed).min(self.0.chunks);
        let mut spins = 0u32;
        while self.0.done.load(Ordering::Acquire) < taken {
            if spins < 1 << 10 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                // A helper was descheduled mid-chunk: let it run.
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::share;

    #[test]
    fn share_runs_every_chunk_once() {
        let counts: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        for helpers in [0, 1, 3, 200] {
            share(100, helpers, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 4));
        share(0, 3, &|_| unreachable!());
    }

    #[test]
    fn share_waits_for_helpers_when_the_caller_panics() {
        // The caller panics in its second chunk while helpers are in the middle of theirs, which borrow this
        // frame: `share` must not unwind past it before they are done.
        let caller = std::thread::current().id();
        let (running, caller_chunks) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            share(64, 3, &|i| {
                running.fetch_add(1, Ordering::SeqCst);
                if std::thread::current().id() != caller {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                } else if caller_chunks.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Give a helper (up to a second) to start a chunk.
                    let start = std::time::Instant::now();
                    while running.load(Ordering::SeqCst) < 2 && start.elapsed().as_secs() < 1 {
                        std::hint::spin_loop();
                    }
                } else {
                    running.fetch_sub(1, Ordering::SeqCst);
                    panic!("chunk {i}");
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }));
        assert!(unwound.is_err());
        assert_eq!(running.load(Ordering::SeqCst), 0, "a helper was still in a chunk after share returned");
    }
}
