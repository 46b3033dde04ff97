//! Log output for the proxy: lines gather in memory and reach stderr in batches, so the access
//! log (a line per request) costs no system call per request. A batch goes out when 64 KiB have
//! gathered, every 100 ms, and when the guard is dropped at exit.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How much gathers before a write.
const BATCH: usize = 64 * 1024;
/// The longest a line waits.
const EVERY: Duration = Duration::from_millis(100);

/// A batching writer over `W` (stderr in the proxy); clones share one buffer.
#[derive(Debug)]
pub struct Batched<W: Write> {
    inner: Arc<Mutex<(Vec<u8>, W)>>,
}

impl<W: Write> Clone for Batched<W> {
    fn clone(&self) -> Self {
        Batched {
            inner: self.inner.clone(),
        }
    }
}

impl<W: Write + Send + 'static> Batched<W> {
    /// A writer over `sink`, and the guard that flushes it every 100 ms and when dropped.
    pub fn new(sink: W) -> (Self, FlushGuard<W>) {
        let writer = Batched {
            inner: Arc::new(Mutex::new((Vec::with_capacity(BATCH), sink))),
        };
        let ticker = writer.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        // A plain thread: it must keep flushing even when the runtime is busy or gone.
        let _ = std::thread::Builder::new()
            .name("moat-log-flush".into())
            .spawn(move || {
                while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(EVERY);
                    ticker.flush_now();
                }
            });
        let guard = FlushGuard {
            writer: writer.clone(),
            stop,
        };
        (writer, guard)
    }

    fn flush_now(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (buf, sink) = &mut *g;
        if !buf.is_empty() {
            // Nowhere to report a failed log write; the lines are dropped rather than retried.
            let _ = sink.write_all(buf);
            let _ = sink.flush();
            buf.clear();
        }
    }
}

impl<W: Write + Send + 'static> Write for Batched<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (buf, sink) = &mut *g;
        buf.extend_from_slice(data);
        if buf.len() >= BATCH {
            let r = sink.write_all(buf);
            buf.clear();
            r?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.flush_now();
        Ok(())
    }
}

impl<'a, W: Write + Send + 'static> tracing_subscriber::fmt::MakeWriter<'a> for Batched<W> {
    type Writer = Batched<W>;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Flushes the batch when dropped (keep it until the process ends), and stops the ticker.
#[derive(Debug)]
pub struct FlushGuard<W: Write + Send + 'static> {
    writer: Batched<W>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl<W: Write + Send + 'static> Drop for FlushGuard<W> {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.writer.flush_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_in_batches_and_at_exit() {
        let sink = Sink::default();
        let (mut w, guard) = Batched::new(sink.clone());
        w.write_all(b"one\n").unwrap();
        w.clone().write_all(b"two\n").unwrap();
        assert!(
            sink.0.lock().unwrap().is_empty(),
            "held until a batch fills or time passes"
        );
        // The ticker writes within about 100 ms.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never flushed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"one\ntwo\n");
        // A full batch goes at once.
        let big = vec![b'x'; BATCH];
        w.write_all(&big).unwrap();
        assert_eq!(sink.0.lock().unwrap().len(), 8 + BATCH);
        // What is left goes when the guard drops.
        w.write_all(b"last\n").unwrap();
        drop(guard);
        assert!(sink.0.lock().unwrap().ends_with(b"xlast\n"));
    }
}
