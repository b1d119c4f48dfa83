//! The egress gate: what the server does with a name outside `.vm` for a given client, and where
//! it reports the addresses an allowed answer gave that client.
//!
//! The server only asks; the daemon decides (from each VM's egress policy) and opens the host's
//! firewall for the answered addresses before the answer leaves, so the guest's first connection
//! after its lookup already passes. Without a gate every name is forwarded, as for an open
//! policy.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

/// What to do with a name outside `.vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Forward it; the client may go anywhere anyway.
    Forward,
    /// Forward it, and let the client reach the A records of the answer before it gets it.
    ForwardAndAllow,
    /// Answer REFUSED, forward nothing.
    Refuse,
}

#[async_trait::async_trait]
pub trait EgressGate: Send + Sync + std::fmt::Debug {
    /// The decision for `name` (as asked: any case, trailing dot) from `client`.
    fn decide(&self, client: IpAddr, name: &str) -> Decision;

    /// Lets `client` reach `addrs` for about `ttl` (the answer's shortest TTL). An error
    /// makes the server answer SERVFAIL rather than give an address that would not work.
    async fn allow(
        &self,
        client: IpAddr,
        addrs: Vec<Ipv4Addr>,
        ttl: Duration,
    ) -> Result<(), String>;
}
