//! The server on loopback, queried by `dig` (a real resolver client). The upstream is a small
//! stand-in on loopback because tests may not reach a real resolver; it answers every name with
//! 192.0.2.7, truncates over UDP for names starting with `big` (so the TCP fallback is exercised)
//! and never answers names starting with `hole`.
//! The netns end-to-end test (tests/tests/vm_lifecycle.rs) covers the daemon's real bridge address.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use banger_dns::{client_net, serve, Forwarder, RunningDns, Zone};
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig runs (package dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("<no answer>")
}

/// Answers from the stand-in upstream for `name`.
fn upstream_answer(query: &Message, truncate: bool) -> Vec<u8> {
    let mut m = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.queries = query.queries.clone();
    if truncate {
        m.metadata.truncation = true;
    } else if let Some(q) = query.queries.first() {
        m.answers.push(Record::from_rdata(
            q.name().clone(),
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
        ));
    }
    m.to_vec().unwrap()
}

async fn fake_upstream() -> SocketAddr {
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let starts = |p: &str| {
                q.queries
                    .first()
                    .is_some_and(|q| q.name().to_string().starts_with(p))
            };
            if starts("hole") {
                continue; // a black-holed name: never answered
            }
            let big = starts("big");
            let _ = udp.send_to(&upstream_answer(&q, big), from).await;
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(n) = s.read_u16().await else { return };
                let mut buf = vec![0u8; n.into()];
                if s.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let Ok(q) = Message::from_vec(&buf) else {
                    return;
                };
                let a = upstream_answer(&q, false);
                let _ = s.write_all(&(a.len() as u16).to_be_bytes()).await;
                let _ = s.write_all(&a).await;
            });
        }
    });
    addr
}

/// A server on 127.0.0.1 (any port) for `clients`, forwarding to `upstreams`.
async fn serve_local(
    clients: &str,
    zone: Zone,
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
) -> RunningDns {
    let clients: ipnet::Ipv4Net = clients.parse().unwrap();
    serve(
        "127.0.0.1:0".parse().unwrap(),
        client_net(clients.addr(), clients.prefix_len()).unwrap(),
        zone,
        Forwarder::with_timeout(upstreams, timeout),
    )
    .await
    .unwrap()
}

/// The usual set-up: `web.vm` in the zone, the stand-in upstream behind it.
async fn start(clients: &str) -> (RunningDns, Zone) {
    let zone = Zone::new();
    zone.replace([("web".to_owned(), Ipv4Addr::new(172, 16, 0, 2))]);
    let upstream = fake_upstream().await;
    let dns = serve_local(
        clients,
        zone.clone(),
        vec![upstream],
        Duration::from_secs(1),
    )
    .await;
    (dns, zone)
}

