//! The DNS server itself: hickory-server's UDP and TCP listeners with banger's request handler.
//!
//! hickory-server owns the sockets, framing, per-request tasks, TCP idle timeouts and the decoding of
//! untrusted packets (a datagram that is not DNS is dropped, one that is half DNS gets FORMERR). The
//! handler below only decides: `.vm` names are answered from the `Zone` (authoritative, short TTL,
//! SOA in negative answers so resolvers cache them only briefly); every other name goes to the
//! `Forwarder`. Only clients inside the guest subnet are served (the bridge address is inside it, so
//! the host's own queries count); anything else gets REFUSED, so the server is never an open resolver
//! even if some other network routes packets to the bridge address.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use ipnet::{IpNet, Ipv4Net};
use tokio::net::{TcpListener, UdpSocket};

use crate::forward::Forwarder;
use crate::gate::{Decision, EgressGate};
use crate::zone::{Answer, QueryKind, Zone, TTL_SECS};

/// How long an idle TCP client may hold a connection.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Per-connection buffer of outgoing TCP responses.
const TCP_RESPONSE_BUFFER: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot listen for DNS on {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Decides the answer to each request. Public so the fuzz target and benchmarks can drive it.
#[derive(Debug, Clone)]
pub struct Handler {
    zone: Zone,
    forwarder: Forwarder,
    gate: Option<Arc<dyn EgressGate>>,
    soa: Record,
}

impl Handler {
    pub fn new(zone: Zone, forwarder: Forwarder) -> Self {
        Handler {
            zone,
            forwarder,
            gate: None,
            soa: zone_soa(),
        }
    }

    /// Names outside `.vm` go through `gate` (egress policies) before they are forwarded.
    pub fn with_gate(self, gate: Arc<dyn EgressGate>) -> Self {
        Handler {
            gate: Some(gate),
            ..self
        }
    }

    /// One datagram through the server's own decode and handler path, without sockets: `None`
    /// when it does not decode as a DNS request (the server drops those too), else the encoded
    /// response. For the fuzz target and property tests.
    pub async fn answer_raw(&self, raw: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let request = Request::from_bytes(raw.to_vec(), src, Protocol::Udp).ok()?;
        let sink = Captured::default();
        self.handle_request::<_, TokioTime>(&request, sink.clone())
            .await;
        let bytes = sink.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        bytes
    }
}

/// A `ResponseHandler` that keeps the encoded response in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Option<Vec<u8>>>>);

#[async_trait::async_trait]
impl ResponseHandler for Captured {
    async fn send_response<'a>(
        &mut self,
        response: hickory_server::zone_handler::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::new();
        let mut encoder = BinEncoder::new(&mut bytes);
        let info = response.destructive_emit(&mut encoder)?;
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
        Ok(info)
    }
}

/// The zone's SOA. Its minimum field is the negative-caching TTL (RFC 2308), kept as short as the
/// records' TTL so a newly created VM's name resolves within seconds of an earlier NXDOMAIN.
fn zone_soa() -> Record {
    let apex = Name::from_labels(["vm"]).unwrap_or_else(|_| Name::root());
    let mname = Name::from_labels(["ns", "vm"]).unwrap_or_else(|_| Name::root());
    let rname = Name::from_labels(["hostmaster", "vm"]).unwrap_or_else(|_| Name::root());
    Record::from_rdata(
        apex,
        TTL_SECS,
        RData::SOA(SOA::new(mname, rname, 1, 60, 60, 600, TTL_SECS)),
    )
}

fn kind_of(t: RecordType) -> QueryKind {
    match t {
        RecordType::A => QueryKind::A,
        RecordType::ANY => QueryKind::Any,
        RecordType::SOA => QueryKind::Soa,
        _ => QueryKind::Other,
    }
}

