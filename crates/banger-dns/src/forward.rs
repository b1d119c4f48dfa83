//! Forwarding names outside `.vm` to the host's resolvers, for guests (whose only resolver is the
//! bridge address).
//!
//! The client's query bytes are relayed as they came (EDNS options, DO and CD bits intact) under a
//! fresh random ID, over UDP first and over TCP when the upstream truncates and the client itself
//! asked over TCP (a UDP client gets the TC bit and retries over TCP, as it would with any
//! resolver). Upstreams are tried in resolv.conf order, each with a short timeout; one that does
//! not answer, fails (SERVFAIL) or refuses passes the query to the next. At most
//! `MAX_IN_FLIGHT` forwards run at once, and at most `MAX_PER_CLIENT` for one client address;
//! beyond that a query fails fast with SERVFAIL rather than piling up sockets, so a flood from one
//! guest can neither exhaust the daemon's file descriptors nor starve the other guests.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Forwards allowed at the same time.
pub const MAX_IN_FLIGHT: usize = 256;
/// Forwards allowed at the same time for one client address.
pub const MAX_PER_CLIENT: usize = 64;

/// How long one upstream gets to answer one query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured (none usable in /etc/resolv.conf)")]
    NoUpstreams,
    #[error("too many forwarded queries in flight ({MAX_IN_FLIGHT})")]
    Busy,
    #[error("too many forwarded queries in flight from {0} ({MAX_PER_CLIENT})")]
    ClientBusy(IpAddr),
    #[error("the query is too short to carry a DNS header")]
    ShortQuery,
    #[error("no upstream answered: {0}")]
    Failed(String),
}

/// How long the host's resolver list is trusted before resolv.conf is read again (a laptop moving
/// between networks changes it under a running daemon).
pub const HOST_UPSTREAMS_TTL: Duration = Duration::from_secs(5);

/// Where the upstream list comes from.
#[derive(Debug)]
enum Source {
    Fixed(Arc<Vec<SocketAddr>>),
    /// The host's resolv.conf, minus banger's own address, re-read when older than the TTL.
    Host {
        exclude: IpAddr,
        cached: Mutex<Option<(Instant, Arc<Vec<SocketAddr>>)>>,
    },
}

/// The upstream side of the server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Forwarder {
    source: Arc<Source>,
    permits: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    timeout: Duration,
}

/// One client's claim on a forward slot; gives it back when dropped.
struct ClientSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    client: IpAddr,
}

impl ClientSlot {
    fn claim(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, client: IpAddr) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(client).or_default();
        if *n >= MAX_PER_CLIENT {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: counts.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

impl Forwarder {
    /// Forwards to the host's resolvers (see `upstream`), never to `own_addr`.
    pub fn host(own_addr: IpAddr) -> Self {
        Self::from_source(
            Source::Host {
                exclude: own_addr,
                cached: Mutex::new(None),
            },
            UPSTREAM_TIMEOUT,
        )
    }

    /// Forwards to a fixed list (tests, benchmarks).
    pub fn with_timeout(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self::from_source(Source::Fixed(Arc::new(upstreams)), timeout)
    }

    fn from_source(source: Source, timeout: Duration) -> Self {
        Forwarder {
            source: Arc::new(source),
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            per_client: Arc::default(),
            timeout,
        }
    }

    /// The upstreams a query would go to now.
    pub fn upstreams(&self) -> Arc<Vec<SocketAddr>> {
        match &*self.source {
            Source::Fixed(list) => list.clone(),
            Source::Host { exclude, cached } => {
                let mut c = cached.lock().unwrap_or_else(|p| p.into_inner());
                match &*c {
                    Some((at, list)) if at.elapsed() < HOST_UPSTREAMS_TTL => list.clone(),
                    _ => {
                        let list = Arc::new(crate::upstream::host_upstreams(*exclude));
                        *c = Some((Instant::now(), list.clone()));
                        list
                    }
                }
            }
        }
    }

    /// Sends `query` (a whole DNS message as received from `client`) upstream and returns the
    /// parsed answer, its ID still the upstream one (the caller answers under the client's ID).
    pub async fn forward(
        &self,
        query: &[u8],
        client: IpAddr,
        client_tcp: bool,
    ) -> Result<Message, ForwardError> {
        let upstreams = self.upstreams();
        if upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        if query.len() < 12 {
            return Err(ForwardError::ShortQuery);
        }
        let _slot =
            ClientSlot::claim(&self.per_client, client).ok_or(ForwardError::ClientBusy(client))?;
        let _permit = self.permits.try_acquire().map_err(|_| ForwardError::Busy)?;
        let mut errors = Vec::new();
        let mut last_refusal = None;
        for &upstream in upstreams.iter() {
            match self.ask(upstream, query, client_tcp).await {
                // A server that fails or refuses (a VPN resolver that only serves its own
                // domains, say) passes the query on; its answer is kept in case all do.
                Ok(m)
                    if matches!(
                        m.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused
                    ) =>
                {
                    errors.push(format!("{upstream}: {}", m.metadata.response_code));
                    last_refusal = Some(m);
                }
                Ok(m) => return Ok(m),
                Err(e) => errors.push(format!("{upstream}: {e}")),
            }
        }
        last_refusal.ok_or_else(|| ForwardError::Failed(errors.join("; ")))
    }

    async fn ask(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        client_tcp: bool,
    ) -> std::io::Result<Message> {
        let id: u16 = rand::random();
        let mut bytes = query.to_vec();
        bytes[..2].copy_from_slice(&id.to_be_bytes());
        let answer = tokio::time::timeout(self.timeout, udp_exchange(upstream, &bytes, id))
            .await
            .map_err(|_| timed_out())??;
        if answer.metadata.truncation && client_tcp {
            return tokio::time::timeout(self.timeout, tcp_exchange(upstream, &bytes, id))
                .await
                .map_err(|_| timed_out())?;
        }
        Ok(answer)
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")
}

fn bad_answer(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad answer: {e}"))
}

async fn udp_exchange(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        // A connected socket only sees datagrams from the upstream; a stray one with another ID
        // (a late answer to an earlier try) is skipped rather than trusted.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return Message::from_vec(&buf[..n]).map_err(bad_answer);
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Message> {
    let len = u16::try_from(query.len()).map_err(bad_answer)?;
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let n = stream.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    stream.read_exact(&mut buf).await?;
    if buf.len() < 2 || u16::from_be_bytes([buf[0], buf[1]]) != id {
        return Err(bad_answer("answer ID does not match the query"));
    }
    Message::from_vec(&buf).map_err(bad_answer)
}
