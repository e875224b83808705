//! A fork-join pool for kernel calls: the calling thread and `threads - 1` workers split a
//! job into chunks.
//!
//! A decode step makes dozens of parallel calls of a few microseconds to a millisecond each,
//! so waking threads through the OS on every call (as a general task pool does) costs as
//! much as the work. Workers here spin for a while after each job, so the next call of the
//! same step finds them awake, and sleep on a condition variable once idle.

#![allow(
    unsafe_code,
    reason = "a job borrows the caller's closure across threads"
)]

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    thread::JoinHandle,
};

/// Spin iterations before an idle worker sleeps (tens of microseconds).
const SPIN: u32 = 1 << 16;

/// One job: `run(i)` for every chunk `i < chunks`.
struct Job<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    chunks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

impl Job<'_> {
    /// Takes and runs chunks until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.chunks {
                return;
            }
            (self.run)(i);
            self.done.fetch_add(1, SeqCst);
        }
    }
}

/// State shared with the workers.
struct Shared {
    /// The current job (a `Job` on the submitting thread's stack), or null.
    job: AtomicPtr<Job<'static>>,
    /// Bumped for every job (and at shutdown).
    generation: AtomicU64,
    /// Workers between announcing interest in the current job and leaving it.
    active: AtomicUsize,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<bool>,
    wake: Condvar,
}

/// A fork-join pool of `threads` threads, the caller included.
pub struct Workers {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// Serialises submitters (a job uses the single `job` slot).
    submit: Mutex<()>,
}

impl Workers {
    /// A pool of `threads` threads in all (`threads - 1` are spawned).
    pub fn new(threads: usize) -> std::io::Result<Workers> {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            generation: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(false),
            wake: Condvar::new(),
        });
        let handles = (1..threads.max(1))
            .map(|i| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("llmc-cpu-{i}"))
                    .spawn(move || worker(&shared))
            })
            .collect::<Result<_, _>>()?;
        Ok(Workers {
            shared,
            handles,
            submit: Mutex::new(()),
        })
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Runs `run(i)` for every `i < chunks`, on the calling thread and the workers; returns
    /// when all have finished.
    pub fn run(&self, chunks: usize, run: &(dyn Fn(usize) + Sync)) {
        let _one_at_a_time = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let job = Job {
            run,
            chunks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        };
        let s = &*self.shared;
        // SAFETY: the pointer is withdrawn, and every worker that may have read it has
        // left (`active == 0`), before `job` goes out of scope below.
        let erased = (&job as *const Job<'_>).cast::<Job<'static>>().cast_mut();
        s.job.store(erased, SeqCst);
        s.generation.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job.work();
        while job.done.load(SeqCst) < chunks {
            std::hint::spin_loop();
        }
        s.job.store(std::ptr::null_mut(), SeqCst);
        while s.active.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
    }
}

/// A worker: waits for a new generation, helps with its job, repeats until shutdown.
fn worker(s: &Shared) {
    let mut seen = s.generation.load(SeqCst);
    loop {
        let mut spins = 0;
        while s.generation.load(SeqCst) == seen {
            if spins < SPIN {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut shutdown = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, SeqCst);
            while s.generation.load(SeqCst) == seen && !*shutdown {
                shutdown = s.wake.wait(shutdown).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, SeqCst);
            if *shutdown {
                return;
            }
        }
        seen = s.generation.load(SeqCst);
        s.active.fetch_add(1, SeqCst);
        let job = s.job.load(SeqCst);
        if !job.is_null() {
            // SAFETY: a non-null job stays alive until `active` drops to zero (see
            // `Workers::run`), and this worker is counted in `active`.
            unsafe { &*job }.work();
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        *self.shared.lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.generation.fetch_add(1, SeqCst);
        self.shared.wake.notify_all();
        for handle in self.handles.drain(..) {
            // A worker that panicked has nothing left to clean up.
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once_per_job() {
        let workers = Workers::new(3).expect("threads");
        for chunks in [0, 1, 2, 3, 7, 64] {
            let counts: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                workers.run(chunks, &|i| {
                    counts[i].fetch_add(1, SeqCst);
                });
            }
            assert!(counts.iter().all(|c| c.load(SeqCst) == 50));
        }
    }

    #[test]
    fn sleeping_workers_wake_up() {
        let workers = Workers::new(2).expect("threads");
        let sum = AtomicUsize::new(0);
        for round in 0..3 {
            // Long enough for the worker to stop spinning and sleep.
            std::thread::sleep(std::time::Duration::from_millis(30));
            workers.run(4, &|i| {
                sum.fetch_add(i + 1, SeqCst);
            });
            assert_eq!(sum.load(SeqCst), 10 * (round + 1));
        }
    }
}
