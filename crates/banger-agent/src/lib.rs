//! banger-agent owns the conversation between the banger daemon and its guests: the wire
//! [`protocol`], the guest agent that runs inside every VM ([`guest`], the `banger-agent`
//! binary), and the host-side client the daemon uses ([`host`], behind the `host` feature so
//! the statically linked guest binary stays free of tokio).
//!
//! It leaves to others how the VM is started and which channel its VMM offers (banger-vmm),
//! what the kernel command line holds beyond parsing it here ([`cmdline`] defines the keys;
//! the daemon writes them), and how the agent gets into an image (the image builder installs
//! the binary at [`GUEST_BINARY_PATH`] and [`SYSTEMD_UNIT`] as [`SYSTEMD_UNIT_NAME`], or puts it
//! into the initramfs as `/init` for images without an init system, with [`image`]'s config).

// Tests may panic on failure; the workspace's unwrap/expect ban is for production code.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod cmdline;
pub mod guest;
#[cfg(any(feature = "host", test))]
pub mod host;
#[cfg(any(feature = "host", test))]
pub use host::HINTS;
pub mod image;
pub mod protocol;

#[cfg(test)]
mod e2e_tests;

pub use guest::transport::{SERIAL_PORT_PATH, VSOCK_PORT};

/// Where images install the agent binary.
pub const GUEST_BINARY_PATH: &str = "/usr/local/bin/banger-agent";

/// The unit file name for [`SYSTEMD_UNIT`] (in `/etc/systemd/system/`, enabled through a
/// `multi-user.target.wants/` symlink).
pub const SYSTEMD_UNIT_NAME: &str = "banger-agent.service";

/// The systemd unit that runs the agent in banger images.
///
/// `Type=notify`: the agent reports ready once hostname, network, DNS, clock and the work disk
/// are set up, so sshd (ordered after it) starts with the VM's identity and home in place.
/// `KillMode=process` keeps background processes started through `vm exec` alive across an
/// agent restart.
pub const SYSTEMD_UNIT: &str = "\
[Unit]
Description=banger guest agent (per-boot setup and the host channel)
After=local-fs.target systemd-udevd.service
Before=ssh.service sshd.service

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/banger-agent
Restart=always
RestartSec=1
KillMode=process
TimeoutStartSec=90

[Install]
WantedBy=multi-user.target
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_unit_runs_the_installed_binary_as_a_notify_service_before_sshd() {
        assert!(SYSTEMD_UNIT.contains(&format!("ExecStart={GUEST_BINARY_PATH}\n")));
        assert!(SYSTEMD_UNIT.contains("Type=notify\n"));
        assert!(SYSTEMD_UNIT.contains("Before=ssh.service sshd.service\n"));
        assert!(SYSTEMD_UNIT.contains("WantedBy=multi-user.target\n"));
    }
}
