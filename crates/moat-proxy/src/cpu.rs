//! How the kernel schedules the sidecar's threads (`--cpu-scheduling`, decision 50).
//!
//! A sidecar relays: each request wakes it on one socket and it writes to another, which wakes
//! the next process on the path (the app, the far sidecar). Under the default policy each of
//! those wake-ups may preempt whatever runs on the core, so a request crossing a pod switches
//! tasks at every hop. Under `SCHED_BATCH` a woken sidecar thread never preempts: it runs at
//! the next switch the kernel makes anyway, and then finds several connections ready at once.
//! Its share of the CPU (its nice value, its cgroup's weight) is unchanged; only when it starts
//! running is.

use thread_priority::unix::{
    NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
    thread_native_id, thread_schedule_policy,
};
use thread_priority::{ThreadPriority, ThreadPriorityValue};

/// The scheduling policy the sidecar puts its threads under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuScheduling {
    /// `SCHED_BATCH`: a sidecar thread woken by its sockets does not preempt the running task.
    Batch,
    /// Left as started (normally `SCHED_OTHER`): every wake-up may preempt.
    Normal,
}

/// Puts the calling thread, and so every thread it starts from then on, under `policy`. Called
/// first thing in `main`, before any other thread exists. The nice value stays what the sidecar
/// was started with, and a sidecar started under another policy than the default (`chrt`)
/// keeps that one. An error says what was not done and what the sidecar runs under instead.
pub fn apply(policy: CpuScheduling) -> Result<(), String> {
    let other = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);
    let started = thread_schedule_policy()
        .map_err(|e| format!("cannot read the scheduling policy ({e:?}); it is left as started"))?;
    if policy == CpuScheduling::Normal || started != other {
        return Ok(());
    }
    let nice = rustix::process::getpriority_process(None).map_err(|e| {
        format!("cannot read the nice value ({e}); the sidecar runs under {started:?}")
    })?;
    let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    // thread-priority sets a nice value along with a normal policy, from a 0..=99 scale: the
    // point of that scale it maps to the current nice value sets it again unchanged (setting
    // the same value needs no privilege, lowering it would).
    let same_nice = (0..=99u8)
        .filter_map(|p| ThreadPriorityValue::try_from(p).ok())
        .map(ThreadPriority::Crossplatform)
        .find(|p| p.to_posix(batch).ok() == Some(nice))
        .ok_or_else(|| {
            format!("nice {nice} has no SCHED_BATCH equivalent; the sidecar runs under {started:?}")
        })?;
    let set = set_thread_priority_and_policy(thread_native_id(), same_nice, batch);
    match (
        thread_schedule_policy(),
        rustix::process::getpriority_process(None),
    ) {
        (Ok(p), Ok(n)) if p == batch && n == nice => Ok(()),
        (p, n) => Err(format!(
            "SCHED_BATCH at nice {nice} was not taken ({set:?}); the sidecar runs under {p:?} at nice {n:?}, and every wake-up may preempt"
        )),
    }
}
