//! Progress reporting from image work to whoever drives it.
//!
//! Libraries in this crate report what they are doing through the [`Progress`] trait and never draw:
//! the daemon turns these calls into typed API events and the CLI renders them. A phase names the
//! current step ("debootstrap", "download rootfs.ext4.zst"), `bytes` reports transfer or compression
//! progress within it, `log` carries raw output lines of child processes (debootstrap, mkfs), and
//! `notice` is for things a person should read even when logs are hidden (an optional step failed).
//! `item` reports one of several transfers that run at once (the layers of an OCI image), keyed by
//! an id such as the layer digest; whoever emits items also reports their sum through `bytes`, so
//! a receiver that only draws one bar can ignore items.

use std::sync::Mutex;

/// Receiver of progress reports. Implementations must be cheap: `bytes` and `log` may be called often.
pub trait Progress: Send + Sync {
    /// A new step starts; `name` is short and human readable.
    fn phase(&self, name: &str);
    /// Progress within the current phase, in bytes.
    fn bytes(&self, done: u64, total: Option<u64>);
    /// One line of output from a child process or a detail of the current step.
    fn log(&self, line: &str);
    /// Something a person should see even when logs are hidden.
    fn notice(&self, msg: &str);
    /// Progress of one of several items that run at once (e.g. `id` = a layer's digest), in bytes.
    /// Emitters also report the sum over all items through [`Progress::bytes`], so the default
    /// drops these.
    fn item(&self, id: &str, done: u64, total: Option<u64>) {
        let _ = (id, done, total);
    }
}

/// Drops every report; for callers that do not care.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _name: &str) {}
    fn bytes(&self, _done: u64, _total: Option<u64>) {}
    fn log(&self, _line: &str) {}
    fn notice(&self, _msg: &str) {}
}

/// One report, as recorded by [`RecordingProgress`] or forwarded across threads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Phase(String),
    Bytes {
        done: u64,
        total: Option<u64>,
    },
    Log(String),
    Notice(String),
    Item {
        id: String,
        done: u64,
        total: Option<u64>,
    },
}

impl Event {
    /// Replays this event onto `progress`.
    pub fn send_to(&self, progress: &dyn Progress) {
        match self {
            Event::Phase(name) => progress.phase(name),
            Event::Bytes { done, total } => progress.bytes(*done, *total),
            Event::Log(line) => progress.log(line),
            Event::Notice(msg) => progress.notice(msg),
            Event::Item { id, done, total } => progress.item(id, *done, *total),
        }
    }
}

/// Keeps every report in memory, for tests (here and in the daemon) that assert on what a user would see.
#[derive(Debug, Default)]
pub struct RecordingProgress {
    events: Mutex<Vec<Event>>,
}

impl RecordingProgress {
    pub fn new() -> Self {
        Self::default()
    }

    /// All events so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    pub fn phases(&self) -> Vec<String> {
        self.filter(|e| match e {
            Event::Phase(p) => Some(p.clone()),
            _ => None,
        })
    }

    pub fn notices(&self) -> Vec<String> {
        self.filter(|e| match e {
            Event::Notice(n) => Some(n.clone()),
            _ => None,
        })
    }

    pub fn logs(&self) -> Vec<String> {
        self.filter(|e| match e {
            Event::Log(l) => Some(l.clone()),
            _ => None,
        })
    }

    /// Every `(done, total)` reported for item `id`, in order.
    pub fn item_reports(&self, id: &str) -> Vec<(u64, Option<u64>)> {
        self.lock()
            .iter()
            .filter_map(|e| match e {
                Event::Item { id: i, done, total } if i == id => Some((*done, *total)),
                _ => None,
            })
            .collect()
    }

    fn filter(&self, f: impl Fn(&Event) -> Option<String>) -> Vec<String> {
        self.lock().iter().filter_map(f).collect()
    }

    fn push(&self, event: Event) {
        self.lock().push(event);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        // A panic while holding this lock can only come from a test that is already failing.
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Progress for RecordingProgress {
    fn phase(&self, name: &str) {
        self.push(Event::Phase(name.to_owned()));
    }
    fn bytes(&self, done: u64, total: Option<u64>) {
        self.push(Event::Bytes { done, total });
    }
    fn log(&self, line: &str) {
        self.push(Event::Log(line.to_owned()));
    }
    fn notice(&self, msg: &str) {
        self.push(Event::Notice(msg.to_owned()));
    }
    fn item(&self, id: &str, done: u64, total: Option<u64>) {
        self.push(Event::Item {
            id: id.to_owned(),
            done,
            total,
        });
    }
}

/// Limits `bytes` reports to one per `step` bytes (plus the final one), so a multi-gigabyte copy does
/// not flood the daemon's event stream.
pub(crate) struct ByteThrottle {
    step: u64,
    next: u64,
}

impl ByteThrottle {
    pub(crate) fn new(step: u64) -> Self {
        Self { step, next: 0 }
    }

    pub(crate) fn report(&mut self, progress: &dyn Progress, done: u64, total: Option<u64>) {
        if done >= self.next || Some(done) == total {
            progress.bytes(done, total);
            self.next = done.saturating_add(self.step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_progress_keeps_events_in_order() {
        let rec = RecordingProgress::new();
        rec.phase("debootstrap");
        rec.log("I: Retrieving InRelease");
        rec.bytes(10, Some(20));
        rec.notice("mise could not be installed");
        assert_eq!(
            rec.events(),
            vec![
                Event::Phase("debootstrap".into()),
                Event::Log("I: Retrieving InRelease".into()),
                Event::Bytes {
                    done: 10,
                    total: Some(20)
                },
                Event::Notice("mise could not be installed".into()),
            ]
        );
        assert_eq!(rec.phases(), vec!["debootstrap"]);
        assert_eq!(rec.notices(), vec!["mise could not be installed"]);
    }

    #[test]
    fn events_replay_onto_another_progress() {
        let rec = RecordingProgress::new();
        for e in [Event::Phase("a".into()), Event::Log("b".into())] {
            e.send_to(&rec);
        }
        assert_eq!(rec.phases(), vec!["a"]);
        assert_eq!(rec.logs(), vec!["b"]);
        // NoProgress accepts everything without effect.
        Event::Notice("x".into()).send_to(&NoProgress);
    }

    #[test]
    fn items_are_recorded_per_id_and_dropped_by_default() {
        let rec = RecordingProgress::new();
        rec.item("sha256:a", 1, Some(3));
        rec.item("sha256:b", 5, None);
        Event::Item {
            id: "sha256:a".into(),
            done: 3,
            total: Some(3),
        }
        .send_to(&rec);
        assert_eq!(
            rec.item_reports("sha256:a"),
            vec![(1, Some(3)), (3, Some(3))]
        );
        assert_eq!(rec.item_reports("sha256:b"), vec![(5, None)]);
        // The default implementation ignores items.
        NoProgress.item("x", 1, None);
    }

    #[test]
    fn byte_throttle_reports_first_step_and_last() {
        let rec = RecordingProgress::new();
        let mut t = ByteThrottle::new(100);
        for done in (0..=250).step_by(10) {
            t.report(&rec, done, Some(250));
        }
        let reported: Vec<u64> = rec
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::Bytes { done, .. } => Some(*done),
                _ => None,
            })
            .collect();
        assert_eq!(reported, vec![0, 100, 200, 250]);
    }
}
