//! Setup step 3: the guest's network — loopback up, then the VM's interface with its address,
//! prefix and default route.
//!
//! Done with the classic `SIOCSIF*`/`SIOCADDRT` ioctls on an `AF_INET` datagram socket rather
//! than netlink or the `ip` binary: guests may have no iproute2, the ioctls have been stable for
//! decades, and they cover exactly what a banger guest needs (one IPv4 address, one route).
//! Everything acts on the calling process's network namespace, which is what lets the tests run
//! this code inside a throwaway namespace.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;

use crate::cmdline::Ipv4Cidr;
use crate::guest::fsutil::wait_until;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{name:?} is not a valid interface name (1 to 15 bytes, no NUL)")]
    BadName { name: String },
    #[error("cannot open a socket to configure the network")]
    Socket(#[source] Errno),
    #[error("interface {name} did not appear within {waited:?}")]
    NoInterface { name: String, waited: Duration },
    #[error("cannot {action} on {name}")]
    Ioctl {
        action: String,
        name: String,
        #[source]
        source: Errno,
    },
    #[error(
        "cannot add the default route via {gateway} on {name}{hint}",
        hint = if *.source == Errno::ENETUNREACH { " (the gateway is outside the interface's subnet)" } else { "" }
    )]
    Route {
        gateway: Ipv4Addr,
        name: String,
        #[source]
        source: Errno,
    },
}

/// What [`configure`] did about the default route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteOutcome {
    Added,
    /// A default route already existed (e.g. the agent was restarted); it was left alone.
    AlreadyPresent,
    NotRequested,
}

/// An interface name checked against `IFNAMSIZ`.
struct IfName([libc::c_char; libc::IFNAMSIZ]);

impl IfName {
    fn new(name: &str) -> Result<Self, NetError> {
        let bad = || NetError::BadName {
            name: name.to_string(),
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(bad());
        }
        let mut raw = [0 as libc::c_char; libc::IFNAMSIZ];
        for (dst, src) in raw.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(IfName(raw))
    }

    fn ifreq(&self) -> libc::ifreq {
        // SAFETY: ifreq is a plain C struct (a name array and a union of plain data); all-zero
        // is a valid value for every field.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = self.0;
        req
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and both are plain data;
    // the kernel reads the bytes as a sockaddr_in because sa_family is AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The kernel's `struct rtentry` (linux/route.h). The libc crate only exposes it for musl, so
/// it is spelled out here; the layout is the kernel ABI and does not change.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

#[cfg(target_arch = "x86_64")]
const _: () = assert!(std::mem::size_of::<RtEntry>() == 120);

/// An `AF_INET` datagram socket: the handle the interface ioctls go through.
struct ConfigSocket(OwnedFd);

impl ConfigSocket {
    fn open() -> Result<Self, NetError> {
        // SAFETY: plain socket(2) call; the returned descriptor is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetError::Socket(Errno::last()));
        }
        // SAFETY: fd is a freshly opened descriptor that nothing else owns.
        Ok(ConfigSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Issues an interface ioctl with `req`.
    fn ifreq_ioctl(&self, request: libc::c_ulong, req: &mut libc::ifreq) -> Result<(), Errno> {
        // SAFETY: every request passed here (SIOC[GS]IF*) takes a pointer to an ifreq, which
        // `req` is, valid and exclusively borrowed for the duration of the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, req as *mut libc::ifreq) };
        if rc < 0 {
            Err(Errno::last())
        } else {
            Ok(())
        }
    }

    fn set_addr(&self, name: &IfName, label: &str, cidr: Ipv4Cidr) -> Result<(), NetError> {
        let fail = |action: String| {
            move |source| NetError::Ioctl {
                action,
                name: label.to_string(),
                source,
            }
        };
        let mut req = name.ifreq();
        req.ifr_ifru.ifru_addr = sockaddr_in(cidr.addr());
        self.ifreq_ioctl(libc::SIOCSIFADDR, &mut req)
            .map_err(fail(format!("set address {}", cidr.addr())))?;
        let mut req = name.ifreq();
        req.ifr_ifru.ifru_netmask = sockaddr_in(cidr.netmask());
        self.ifreq_ioctl(libc::SIOCSIFNETMASK, &mut req)
            .map_err(fail(format!("set netmask {}", cidr.netmask())))
    }

    fn add_default_route(&self, name: &str, gateway: Ipv4Addr) -> Result<RouteOutcome, NetError> {
        let dev = CString::new(name).map_err(|_| NetError::BadName {
            name: name.to_string(),
        })?;
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gateway),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev.as_ptr().cast_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT takes a pointer to a struct rtentry, which RtEntry mirrors; rt_dev
        // points into `dev`, a NUL-terminated string that outlives the call, and the kernel only
        // reads it.
        let rc =
            unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT, &mut rt as *mut RtEntry) };
        if rc == 0 {
            return Ok(RouteOutcome::Added);
        }
        match Errno::last() {
            Errno::EEXIST => Ok(RouteOutcome::AlreadyPresent),
            source => Err(NetError::Route {
                gateway,
                name: name.to_string(),
                source,
            }),
        }
    }