/// The EDNS section of a response: present only when the client sent one, advertising at most what
/// the client can take (so hickory's encoder sizes UDP answers for that client).
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut e = Edns::new();
        e.set_max_payload(req.max_payload().max(512));
        e
    })
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        if !question_is_uncompressed(request.queries.as_bytes()) {
            tracing::debug!(src = %request.src(), "dropping a query whose question is compressed");
            return no_response(request);
        }
        let edns = response_edns(request);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = edns.as_ref() {
            builder.edns(e);
        }
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            let resp = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return send(&mut response_handle, resp, request).await;
        }
        let Ok(info) = request.request_info() else {
            // Not exactly one question: nothing sensible to answer or forward.
            let resp = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return send(&mut response_handle, resp, request).await;
        };
        let qname = info.query.name().to_string();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;

        let answer = self.zone.answer(&qname, kind_of(info.query.query_type()));
        let owner: Name = info.query.name().clone().into();
        let records: Vec<Record>;
        let none: [&Record; 0] = [];
        match answer {
            Answer::NotOurs => {
                let is_tcp = matches!(request.protocol(), hickory_server::net::xfer::Protocol::Tcp);
                let client = request.src().ip();
                let decision = self
                    .gate
                    .as_ref()
                    .map_or(Decision::Forward, |g| g.decide(client, &qname));
                if decision == Decision::Refuse {
                    let resp = builder.error_msg(&request.metadata, ResponseCode::Refused);
                    return send(&mut response_handle, resp, request).await;
                }
                return match self
                    .forwarder
                    .forward(request.as_slice(), client, is_tcp)
                    .await
                {
                    Ok(up) => {
                        if let (Decision::ForwardAndAllow, Some(gate)) = (decision, &self.gate) {
                            let (addrs, ttl) = answered_addresses(&up);
                            if !addrs.is_empty() {
                                if let Err(e) = gate.allow(client, addrs, ttl).await {
                                    tracing::warn!(name = %qname, %client, "cannot let the guest reach the answer: {e}");
                                    let resp = builder
                                        .error_msg(&request.metadata, ResponseCode::ServFail);
                                    return send(&mut response_handle, resp, request).await;
                                }
                            }
                        }
                        let mut m = up.metadata;
                        m.id = request.metadata.id;
                        m.message_type = MessageType::Response;
                        m.recursion_available = true;
                        let resp = builder.build(
                            m,
                            up.answers.iter(),
                            up.authorities.iter(),
                            none,
                            up.additionals.iter(),
                        );
                        send(&mut response_handle, resp, request).await
                    }
                    Err(e) => {
                        tracing::debug!(name = %qname, "forwarding failed: {e}");
                        let resp = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                        send(&mut response_handle, resp, request).await
                    }
                };
            }
            Answer::Address(ip) => {
                meta.authoritative = true;
                records = vec![Record::from_rdata(owner, TTL_SECS, RData::A(A(ip)))];
                let resp = builder.build(meta, records.iter(), none, none, none);
                send(&mut response_handle, resp, request).await
            }
            Answer::ApexSoa => {
                meta.authoritative = true;
                let resp = builder.build(meta, [&self.soa], none, none, none);
                send(&mut response_handle, resp, request).await
            }
            Answer::NoData | Answer::NxDomain => {
                meta.authoritative = true;
                if answer == Answer::NxDomain {
                    meta.response_code = ResponseCode::NXDomain;
                }
                let resp = builder.build(meta, none, none, [&self.soa], none);
                send(&mut response_handle, resp, request).await
            }
        }
    }
}

/// The IPv4 addresses in an upstream answer's answer section (CNAME chains included: their
/// A records are there too), and the shortest TTL among them.
fn answered_addresses(answer: &hickory_proto::op::Message) -> (Vec<Ipv4Addr>, Duration) {
    let mut ttl = u32::MAX;
    let mut addrs = Vec::new();
    for r in &answer.answers {
        if let RData::A(A(ip)) = r.data {
            addrs.push(ip);
            ttl = ttl.min(r.ttl);
        }
    }
    (addrs, Duration::from_secs(u64::from(ttl)))
}

