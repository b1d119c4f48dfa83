//! Hints: what a user can do about an error, carried by the error's type instead of its text.
//!
//! An error's `Display` says what failed; what the user can do about it comes from
//! [`Hint::hint`], never from a `hint:` line in the message. Whoever shows an error to a person
//! (the daemon when it answers the CLI, a log line) builds a [`Report`]: it walks the
//! `source()` chain, keeps each cause's text once and collects the hint of every link, so an
//! error that wraps a hinted one never repeats that hint, and a hint deep in the chain is not
//! lost behind a wrapper that does not print its source.
//!
//! A `&dyn Error` cannot be asked whether its type implements [`Hint`] (stable Rust has no such
//! cast; `Error::provide` would do it once it is stable), so each crate lists its hinted error
//! types in a table of [`Probe`]s (`banger_image::HINTS`, ...) and a boundary passes the tables
//! of the crates whose errors reach it. A wrapper that is `#[error(transparent)]` hides its
//! inner error from the chain (thiserror forwards `source()` past it), so such a wrapper
//! implements [`Hint`] by asking the inner error.
//!
//! Leaves to others: which tables a boundary passes and how a report is drawn beyond `Display`
//! (the API error carries causes and hints apart; the CLI prints `hint:` lines).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::borrow::Cow;
use std::error::Error;
use std::fmt;

/// An error that can say what the user can do about it.
pub trait Hint: Error {
    /// The advice for this error alone (not for its sources: the [`Report`] asks them itself),
    /// one sentence without a `hint:` prefix; `None` when there is nothing useful to say.
    fn hint(&self) -> Option<Cow<'_, str>>;
}

/// Asks one link of an error chain for its hint if it is of a type the probe knows.
pub type Probe = fn(&(dyn Error + 'static)) -> Option<String>;

/// The [`Probe`] for error type `E`: `probe::<MyError>` in a crate's `HINTS` table. It knows a
/// boxed `E` too: a `#[source] Box<E>` puts the box in the chain (std's `Box<E>` is itself an
/// error that forwards `source()` past `E`), not `E`.
pub fn probe<E: Hint + 'static>(e: &(dyn Error + 'static)) -> Option<String> {
    let e = match e.downcast_ref::<E>() {
        Some(e) => e,
        None => e.downcast_ref::<Box<E>>()?,
    };
    e.hint().map(Cow::into_owned)
}

/// An error chain ready to show: each cause's text once, outermost first, and every hint found
/// along the chain (each once, in chain order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub causes: Vec<String>,
    pub hints: Vec<String>,
}

