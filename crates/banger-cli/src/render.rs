//! Drawing the daemon's progress events for people (stderr) and formatting tables.
//!
//! Phases print as `==> name` lines with the time the previous phase took; byte progress and
//! tool output live in one transient bar below them, and transfers that run at once (image
//! layers) get a bar each under it, with bytes and rate. Without a terminal the bars are hidden
//! and only the phase, notice and (with `--verbose`) log lines appear, so logs and tests read
//! cleanly. Data for scripts goes to stdout and never passes through here.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use banger_api::Event;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Renderer {
    multi: MultiProgress,
    bar: ProgressBar,
    /// One bar per concurrent transfer of the current phase, by item id.
    items: BTreeMap<String, ProgressBar>,
    verbose: bool,
    phase: Option<(String, Instant)>,
    started: Instant,
}

impl Renderer {
    pub fn new(verbose: bool) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(spinner_style());
        bar.enable_steady_tick(Duration::from_millis(120));
        Self {
            multi,
            bar,
            items: BTreeMap::new(),
            verbose,
            phase: None,
            started: Instant::now(),
        }
    }

    /// Prints a line above the bars; straight to stderr when there is no terminal to draw on.
    fn line(&self, text: String) {
        if self.multi.is_hidden() {
            eprintln!("{text}");
        } else {
            let _ = self.multi.println(text);
        }
    }

    /// Progress of one transfer among several (a layer): its own bar, removed when complete.
    fn item(&mut self, id: &str, done: u64, total: Option<u64>) {
        let complete = total.is_some_and(|t| done >= t);
        if self.multi.is_hidden() {
            if complete && self.verbose && !self.items.contains_key(id) {
                self.line(format!("    {} {}", short_item(id), human_bytes(done)));
                self.items.insert(id.to_owned(), ProgressBar::hidden());
            }
            return;
        }
        let bar = self.items.entry(id.to_owned()).or_insert_with(|| {
            let b = self.multi.add(ProgressBar::with_draw_target(
                total,
                ProgressDrawTarget::hidden(),
            ));
            b.set_style(item_style());
            b.set_prefix(short_item(id));
            b
        });
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
        if complete && !bar.is_finished() {
            bar.finish();
        }
    }

    fn clear_items(&mut self) {
        for (_, b) in std::mem::take(&mut self.items) {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
    }

    pub fn event(&mut self, event: &Event) {
        match event {
            Event::Phase { name } => {
                self.close_phase();
                self.clear_items();
                self.line(format!("==> {name}"));
                self.bar.set_style(spinner_style());
                self.bar.set_length(0);
                self.bar.set_position(0);
                self.bar.set_message(String::new());
                self.phase = Some((name.clone(), Instant::now()));
            }
            Event::Progress {
                done,
                total,
                item: Some(id),
            } => self.item(id, *done, *total),
            Event::Progress {
                done,
                total,
                item: None,
            } => {
                match total {
                    Some(t) => {
                        if self.bar.length() != Some(*t) {
                            self.bar.set_style(bytes_style());
                            self.bar.set_length(*t);
                        }
                    }
                    None => self.bar.set_style(spinner_bytes_style()),
                }
                self.bar.set_position(*done);
            }
            // Log lines and notices may quote a registry or a build (file and layer names):
            // shown, never obeyed, like a guest's console.
            Event::Log { line } => {
                let line = crate::safe_text::printable(line);
                if self.verbose {
                    self.line(format!("    {line}"));
                }
                let short: String = line.chars().take(70).collect();
                self.bar.set_message(short);
            }
            Event::Notice { message } => {
                self.line(format!("notice: {}", crate::safe_text::printable(message)))
            }
            Event::Done { .. } | Event::Failed { .. } => {}
        }
    }

    fn close_phase(&mut self) {
        if let Some((name, start)) = self.phase.take() {
            if self.verbose {
                self.line(format!(
                    "    {name} took {}",
                    human_duration(start.elapsed())
                ));
            }
        }
    }

    /// Clears the bars; returns the total time since the renderer was created.
    pub fn finish(mut self) -> Duration {
        self.close_phase();
        self.clear_items();
        self.bar.finish_and_clear();
        self.started.elapsed()
    }
}

/// `sha256:0123456789ab` for a digest; other ids as they are.
fn short_item(id: &str) -> String {
    match id.split_once(':') {
        Some((algo, hex)) if hex.len() > 12 => format!("{algo}:{}", &hex[..12]),
        _ => id.to_owned(),
    }
}

fn item_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "  {prefix} [{bar:24}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn spinner_bytes_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {elapsed:>4} {bytes} {binary_bytes_per_sec} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{elapsed:>4} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {wide_msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A plain left-aligned table with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = *w));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["a".into(), "1 B".into()],
                vec!["long-name".into(), "2 B".into()],
            ],
        );
        assert_eq!(t, "NAME       SIZE\na          1 B\nlong-name  2 B\n");
    }

    #[test]
    fn layer_ids_are_shortened_for_their_bars() {
        assert_eq!(
            short_item("sha256:0123456789abcdef0123"),
            "sha256:0123456789ab"
        );
        assert_eq!(short_item("rootfs"), "rootfs");
    }

    #[test]
    fn item_progress_without_a_terminal_draws_nothing_and_keeps_no_bars() {
        let mut r = Renderer::new(false);
        for done in [0, 5, 10] {
            r.event(&Event::Progress {
                done,
                total: Some(10),
                item: Some("sha256:aa".into()),
            });
        }
        r.event(&Event::Phase {
            name: "next".into(),
        });
        assert!(r.items.is_empty());
        r.finish();
    }

    #[test]
    fn durations_and_sizes_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(human_duration(Duration::from_secs(62)), "1m 02s");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
