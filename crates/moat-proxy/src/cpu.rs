//! How the kernel schedules the sidecar's threads (`--cpu-scheduling`, decisions 50 and 52).
//!
//! A sidecar relays: each request wakes it on one socket and it writes to another, which wakes
//! the next process on the path (the app, the far sidecar). Under the default policy each of
//! those wake-ups may preempt whatever runs on the core, so a request crossing a pod switches
//! tasks at every hop. Under `SCHED_BATCH` a woken sidecar thread never preempts: it runs at
//! the next switch the kernel makes anyway, and then finds several connections ready at once.
//! Its share of the CPU (its nice value, its cgroup's weight) is unchanged; only when it starts
//! running is.
//!
//! That wait is what a lightly loaded sidecar's tail is made of, and at light load there is
//! little to batch. So by default (`adaptive`) each worker thread measures the CPU it used over
//! the last [`WINDOW`] whenever it runs out of work, and runs under `SCHED_BATCH` only while
//! that is a large share of the window ([`Load`]).

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use thread_priority::unix::{
    NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
    thread_native_id, thread_schedule_policy,
};
use thread_priority::{ThreadPriority, ThreadPriorityValue};

/// The scheduling policy the sidecar puts its threads under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuScheduling {
    /// `SCHED_BATCH` while a worker thread is busy, as started while it is not: batched
    /// wake-ups under load, prompt ones at light load. Threads other than the workers (the log
    /// writer, the allocator's purging thread) stay under `SCHED_BATCH`.
    Adaptive,
    /// `SCHED_BATCH`: a sidecar thread woken by its sockets does not preempt the running task.
    Batch,
    /// Left as started (normally `SCHED_OTHER`): every wake-up may preempt.
    Normal,
}

const OTHER: ThreadSchedulePolicy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);
const BATCH: ThreadSchedulePolicy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);

/// How long a worker's load is measured over before its policy is chosen again.
pub const WINDOW: Duration = Duration::from_millis(100);
/// A worker that used at least this share of a core over a window goes under `SCHED_BATCH`.
/// compare's load tests keep each sidecar's worker well above it, its fixed 1,000 req/s well
/// below (decision 52).
pub const ENTER_BATCH: f64 = 0.25;
/// A worker under `SCHED_BATCH` that used less than this share goes back to `SCHED_OTHER`;
/// the gap keeps a load near one line from switching the policy at every window.
pub const LEAVE_BATCH: f64 = 0.10;

/// The point of thread-priority's scale that keeps the nice value the sidecar started with,
/// set when `adaptive` was asked for and taken: [`on_park`] switches workers with it.
static ADAPTIVE: OnceLock<ThreadPriority> = OnceLock::new();
/// Whether a switch the kernel refused has been logged (once is enough).
static REFUSED: AtomicBool = AtomicBool::new(false);

/// Puts the calling thread, and so every thread it starts from then on, under `policy`
/// (`SCHED_BATCH` for `adaptive` too, until [`on_park`] finds a worker idle). Called first
/// thing in `main`, before any other thread exists. The nice value stays what the sidecar was
/// started with, and a sidecar started under another policy than the default (`chrt`) keeps
/// that one, adaptive or not. An error says what was not done and what the sidecar runs under
/// instead.
pub fn apply(policy: CpuScheduling) -> Result<(), String> {
    let started = thread_schedule_policy()
        .map_err(|e| format!("cannot read the scheduling policy ({e:?}); it is left as started"))?;
    if policy == CpuScheduling::Normal || started != OTHER {
        return Ok(());
    }
    let nice = rustix::process::getpriority_process(None).map_err(|e| {
        format!("cannot read the nice value ({e}); the sidecar runs under {started:?}")
    })?;
    // thread-priority sets a nice value along with a normal policy, from a 0..=99 scale: the
    // point of that scale it maps to the current nice value sets it again unchanged (setting
    // the same value needs no privilege, lowering it would).
    let same_nice = (0..=99u8)
        .filter_map(|p| ThreadPriorityValue::try_from(p).ok())
        .map(ThreadPriority::Crossplatform)
        .find(|p| p.to_posix(BATCH).ok() == Some(nice) && p.to_posix(OTHER).ok() == Some(nice))
        .ok_or_else(|| {
            format!("nice {nice} has no SCHED_BATCH equivalent; the sidecar runs under {started:?}")
        })?;
    let set = set_thread_priority_and_policy(thread_native_id(), same_nice, BATCH);
    match (
        thread_schedule_policy(),
        rustix::process::getpriority_process(None),
    ) {
        (Ok(p), Ok(n)) if p == BATCH && n == nice => {
            if policy == CpuScheduling::Adaptive {
                let _ = ADAPTIVE.set(same_nice);
            }
            Ok(())
        }
        (p, n) => Err(format!(
            "SCHED_BATCH at nice {nice} was not taken ({set:?}); the sidecar runs under {p:?} at nice {n:?}, and every wake-up may preempt"
        )),
    }
}

