//! Where the daemon finds the hints of the errors that reach it: the one list of the crates'
//! hint tables ([`ALL`]), the [`Report`] of an error chain over it, and the API error made from
//! a report (the message holds each cause once, the hints go into the error's list).
//!
//! A crate whose errors reach the daemon and carry hints adds its `HINTS` table to [`ALL`];
//! nothing else in the daemon names a table. How a hint is worded is the erroring crate's
//! business; this module only collects.

use std::error::Error;

use banger_api::{ApiError, ErrorCode};
use banger_hint::{Probe, Report};

/// Every hint table of the crates the daemon calls.
pub const ALL: &[&[Probe]] = &[
    banger_image::HINTS,
    banger_net::HINTS,
    banger_vmm::HINTS,
    banger_agent::HINTS,
];

/// `e` and its causes, each once, with every hint found along the chain.
pub fn report(e: &(dyn Error + 'static)) -> Report {
    Report::new(e, ALL)
}

/// An API error from a report: one message with the causes, and the hints in order.
pub fn api_error(code: ErrorCode, report: Report) -> ApiError {
    let message = report.message();
    report
        .hints
        .into_iter()
        .fold(ApiError::new(code, message), ApiError::with_hint)
}

/// The API error for `what` failing because of `e`: "WHAT: CAUSE: CAUSE..." and `e`'s hints.
pub fn failed(code: ErrorCode, what: impl Into<String>, e: &(dyn Error + 'static)) -> ApiError {
    api_error(code, report(e).context(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crates_hints_reach_the_api_error() {
        let e = anyhow::Error::new(banger_net::AllocError::NoFreeAddress {
            subnet: banger_net::Subnet::DEFAULT,
            capacity: 253,
        })
        .context("cannot create VM web");
        let api = api_error(ErrorCode::NoFreeAddress, report(e.as_ref()));
        assert_eq!(
            api.message,
            "cannot create VM web: no free guest address in bridge subnet 172.16.0.1/24 \
             (253 usable, all leased)"
        );
        assert_eq!(api.hints.len(), 1, "{api:?}");
        assert!(api.hints[0].contains("`bridge_subnet`"), "{api:?}");
        let e = banger_image::MissingTool {
            bin: "mkfs.ext4".into(),
            package: "e2fsprogs".into(),
        };
        assert_eq!(report(&e).hints, ["apt-get install e2fsprogs"]);
    }
}
