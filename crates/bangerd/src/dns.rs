//! The daemon's side of `.vm` names: it keeps the zone in step with the VM list, runs the server
//! on the bridge address while the bridge exists, and routes the host's `.vm` lookups to it through
//! systemd-resolved where that applies.
//!
//! The bridge only exists while some VM runs (the network is torn down after the last one stops),
//! and the server binds the bridge address, so its lifetime follows the bridge: `ensure_running`
//! is called right after the network is attached for a VM (and at start-up when running VMs are
//! re-adopted), `stop` right before the bridge is torn down. The zone itself lives for the whole
//! daemon and lists every VM, running or not, since a name's address never changes while it exists.
//! A server that cannot start fails the VM's start: the nft table sends every guest's port 53 on
//! the bridge address to the server's port, so if anything else holds that port (another user's
//! program, say), guests' queries would reach it. The start then releases the network, and the
//! redirect goes with it. (At daemon start-up, re-adopting running VMs, a failure is logged.)
//!
//! The VM service reaches this through the [`NameService`] trait, so its tests run with a
//! recording fake instead of a server on a bridge that does not exist.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use banger_dns::{Forwarder, RunningDns, Zone};
use banger_net::resolved::{self, Routing};
use banger_net::{BridgeConfig, HostNet, Network, PrivilegedRunner};
use std::sync::Arc;

use crate::egress::EgressTable;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex as AsyncMutex;

/// What the VM service asks of the `.vm` names: the zone's contents, and a server whose
/// lifetime follows the bridge.
pub trait NameService: Send + Sync {
    /// Replaces the served names with `entries` (VM name, address).
    fn set_names(&self, entries: Vec<(String, Ipv4Addr)>);
    /// Replaces every VM's egress policy (VM name, address, policy): what names outside `.vm`
    /// each guest may resolve.
    fn set_egress(&self, entries: Vec<(String, Ipv4Addr, banger_net::Egress)>);
    /// Starts serving (the bridge must be up); does nothing when it runs already. Fails when
    /// the server cannot hold its socket.
    fn ensure_running(&self) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Stops serving; called right before the bridge goes away.
    fn stop(&self) -> BoxFuture<'_, ()>;
    fn status(&self) -> banger_api::DnsStatus;
}

pub struct DnsService {
    zone: Zone,
    egress: Arc<EgressTable>,
    running: AsyncMutex<Option<Running>>,
    /// Mirrors of `running` for `status`, which must not wait while a start holds the lock
    /// (routing through resolved may take a while).
    serving: AtomicBool,
    routed: AtomicBool,
    net: BridgeConfig,
    privileged: PrivilegedRunner,
}

struct Running {
    server: RunningDns,
    routed: bool,
}

impl DnsService {
    /// The server for `network`'s bridge; allowed answers open `network`'s firewall.
    pub fn new(network: Arc<Network<dyn HostNet>>) -> Self {
        DnsService {
            zone: Zone::new(),
            running: AsyncMutex::new(None),
            serving: AtomicBool::new(false),
            routed: AtomicBool::new(false),
            net: network.config().clone(),
            egress: Arc::new(EgressTable::new(network)),
            privileged: PrivilegedRunner::detect(),
        }
    }

    /// Where the server listens: the bridge address, on the port banger's nft table DNATs 53 to.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from((self.net.subnet.gateway(), banger_net::nat::DNS_SERVE_PORT))
    }

    /// Starts the server (the bridge must be up) and routes `.vm` to it. Does nothing when it runs.
    async fn start(&self) -> anyhow::Result<()> {
        let mut guard = self.running.lock().await;
        if guard.is_some() {
            return Ok(());
        }
        let gateway = self.net.subnet.gateway();
        let Some(clients) = banger_dns::client_net(gateway, self.net.subnet.prefix_len()) else {
            anyhow::bail!(
                "bridge subnet {} cannot be the DNS server's access list",
                self.net.subnet
            );
        };
        let forwarder = Forwarder::host(IpAddr::V4(gateway));
        if forwarder.upstreams().is_empty() {
            tracing::warn!(
                "no usable nameserver in /etc/resolv.conf: guests resolve `.vm` names only"
            );
        }
        let handler =
            banger_dns::Handler::new(self.zone.clone(), forwarder).with_gate(self.egress.clone());
        let server = banger_dns::serve_handler(self.listen_addr(), clients, handler).await?;
        self.serving.store(true, Ordering::Relaxed);
        let routed = self.route().await;
        self.routed.store(routed, Ordering::Relaxed);
        *guard = Some(Running { server, routed });
        Ok(())
    }

    async fn route(&self) -> bool {
        match resolved::Probe::default().detect() {
            Routing::Resolved => {
                let privileged = self.privileged.clone();
                let bridge = self.net.bridge.clone();
                let dns = self.net.subnet.gateway();
                let r =
                    tokio::task::spawn_blocking(move || resolved::route(&privileged, &bridge, dns))
                        .await;
                match r {
                    Ok(Ok(())) => {
                        tracing::info!("`.vm` is routed to banger through systemd-resolved");
                        true
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(
                            "cannot route `.vm` through systemd-resolved: {}",
                            crate::hints::report(&e)
                        );
                        false
                    }
                    Err(e) => {
                        tracing::warn!("resolved routing task failed: {e}");
                        false
                    }
                }
            }
            Routing::OtherNamespace => {
                tracing::info!(
                    "not routing `.vm` through systemd-resolved: this daemon runs in another \
                     network namespace than resolved"
                );
                false
            }
            Routing::NoResolved => {
                tracing::debug!("systemd-resolved is not running; see docs/dns-routing.md");
                false
            }
        }
    }

    fn status_now(&self) -> banger_api::DnsStatus {
        banger_api::DnsStatus {
            serving: self.serving.load(Ordering::Relaxed),
            address: format!("{}:53", self.net.subnet.gateway()),
            names: self.zone.entries().len(),
            routed_by_resolved: self.routed.load(Ordering::Relaxed),
        }
    }

    /// Unroutes `.vm` and stops the server; call before the bridge goes away.
    async fn shut_down(&self) {
        let Some(running) = self.running.lock().await.take() else {
            return;
        };
        self.serving.store(false, Ordering::Relaxed);
        self.routed.store(false, Ordering::Relaxed);
        if running.routed {
            let privileged = self.privileged.clone();
            let bridge = self.net.bridge.clone();
            let r =
                tokio::task::spawn_blocking(move || resolved::unroute(&privileged, &bridge)).await;
            if let Ok(Err(e)) = r {
                tracing::warn!(
                    "cannot revert systemd-resolved settings on the bridge: {}",
                    crate::hints::report(&e)
                );
            }
        }
        running.server.shutdown().await;
        tracing::info!("DNS server stopped with the bridge");
    }
}

impl NameService for DnsService {
    fn set_names(&self, entries: Vec<(String, Ipv4Addr)>) {
        self.zone.replace(entries);
    }

    fn set_egress(&self, entries: Vec<(String, Ipv4Addr, banger_net::Egress)>) {
        self.egress.replace(entries);
    }

    fn ensure_running(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.start())
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shut_down())
    }

    fn status(&self) -> banger_api::DnsStatus {
        self.status_now()
    }
}