    /// Brings the interface up or takes it down; nothing to do when it already is.
    fn set_flags(&self, name: &IfName, label: &str, up: bool) -> Result<(), NetError> {
        let fail = |action: &'static str| {
            move |source| NetError::Ioctl {
                action: action.to_string(),
                name: label.to_string(),
                source,
            }
        };
        let mut req = name.ifreq();
        self.ifreq_ioctl(libc::SIOCGIFFLAGS, &mut req)
            .map_err(fail("read the interface flags"))?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let up_flag = libc::IFF_UP as libc::c_short;
        if (flags & up_flag != 0) == up {
            return Ok(());
        }
        req.ifr_ifru.ifru_flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        self.ifreq_ioctl(libc::SIOCSIFFLAGS, &mut req)
            .map_err(fail(if up {
                "bring the interface up"
            } else {
                "take the interface down"
            }))
    }

    fn set_hwaddr(&self, name: &IfName, label: &str, mac: [u8; 6]) -> Result<(), NetError> {
        let mut req = name.ifreq();
        let mut addr = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (dst, src) in addr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = addr;
        self.ifreq_ioctl(libc::SIOCSIFHWADDR, &mut req)
            .map_err(|source| NetError::Ioctl {
                action: format!("set MAC address {}", format_mac(mac)),
                name: label.to_string(),
                source,
            })
    }
}

/// `02:ba:ac:10:00:02`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Gives `name` a new MAC address and a new IPv4 address: down (so the old address sends
/// nothing more), new MAC, new address, up, default route via `gateway`. What a guest restored
/// from a snapshot does to become a VM of its own.
pub fn readdress(
    name: &str,
    mac: [u8; 6],
    cidr: Ipv4Cidr,
    gateway: Option<Ipv4Addr>,
) -> Result<RouteOutcome, NetError> {
    let ifname = IfName::new(name)?;
    let sock = ConfigSocket::open()?;
    sock.set_flags(&ifname, name, false)?;
    sock.set_hwaddr(&ifname, name, mac)?;
    sock.set_addr(&ifname, name, cidr)?;
    sock.set_flags(&ifname, name, true)?;
    // Taking the link down dropped the routes through it.
    match gateway {
        Some(gw) => sock.add_default_route(name, gw),
        None => Ok(RouteOutcome::NotRequested),
    }
}

/// Brings interface `name` up (loopback needs nothing more).
pub fn set_link_up(name: &str) -> Result<(), NetError> {
    let ifname = IfName::new(name)?;
    ConfigSocket::open()?.set_flags(&ifname, name, true)
}

/// Waits until interface `name` exists; its driver may still be loading when the agent starts.
pub fn wait_for_interface(name: &str, timeout: Duration) -> Result<(), NetError> {
    IfName::new(name)?;
    if wait_until(timeout, || nix::net::if_::if_nametoindex(name).is_ok()) {
        Ok(())
    } else {
        Err(NetError::NoInterface {
            name: name.to_string(),
            waited: timeout,
        })
    }
}

