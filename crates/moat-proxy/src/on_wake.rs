//! [`OnWake`]: a future polled only when something it waits on has woken it. `tokio::select!`
//! polls every branch each time its task wakes; a served connection's task wakes for every read
//! and write, and its guards (shutdown, a policy change, the watchdog) would each be polled —
//! a lock in each `Notify`, a timer check — for nothing. Wrapped in one `OnWake`, they cost an
//! atomic swap per wake until one of them has something to say.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// `F`, polled on its first poll and after a waker it registered has fired.
pub struct OnWake<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
}

/// Whether the inner future was woken, and the task to wake with it.
#[derive(Default)]
struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = task.as_ref() {
            w.wake_by_ref();
        }
    }
}

impl<F> std::fmt::Debug for OnWake<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnWake")
            .field("woken", &self.flag.woken.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<F: Future> OnWake<F> {
    /// `inner`, to be polled only when woken.
    pub fn new(inner: F) -> Self {
        let flag = Flag::default();
        flag.woken.store(true, Ordering::Relaxed);
        OnWake {
            inner: Box::pin(inner),
            flag: Arc::new(flag),
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        {
            // The task to wake is kept current before anything can fire.
            let mut task = self.flag.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.flag.clone());
        self.inner.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, and wakes whoever waits when it is.
    struct Counted {
        polls: Arc<AtomicUsize>,
        ready: Arc<tokio::sync::Notify>,
        notified: Pin<Box<tokio::sync::futures::OwnedNotified>>,
    }

    impl Future for Counted {
        type Output = &'static str;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.notified.as_mut().poll(cx).map(|()| "fired")
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_only_when_it_was_woken() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(tokio::sync::Notify::new());
        let inner = Counted {
            polls: polls.clone(),
            ready: ready.clone(),
            notified: Box::pin(ready.clone().notified_owned()),
        };
        let mut guarded = OnWake::new(inner);
        // A busy neighbour wakes the task a thousand times.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let busy = tokio::spawn(async move {
            for _ in 0..1000 {
                tx.send(()).unwrap();
                tokio::task::yield_now().await;
            }
            drop(tx);
        });
        let mut received = 0;
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(()) => received += 1,
                    None => break,
                },
                _ = &mut guarded => panic!("fired before it was told"),
            }
        }
        busy.await.unwrap();
        assert_eq!(received, 1000);
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled once, at the start");
        // Once told, it is polled and finishes.
        let inner = &guarded.inner;
        inner.ready.notify_one();
        assert_eq!(guarded.await, "fired");
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
