//! Untrusted DNS packets through the same decode + handler path the server uses: whatever arrives,
//! decoding either fails cleanly or the handler answers with a well-formed response carrying the
//! query's ID. Names outside `.vm` reach the forwarder, which has no upstream here and fails fast.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::OnceLock;
use std::time::Duration;

use banger_dns::{Forwarder, Handler, Zone};
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

fn setup() -> &'static (tokio::runtime::Runtime, Handler) {
    static S: OnceLock<(tokio::runtime::Runtime, Handler)> = OnceLock::new();
    S.get_or_init(|| {
        let zone = Zone::new();
        zone.replace([("web".to_owned(), Ipv4Addr::new(172, 16, 0, 2))]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let forwarder = Forwarder::with_timeout(Vec::new(), Duration::from_millis(1));
        (rt, Handler::new(zone, forwarder))
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, handler) = setup();
    let src = ([172, 16, 0, 2], 5353).into();
    if let Some(bytes) = rt.block_on(handler.answer_raw(data, src)) {
        let response = Message::from_vec(&bytes).expect("banger's response must parse");
        assert_eq!(response.metadata.message_type, MessageType::Response);
        assert_eq!(&bytes[..2], &data[..2], "response ID must be the query's");
    }
});