/// Gives `name` the address and prefix of `cidr`, brings it up, and adds a default route via
/// `gateway` when one is given. Safe to repeat.
pub fn configure(
    name: &str,
    cidr: Ipv4Cidr,
    gateway: Option<Ipv4Addr>,
) -> Result<RouteOutcome, NetError> {
    let ifname = IfName::new(name)?;
    let sock = ConfigSocket::open()?;
    sock.set_addr(&ifname, name, cidr)?;
    sock.set_flags(&ifname, name, true)?;
    match gateway {
        Some(gw) => sock.add_default_route(name, gw),
        None => Ok(RouteOutcome::NotRequested),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn interface_names_are_checked_before_any_syscall() {
        assert!(matches!(
            set_link_up("an-interface-name-too-long"),
            Err(NetError::BadName { .. })
        ));
        assert!(matches!(set_link_up(""), Err(NetError::BadName { .. })));
    }

    #[test]
    fn waiting_for_a_missing_interface_times_out_naming_it() {
        let err = wait_for_interface("bgr-missing0", Duration::from_millis(200)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "interface bgr-missing0 did not appear within 200ms"
        );
    }

    /// Env var that makes [`configures_a_veth_interface_inside_a_fresh_netns`] run its body:
    /// the test re-runs itself inside the namespace it created.
    const NETNS_CHILD: &str = "BANGER_AGENT_TEST_IN_NETNS";

    /// A network namespace that is deleted on drop, even when the test fails.
    struct Netns(String);

    impl Netns {
        fn create() -> Self {
            let name = format!("banger-agent-test-{}", std::process::id());
            let status = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("the `ip` binary (iproute2) is needed for this test");
            assert!(status.success(), "ip netns add {name} failed");
            Netns(name)
        }

        fn ip(&self, args: &[&str]) -> String {
            let out = Command::new("ip")
                .args(["-n", &self.0])
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip -n {} {args:?}: {}",
                self.0,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }

        fn json(&self, args: &[&str]) -> serde_json::Value {
            let mut all = vec!["-j"];
            all.extend_from_slice(args);
            serde_json::from_str(&self.ip(&all)).unwrap()
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn configures_a_veth_interface_inside_a_fresh_netns() {
        if std::env::var_os(NETNS_CHILD).is_some() {
            // Inside the namespace: the code under test, exactly as the agent calls it.
            set_link_up("lo").unwrap();
            wait_for_interface("eth0", Duration::from_secs(2)).unwrap();
            let cidr: Ipv4Cidr = "172.16.0.2/24".parse().unwrap();
            let gw = Ipv4Addr::new(172, 16, 0, 1);
            assert_eq!(
                configure("eth0", cidr, Some(gw)).unwrap(),
                RouteOutcome::Added
            );
            // The agent may be restarted: configuring again must succeed and change nothing.
            assert_eq!(
                configure("eth0", cidr, Some(gw)).unwrap(),
                RouteOutcome::AlreadyPresent
            );
            // A guest restored from a snapshot becomes another VM: new MAC, new address, the
            // old one gone, the default route back.
            let mac = [0x02, 0xba, 0xac, 0x10, 0x00, 0x09];
            assert_eq!(
                readdress("eth0", mac, "172.16.0.9/24".parse().unwrap(), Some(gw)).unwrap(),
                RouteOutcome::Added
            );
            return;
        }

        let ns = Netns::create();
        // A veth pair stands in for the VM's NIC (this kernel has no `dummy` driver); its
        // peer is up so eth0 gets a carrier like a virtio-net device would.
        ns.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0-peer",
        ]);
        ns.ip(&["link", "set", "eth0-peer", "up"]);
        let exe = std::env::current_exe().unwrap();
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(exe)
            .args([
                "--exact",
                "guest::network::tests::configures_a_veth_interface_inside_a_fresh_netns",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(NETNS_CHILD, "1")
            .output()
            .unwrap();
        let child_log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{child_log}");
        assert!(
            child_log.contains("1 passed"),
            "child ran no test:\n{child_log}"
        );

        let addrs = ns.json(&["addr", "show", "dev", "eth0"]);
        let info = &addrs[0]["addr_info"];
        let v4: Vec<_> = info
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["family"] == "inet")
            .collect();
        assert_eq!(v4.len(), 1, "{addrs}");
        assert_eq!(
            v4[0]["local"], "172.16.0.9",
            "the restored guest's own address"
        );
        assert_eq!(addrs[0]["address"], "02:ba:ac:10:00:09", "{addrs}");
        assert_eq!(v4[0]["prefixlen"], 24);
        let flags = addrs[0]["flags"].as_array().unwrap();
        assert!(flags.iter().any(|f| f == "UP"), "eth0 not up: {addrs}");

        let lo = ns.json(&["link", "show", "dev", "lo"]);
        let lo_flags = lo[0]["flags"].as_array().unwrap();
        assert!(lo_flags.iter().any(|f| f == "UP"), "lo not up: {lo}");

        let routes = ns.json(&["-4", "route", "show", "default"]);
        assert_eq!(routes.as_array().unwrap().len(), 1, "{routes}");
        assert_eq!(routes[0]["gateway"], "172.16.0.1");
        assert_eq!(routes[0]["dev"], "eth0");
        let subnet = ns.json(&["-4", "route", "show", "172.16.0.0/24"]);
        assert_eq!(subnet[0]["dev"], "eth0", "{subnet}");
    }
}