impl Report {
    /// Walks `err` and its sources. A link whose text is empty, equal to the cause before it
    /// or already the end of it (`"...: {source}"` in a message) adds no cause; every link is
    /// still asked for its hint through `probes` (the crates' `HINTS` tables).
    pub fn new(err: &(dyn Error + 'static), probes: &[&[Probe]]) -> Report {
        let mut report = Report::default();
        let mut link = Some(err);
        while let Some(e) = link {
            let text = e.to_string();
            let repeated = report
                .causes
                .last()
                .is_some_and(|prev| *prev == text || prev.ends_with(&format!(": {text}")));
            if !text.is_empty() && !repeated {
                report.causes.push(text);
            }
            for hint in probes
                .iter()
                .flat_map(|table| table.iter())
                .filter_map(|p| p(e))
            {
                report.push_hint(hint);
            }
            link = e.source();
        }
        report
    }

    /// The causes on one line, `: `-separated (what an API error's message holds).
    pub fn message(&self) -> String {
        self.causes.join(": ")
    }

    /// Puts what the caller was doing in front of the causes.
    pub fn context(mut self, what: impl Into<String>) -> Report {
        self.causes.insert(0, what.into());
        self
    }

    /// Adds a hint the caller knows and the chain does not (after the chain's own).
    pub fn with_hint(mut self, hint: impl Into<String>) -> Report {
        self.push_hint(hint.into());
        self
    }

    fn push_hint(&mut self, hint: String) {
        if !hint.is_empty() && !self.hints.contains(&hint) {
            self.hints.push(hint);
        }
    }
}

/// The message, then each hint on its own `hint:` line.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())?;
        for hint in &self.hints {
            write!(f, "\nhint: {hint}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaf with a hint.
    #[derive(Debug, thiserror::Error)]
    #[error("disk full at {0}")]
    struct Full(&'static str);

    impl Hint for Full {
        fn hint(&self) -> Option<Cow<'_, str>> {
            Some(format!("free some space on {}", self.0).into())
        }
    }

    /// A wrapper with its own hint and its own words.
    #[derive(Debug, thiserror::Error)]
    #[error("cannot write the image")]
    struct Write(#[source] Full);

    impl Hint for Write {
        fn hint(&self) -> Option<Cow<'_, str>> {
            Some("run the command again".into())
        }
    }

    /// A wrapper that repeats its source's text and has no hint of its own.
    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("{0}")]
        Write(#[source] Write),
        #[error("pull failed: {0}")]
        Quoting(#[source] Full),
        #[error(transparent)]
        Transparent(Full),
    }

    impl Hint for Outer {
        fn hint(&self) -> Option<Cow<'_, str>> {
            match self {
                // thiserror skips a transparent variant's inner error in `source()`: ask it here.
                Outer::Transparent(inner) => inner.hint(),
                Outer::Write(_) | Outer::Quoting(_) => None,
            }
        }
    }

    /// A wrapper whose source is boxed.
    #[derive(Debug, thiserror::Error)]
    #[error("layer 2 was refused")]
    struct Boxed {
        source: Box<Full>,
    }

    const HINTS: &[Probe] = &[probe::<Full>, probe::<Write>, probe::<Outer>];

    #[test]
    fn a_cause_repeated_by_a_wrapper_is_shown_once() {
        let e = Outer::Write(Write(Full("/var")));
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(r.causes, ["cannot write the image", "disk full at /var"]);
        assert_eq!(r.message(), "cannot write the image: disk full at /var");
    }

    #[test]
    fn a_cause_quoted_at_the_end_of_its_wrapper_is_not_repeated() {
        let e = Outer::Quoting(Full("/var"));
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(r.causes, ["pull failed: disk full at /var"]);
        assert_eq!(r.hints, ["free some space on /var"]);
    }

    #[test]
    fn hints_come_in_chain_order_after_the_message() {
        let e = Outer::Write(Write(Full("/var")));
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(
            r.hints,
            ["run the command again", "free some space on /var"]
        );
        assert_eq!(
            r.to_string(),
            "cannot write the image: disk full at /var\n\
             hint: run the command again\n\
             hint: free some space on /var"
        );
    }

    #[test]
    fn equal_hints_are_shown_once() {
        // The same type listed twice (two tables) and a caller's hint equal to the chain's.
        let e = Full("/var");
        let r = Report::new(&e, &[HINTS, &[probe::<Full>]]).with_hint("free some space on /var");
        assert_eq!(r.hints, ["free some space on /var"]);
    }

    #[test]
    fn a_transparent_wrapper_passes_on_its_inner_hint() {
        let e = Outer::Transparent(Full("/tmp"));
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(r.causes, ["disk full at /tmp"]);
        assert_eq!(r.hints, ["free some space on /tmp"]);
    }

    #[test]
    fn a_boxed_source_is_probed_through_its_box() {
        let e = Boxed {
            source: Box::new(Full("/srv")),
        };
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(r.message(), "layer 2 was refused: disk full at /srv");
        assert_eq!(r.hints, ["free some space on /srv"]);
    }

    #[test]
    fn a_type_missing_from_the_tables_keeps_its_hint_to_itself() {
        let e = Write(Full("/var"));
        let r = Report::new(&e, &[&[probe::<Full>]]);
        assert_eq!(r.hints, ["free some space on /var"]);
        let r = Report::new(&e, &[]);
        assert!(r.hints.is_empty());
        assert_eq!(r.to_string(), "cannot write the image: disk full at /var");
    }

    #[test]
    fn anyhow_context_links_between_typed_errors_are_walked() {
        let inner: Result<(), Write> = Err(Write(Full("/srv")));
        let e = anyhow::Context::context(inner, "building image web")
            .map_err(|e| e.context("cannot serve the request"))
            .unwrap_err();
        let r = Report::new(e.as_ref(), &[HINTS]);
        assert_eq!(
            r.message(),
            "cannot serve the request: building image web: cannot write the image: disk full at /srv"
        );
        assert_eq!(
            r.hints,
            ["run the command again", "free some space on /srv"]
        );
    }

    #[test]
    fn context_goes_in_front_and_caller_hints_after() {
        let r = Report::new(&Full("/var"), &[HINTS])
            .context("VM web failed to start")
            .with_hint("console log: /run/web.log");
        assert_eq!(
            r.to_string(),
            "VM web failed to start: disk full at /var\n\
             hint: free some space on /var\n\
             hint: console log: /run/web.log"
        );
    }
}