/// A worker thread's load over the current window, and the policy it runs under.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Load {
    started: Instant,
    /// The thread's CPU time when the window started.
    cpu: Duration,
    /// Whether the thread is under `SCHED_BATCH`.
    pub batch: bool,
}

impl Load {
    /// A window starting at `now`, with the thread's CPU time `cpu`, under `SCHED_BATCH` or not.
    pub fn new(now: Instant, cpu: Duration, batch: bool) -> Load {
        Load {
            started: now,
            cpu,
            batch,
        }
    }

    /// The window that follows this one at `now`, and whether its policy differs, or `None`
    /// while this window has not lasted [`WINDOW`]. Busy is CPU time over wall time: time the
    /// thread waited for the core does not count, so sharing a core does not look like load.
    pub fn next(&self, now: Instant, cpu: Duration) -> Option<Load> {
        let wall = now.checked_duration_since(self.started)?;
        if wall < WINDOW {
            return None;
        }
        let busy = cpu.saturating_sub(self.cpu).as_secs_f64() / wall.as_secs_f64();
        let batch = if self.batch {
            busy >= LEAVE_BATCH
        } else {
            busy >= ENTER_BATCH
        };
        Some(Load::new(now, cpu, batch))
    }
}

thread_local! {
    /// This worker's current window; `None` until it first runs out of work.
    static LOAD: Cell<Option<Load>> = const { Cell::new(None) };
}

/// The runtime's hook for a worker that has run out of work (`on_thread_park`): once a window
/// has passed, puts the worker under `SCHED_BATCH` or back under `SCHED_OTHER` by its load. Does
/// nothing unless `adaptive` was asked for and taken; costs a clock read otherwise, and a
/// system call per window.
pub fn on_park() {
    let Some(same_nice) = ADAPTIVE.get() else {
        return;
    };
    let now = Instant::now();
    LOAD.with(|load| {
        let next = match load.get() {
            // Workers start under SCHED_BATCH, inherited from `main`.
            None => Some(Load::new(now, thread_cpu(), true)),
            Some(l) if now.duration_since(l.started) < WINDOW => None,
            Some(l) => l
                .next(now, thread_cpu())
                .map(|n| switch(l.batch, n, *same_nice)),
        };
        if let Some(n) = next {
            load.set(Some(n));
        }
    });
}

/// Puts the calling thread under the policy `next` asks for when it differs from `was`. A
/// refusal is logged once, and the window keeps the policy the thread is still under.
fn switch(was: bool, next: Load, same_nice: ThreadPriority) -> Load {
    if next.batch == was {
        return next;
    }
    let policy = if next.batch { BATCH } else { OTHER };
    match set_thread_priority_and_policy(thread_native_id(), same_nice, policy) {
        Ok(()) => next,
        Err(e) => {
            if !REFUSED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "--cpu-scheduling adaptive: the kernel refused {policy:?} ({e:?}); this worker stays as it is"
                );
            }
            Load { batch: was, ..next }
        }
    }
}

/// The calling thread's CPU time (user and system), or zero when it cannot be read, which
/// reads as idle: a thread whose load cannot be seen is left to wake promptly.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_worker_batches_only_while_busy_and_a_gap_keeps_it_from_flapping() {
        let t0 = Instant::now();
        let idle = Load::new(t0, Duration::ZERO, false);
        // Not a whole window yet: nothing is decided.
        assert_eq!(idle.next(t0 + 99 * MS, 90 * MS), None);
        // 30 ms of CPU in 100 ms is busy: batch.
        let busy = idle.next(t0 + 100 * MS, 30 * MS).unwrap();
        assert!(busy.batch);
        // Between the lines, each keeps what it had.
        assert!(busy.next(t0 + 200 * MS, 45 * MS).unwrap().batch);
        assert!(!idle.next(t0 + 100 * MS, 15 * MS).unwrap().batch);
        // Under the lower line, back to prompt wake-ups.
        assert!(!busy.next(t0 + 200 * MS, 39 * MS).unwrap().batch);
        // A long idle stretch (a parked worker woken once) reads as idle.
        assert!(!busy.next(t0 + 60_000 * MS, 40 * MS).unwrap().batch);
        // A clock that went backwards decides nothing.
        assert_eq!(busy.next(t0, 90 * MS), None);
    }
}
