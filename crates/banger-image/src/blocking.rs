//! Running blocking work (file hashing, compression, big copies) off the async runtime.
//!
//! The closure runs on tokio's blocking pool and reports progress through a channel; the calling task
//! forwards those reports to the caller's [`Progress`], so a `&dyn Progress` that is not `'static`
//! can still watch work that happens on another thread.

use crate::progress::{Event, Progress};
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

struct ChannelProgress {
    tx: UnboundedSender<Event>,
}

impl Progress for ChannelProgress {
    // A send fails only when the receiving task is gone, and then nobody is listening anyway.
    fn phase(&self, name: &str) {
        let _ = self.tx.send(Event::Phase(name.to_owned()));
    }
    fn bytes(&self, done: u64, total: Option<u64>) {
        let _ = self.tx.send(Event::Bytes { done, total });
    }
    fn log(&self, line: &str) {
        let _ = self.tx.send(Event::Log(line.to_owned()));
    }
    fn notice(&self, msg: &str) {
        let _ = self.tx.send(Event::Notice(msg.to_owned()));
    }
    fn item(&self, id: &str, done: u64, total: Option<u64>) {
        let _ = self.tx.send(Event::Item {
            id: id.to_owned(),
            done,
            total,
        });
    }
}

/// Runs `f` on the blocking pool, forwarding its progress reports to `progress` as they happen.
/// A panic in `f` is resumed here; the only other failure is a runtime shutting down.
pub(crate) async fn run_blocking<R, F>(progress: &dyn Progress, f: F) -> std::io::Result<R>
where
    F: FnOnce(&dyn Progress) -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, mut rx) = unbounded_channel();
    let handle = tokio::task::spawn_blocking(move || f(&ChannelProgress { tx }));
    while let Some(event) = rx.recv().await {
        event.send_to(progress);
    }
    match handle.await {
        Ok(r) => Ok(r),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(std::io::Error::other(
            "background task was cancelled because the runtime is shutting down",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::RecordingProgress;

    #[tokio::test]
    async fn progress_from_the_blocking_thread_reaches_the_caller() {
        let rec = RecordingProgress::new();
        let out = run_blocking(&rec, |p| {
            p.phase("hash");
            p.bytes(1, Some(2));
            p.item("layer", 4, None);
            7
        })
        .await
        .unwrap();
        assert_eq!(out, 7);
        assert_eq!(
            rec.events(),
            vec![
                Event::Phase("hash".into()),
                Event::Bytes {
                    done: 1,
                    total: Some(2)
                },
                Event::Item {
                    id: "layer".into(),
                    done: 4,
                    total: None
                }
            ]
        );
    }
}