/// Whether every question name is written out label by label. hickory-server echoes the question
/// section byte for byte, so a compression pointer in it (which in a query can only point into the
/// header, as the fuzz target found) would point at different bytes in the response and make it
/// unreadable. No resolver compresses its question; such a query is dropped unanswered.
fn question_is_uncompressed(section: &[u8]) -> bool {
    let mut pos = 0;
    while pos < section.len() {
        loop {
            let Some(&len) = section.get(pos) else {
                return false;
            };
            pos += 1;
            if len == 0 {
                break;
            }
            if len & 0xC0 != 0 {
                return false;
            }
            pos += usize::from(len);
        }
        pos += 4; // type and class
    }
    pos == section.len()
}

/// What the server records for a request it chose not to answer.
fn no_response(request: &Request) -> ResponseInfo {
    let mut meta = Metadata::response_from_request(&request.metadata);
    meta.response_code = ResponseCode::ServFail;
    hickory_proto::op::Header {
        metadata: meta,
        counts: Default::default(),
    }
    .into()
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(src = %request.src(), "cannot send DNS response: {e}");
            no_response(request)
        }
    }
}

/// A running server. Dropping it stops the listeners at the next await point; `shutdown` waits for
/// them.
pub struct RunningDns {
    server: Server<Handler>,
    addr: SocketAddr,
}

impl std::fmt::Debug for RunningDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningDns")
            .field("addr", &self.addr)
            .finish()
    }
}

impl RunningDns {
    /// Where it listens (UDP and TCP share the address and port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn shutdown(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            tracing::debug!("DNS server stopped with: {e}");
        }
    }
}

impl Drop for RunningDns {
    fn drop(&mut self) {
        self.server.shutdown_token().cancel();
    }
}

/// Starts serving on `listen` (UDP and TCP; port 0 picks a free one, the same for both) for clients
/// inside `clients`.
pub async fn serve(
    listen: SocketAddr,
    clients: Ipv4Net,
    zone: Zone,
    forwarder: Forwarder,
) -> Result<RunningDns, DnsError> {
    serve_handler(listen, clients, Handler::new(zone, forwarder)).await
}

/// [`serve`] with a handler of the caller's (one with an egress gate, say).
pub async fn serve_handler(
    listen: SocketAddr,
    clients: Ipv4Net,
    handler: Handler,
) -> Result<RunningDns, DnsError> {
    let udp = UdpSocket::bind(listen)
        .await
        .map_err(|source| DnsError::Bind {
            addr: listen,
            proto: "udp",
            source,
        })?;
    let addr = udp.local_addr().map_err(|source| DnsError::Bind {
        addr: listen,
        proto: "udp",
        source,
    })?;
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|source| DnsError::Bind {
            addr,
            proto: "tcp",
            source,
        })?;
    let mut server = Server::with_access(handler, [], [IpNet::V4(clients.trunc())]);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
    tracing::info!(%addr, %clients, "serving the .vm zone");
    Ok(RunningDns { server, addr })
}

/// The subnet `ip/prefix` as an access-list entry.
pub fn client_net(ip: Ipv4Addr, prefix: u8) -> Option<Ipv4Net> {
    Ipv4Net::new(ip, prefix).ok().map(|n| n.trunc())
}

#[cfg(test)]
mod tests {
    use super::question_is_uncompressed;

    #[test]
    fn compressed_or_cut_questions_are_told_apart_from_plain_ones() {
        let web_vm_a_in = b"\x03web\x02vm\x00\x00\x01\x00\x01";
        assert!(question_is_uncompressed(web_vm_a_in));
        let two: Vec<u8> = [&web_vm_a_in[..], &web_vm_a_in[..]].concat();
        assert!(question_is_uncompressed(&two));
        assert!(question_is_uncompressed(b""));
        assert!(!question_is_uncompressed(
            b"\x03web\xc0\x00\x00\x01\x00\x01"
        ));
        assert!(!question_is_uncompressed(b"\x03web\x02vm\x00\x00\x01"));
        assert!(!question_is_uncompressed(b"\x09web"));
        assert!(!question_is_uncompressed(b"\x43web\x00\x00\x01\x00\x01"));
    }
}
