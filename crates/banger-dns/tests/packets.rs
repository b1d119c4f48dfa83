//! Property tests of untrusted packets through the server's decode + handler path (the fuzz target
//! `fuzz/fuzz_targets/dns_packet.rs` does the same for longer, coverage-guided runs): random bytes
//! and randomly damaged real queries either fail to decode or get a well-formed response with the
//! query's ID, and `.vm` answers never leak outside the zone's rules.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use banger_dns::{Forwarder, Handler, Zone};
use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RecordType};
use proptest::prelude::*;

fn handler() -> Handler {
    let zone = Zone::new();
    zone.replace([("web".to_owned(), Ipv4Addr::new(172, 16, 0, 2))]);
    Handler::new(
        zone,
        Forwarder::with_timeout(Vec::new(), Duration::from_millis(1)),
    )
}

fn answer(raw: &[u8]) -> Option<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let src: SocketAddr = ([172, 16, 0, 2], 5353).into();
    rt.block_on(handler().answer_raw(raw, src))
}

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

fn check_response(raw: &[u8], out: &[u8]) {
    let m = Message::from_vec(out).expect("the response parses");
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(&out[..2], &raw[..2], "response carries the query's ID");
}

#[test]
fn a_real_query_is_answered_from_the_zone() {
    let raw = query("web.vm.", 0x4242);
    let out = answer(&raw).unwrap();
    check_response(&raw, &out);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.answers.len(), 1);
}

/// Inputs the fuzz target found: a question whose name ends in a compression pointer into the
/// header. hickory-server echoes the question bytes, so the pointer would land on the response's
/// own (different) header bytes; banger drops such queries instead.
#[test]
fn questions_pointing_into_the_header_are_dropped() {
    let found: [&[u8]; 2] = [
        &[
            0x01, 0x00, 0x00, 0xc0, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x26, 0x78,
            0x6e, 0x2d, 0x2d, 0x00, 0x00, 0x26, 0x00, 0x26, 0x1b, 0x01, 0x2e, 0xa0, 0xc3, 0x00,
            0x74, 0x7b, 0x00, 0x00, 0x2e, 0x3b, 0x2c, 0x02, 0x37, 0x2c, 0x26, 0x00, 0x00, 0x2a,
            0x2a, 0x2a, 0x2a, 0x2a, 0x2a, 0x2a, 0x01, 0x00, 0x00, 0xc0, 0x00, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x26, 0x78, 0x6e, 0x2d, 0x2d, 0x00, 0x00, 0x26, 0x00, 0x26,
            0x1b, 0x01, 0x2e, 0xa0, 0xc3, 0x21, 0x00, 0x00, 0x00, 0xd5, 0x33, 0x0c,
        ],
        &[
            0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x20, 0x78, 0x6e, 0x2d, 0x2d, 0x33, 0x33,
            0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x01, 0x20, 0x00, 0x00, 0x00, 0x33, 0x33, 0x33,
            0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0xc0, 0x00,
            0x00, 0x00, 0x00, 0x01, 0x20, 0x78, 0x6e, 0x2d, 0x2d, 0x33, 0x33, 0x00, 0x00, 0x08,
            0x00, 0x00, 0x00, 0x01, 0x20, 0x00, 0x00, 0x00, 0x33, 0x00, 0x00, 0x00, 0x00, 0x78,
            0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x62, 0x00, 0x00, 0x00, 0x01, 0x00,
        ],
    ];
    for raw in found {
        assert_eq!(answer(raw), None);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_break_the_handler(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Some(out) = answer(&raw) {
            check_response(&raw, &out);
        }
    }

    #[test]
    fn damaged_queries_never_break_the_handler(
        id in any::<u16>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut raw = query("web.vm.", id);
        for (at, byte) in flips {
            let n = raw.len();
            raw[at % n] = byte;
        }
        raw.truncate(cut % (raw.len() + 1));
        if let Some(out) = answer(&raw) {
            check_response(&raw, &out);
        }
    }
}