/// Runs `dig` off the runtime's threads (it blocks).
async fn dig_async(server: SocketAddr, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        dig(server, &a)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_names_resolve_authoritatively_over_udp_and_tcp() {
    let (dns, _zone) = start("127.0.0.0/8").await;
    let addr = dns.local_addr();
    for proto in ["+notcp", "+tcp"] {
        let out = dig_async(addr, &[proto, "web.vm", "A"]).await;
        assert_eq!(status(&out), "NOERROR", "{out}");
        assert!(out.contains(" aa "), "authoritative: {out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("web.vm.") && l.contains("5\tIN\tA\t172.16.0.2")),
            "{out}"
        );
        let short = dig_async(addr, &[proto, "+short", "WEB.VM"]).await;
        assert_eq!(short.trim(), "172.16.0.2");
    }
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_nxdomain_with_the_zone_soa_and_other_types_are_empty() {
    let (dns, zone) = start("127.0.0.0/8").await;
    let addr = dns.local_addr();
    let out = dig_async(addr, &["nope.vm"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(out.contains("SOA\tns.vm. hostmaster.vm."), "{out}");
    let out = dig_async(addr, &["web.vm", "AAAA"]).await;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 0"), "{out}");
    // The table is live: a removed VM is gone at once.
    zone.replace([]);
    let out = dig_async(addr, &["web.vm"]).await;
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_names_are_forwarded_and_truncation_falls_back_to_tcp() {
    let (dns, _zone) = start("127.0.0.0/8").await;
    let addr = dns.local_addr();
    let out = dig_async(addr, &["+short", "example.test"]).await;
    assert_eq!(out.trim(), "192.0.2.7");
    // Over UDP the upstream truncates; dig retries over TCP, which banger relays over TCP.
    let out = dig_async(addr, &["big.example.test"]).await;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("192.0.2.7"), "{out}");
    dns.shutdown().await;
}

/// An upstream that refuses everything (as a VPN resolver does for names outside its domains).
async fn refusing_upstream() -> SocketAddr {
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut m = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
            m.queries = q.queries.clone();
            m.metadata.response_code = hickory_proto::op::ResponseCode::Refused;
            let _ = udp.send_to(&m.to_vec().unwrap(), from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_passes_the_query_to_the_next() {
    let refusing = refusing_upstream().await;
    let good = fake_upstream().await;
    let dns = serve_local(
        "127.0.0.0/8",
        Zone::new(),
        vec![refusing, good],
        Duration::from_secs(1),
    )
    .await;
    let out = dig_async(dns.local_addr(), &["+short", "example.test"]).await;
    assert_eq!(out.trim(), "192.0.2.7");
    dns.shutdown().await;
    // Alone, its refusal is what the client gets.
    let dns = serve_local(
        "127.0.0.0/8",
        Zone::new(),
        vec![refusing],
        Duration::from_secs(1),
    )
    .await;
    let out = dig_async(dns.local_addr(), &["example.test"]).await;
    assert_eq!(status(&out), "REFUSED", "{out}");
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_black_holed_names_does_not_starve_the_others() {
    let (dns, _zone) = start("127.0.0.0/8").await;
    let addr = dns.local_addr();
    // 300 forwards that will each wait out the upstream timeout: more than the global cap.
    let flooder = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    for i in 0..300u16 {
        let mut m = Message::query();
        m.metadata.id = i;
        m.metadata.recursion_desired = true;
        m.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii(format!("hole{i}.example.test.")).unwrap(),
            hickory_proto::rr::RecordType::A,
        ));
        flooder.send_to(&m.to_vec().unwrap(), addr).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = dig_async(addr, &["-b", "127.0.0.3", "+short", "example.test"]).await;
    assert_eq!(out.trim(), "192.0.2.7", "another client was starved: {out}");
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_gives_servfail_not_silence() {
    // A bound but silent UDP socket: queries to it time out.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = serve_local(
        "127.0.0.0/8",
        Zone::new(),
        vec![silent.local_addr().unwrap()],
        Duration::from_millis(300),
    )
    .await;
    let out = dig_async(dns.local_addr(), &["example.test"]).await;
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_the_guest_subnet_are_refused() {
    let (dns, _zone) = start("172.16.0.0/24").await;
    let out = dig_async(dns.local_addr(), &["web.vm"]).await;
    assert_eq!(status(&out), "REFUSED", "{out}");
    assert!(!out.contains("172.16.0.2"), "{out}");
    dns.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bursts_and_oversized_names_leave_the_server_answering() {
    let (dns, _zone) = start("127.0.0.0/8").await;
    let addr = dns.local_addr();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // Not DNS at all, a header alone, a header claiming records it lacks, a compression loop.
    let junk: [&[u8]; 4] = [
        b"\x00",
        &[0u8; 12],
        &[
            0x12, 0x34, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 3, b'a',
        ],
        &[
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1,
        ],
    ];
    for j in junk {
        sock.send_to(j, addr).await.unwrap();
    }
    // A name of 1000 labels (far past the 255-byte limit), sent raw since dig refuses to build it.
    let mut long = vec![0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    for _ in 0..1000 {
        long.extend_from_slice(&[1, b'a']);
    }
    long.extend_from_slice(&[2, b'v', b'm', 0, 0, 1, 0, 1]);
    sock.send_to(&long, addr).await.unwrap();
    // The same over TCP, then a connection that sends half a frame and stalls.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&(long.len() as u16).to_be_bytes())
        .await
        .unwrap();
    tcp.write_all(&long).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x00, 0x40, 0x12]).await.unwrap();

    // A 10x burst: ten queries at once, all answered.
    let burst: Vec<_> = (0..10)
        .map(|_| tokio::task::spawn_blocking(move || dig(addr, &["+short", "web.vm"])))
        .collect();
    for h in burst {
        assert_eq!(h.await.unwrap().trim(), "172.16.0.2");
    }
    let out = dig_async(addr, &["+tcp", "+short", "web.vm"]).await;
    assert_eq!(out.trim(), "172.16.0.2");
    drop(stalled);
    dns.shutdown().await;
}

/// A gate that refuses names containing `blocked`, lets names containing `open` through
/// untouched, and records what it allows (failing for names asked while `fail` is set).
#[derive(Debug, Default)]
struct RecordingGate {
    allowed: std::sync::Mutex<Vec<(std::net::IpAddr, Vec<Ipv4Addr>, Duration)>>,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl banger_dns::EgressGate for RecordingGate {
    fn decide(&self, _client: std::net::IpAddr, name: &str) -> banger_dns::Decision {
        if name.contains("blocked") {
            banger_dns::Decision::Refuse
        } else if name.contains("open") {
            banger_dns::Decision::Forward
        } else {
            banger_dns::Decision::ForwardAndAllow
        }
    }

    async fn allow(
        &self,
        client: std::net::IpAddr,
        addrs: Vec<Ipv4Addr>,
        ttl: Duration,
    ) -> Result<(), String> {
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the set is full".into());
        }
        self.allowed.lock().unwrap().push((client, addrs, ttl));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_gate_refuses_names_and_learns_the_addresses_of_allowed_answers() {
    let zone = Zone::new();
    zone.replace([("web".to_owned(), Ipv4Addr::new(172, 16, 0, 2))]);
    let upstream = fake_upstream().await;
    let gate = std::sync::Arc::new(RecordingGate::default());
    let handler = banger_dns::Handler::new(
        zone,
        Forwarder::with_timeout(vec![upstream], Duration::from_secs(1)),
    )
    .with_gate(gate.clone());
    let dns = banger_dns::serve_handler(
        "127.0.0.1:0".parse().unwrap(),
        client_net(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap(),
        handler,
    )
    .await
    .unwrap();
    let addr = dns.local_addr();
    // `.vm` names never reach the gate.
    assert_eq!(
        dig_async(addr, &["+short", "web.vm"]).await.trim(),
        "172.16.0.2"
    );
    for proto in ["+notcp", "+tcp"] {
        let out = dig_async(addr, &[proto, "www.blocked.test"]).await;
        assert_eq!(status(&out), "REFUSED", "{out}");
        assert!(!out.contains("192.0.2.7"), "{out}");
    }
    assert!(gate.allowed.lock().unwrap().is_empty());
    assert_eq!(
        dig_async(addr, &["+short", "open.test"]).await.trim(),
        "192.0.2.7"
    );
    assert!(
        gate.allowed.lock().unwrap().is_empty(),
        "an open name is not learnt"
    );
    assert_eq!(
        dig_async(addr, &["+short", "allowed.test"]).await.trim(),
        "192.0.2.7"
    );
    assert_eq!(
        *gate.allowed.lock().unwrap(),
        vec![(
            "127.0.0.1".parse().unwrap(),
            vec![Ipv4Addr::new(192, 0, 2, 7)],
            Duration::from_secs(300)
        )]
    );
    // An address the host could not open is not handed out.
    gate.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let out = dig_async(addr, &["allowed.test"]).await;
    assert_eq!(status(&out), "SERVFAIL", "{out}");
    dns.shutdown().await;
}
