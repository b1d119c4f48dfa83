//! The guest end of the agent channel: the virtio-serial port QEMU gives the VM, and the vsock
//! listener Firecracker's bridge connects to. Both are served at once, each for as long as the
//! agent runs, so the agent needs no knowledge of which VMM started it and does not depend on
//! the order in which the kernel brings up the devices.
//!
//! virtio-serial quirks this module absorbs: the port is one stream for the VM's whole life
//! while hosts come and go; reads return end-of-file (not an error, and at once, even under
//! `poll`) while no host is connected; writes block until one is. So the port is opened once
//! and read again after a short, growing sleep when it reports end-of-file, and reopened only
//! when it fails outright.
//!
//! The agent never listens on the guest's network: vsock and virtio-serial are host-only.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

use crate::guest::serve::{log, serve_session, FrameWriter, ServeConfig};

/// The guest's end of QEMU's `virtserialport` named `banger.agent`.
pub const SERIAL_PORT_PATH: &str = "/dev/virtio-ports/banger.agent";
/// The vsock port the agent listens on.
pub const VSOCK_PORT: u32 = 1024;

/// A sleep that grows while nothing happens and starts small again after activity.
struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            current: min,
            min,
            max,
        }
    }

    fn sleep(&mut self) {
        thread::sleep(self.current);
        self.current = (self.current * 2).min(self.max);
    }

    fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Serves both channels until the process ends.
pub fn serve_forever(cfg: Arc<ServeConfig>) -> ! {
    let vsock_cfg = cfg.clone();
    thread::spawn(move || serve_vsock_forever(VSOCK_PORT, &vsock_cfg));
    serve_serial_forever(Path::new(SERIAL_PORT_PATH), &cfg)
}

/// Where the kernel lists virtio-serial ports, each directory with a `name` file.
pub const SYSFS_VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// The port's device: `path` when it exists (udev made the by-name link), else the
/// `/dev/vportNpM` whose sysfs entry under `sysfs` is named like `path`'s last component
/// (guests without udev, e.g. the agent as `/init`).
pub fn find_serial_port(path: &Path, sysfs: &Path, dev: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let wanted = path.file_name()?.to_str()?;
    let mut entries: Vec<_> = std::fs::read_dir(sysfs)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    entries.sort();
    entries.into_iter().find_map(|port| {
        let name = std::fs::read_to_string(sysfs.join(&port).join("name")).ok()?;
        let node = dev.join(&port);
        (name.trim_end() == wanted && node.exists()).then_some(node)
    })
}

/// Serves the virtio-serial port at `path`, waiting for it to appear (its driver is a module
/// that udev may load after the agent started). Without udev's by-name link the port is
/// found through sysfs ([`find_serial_port`]).
pub fn serve_serial_forever(path: &Path, cfg: &Arc<ServeConfig>) -> ! {
    let mut retry = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
    let mut reported_missing = false;
    loop {
        let Some(port) = find_serial_port(path, Path::new(SYSFS_VIRTIO_PORTS), Path::new("/dev"))
        else {
            if !reported_missing {
                log(format_args!(
                    "{} is not there (yet); watching for it",
                    path.display()
                ));
                reported_missing = true;
            }
            retry.sleep();
            continue;
        };
        let path = port.as_path();
        match File::options().read(true).write(true).open(path) {
            Ok(port) => {
                log(format_args!("serving {}", path.display()));
                let err = serve_open_port(port, cfg);
                log(format_args!(
                    "{} failed ({err}); reopening it",
                    path.display()
                ));
            }
            Err(e) => log(format_args!("cannot open {}: {e}", path.display())),
        }
        retry.sleep();
    }
}

/// Serves an open port until it fails; end-of-file only means no host is connected.
fn serve_open_port(port: File, cfg: &Arc<ServeConfig>) -> io::Error {
    let writer = match port.try_clone() {
        Ok(w) => Arc::new(FrameWriter::new(w)),
        Err(e) => return e,
    };
    let mut idle = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    loop {
        match serve_session(&port, &writer, cfg) {
            Ok(s) if s.frames > 0 => {
                log(format_args!("host left the serial channel"));
                idle.reset();
            }
            Ok(_) => idle.sleep(),
            Err(e) => return e,
        }
    }
}

/// Listens on vsock `port` and serves each host connection on its own thread.
pub fn serve_vsock_forever(port: u32, cfg: &Arc<ServeConfig>) {
    let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut reported = false;
    loop {
        let listener = match listen_vsock(port) {
            Ok(l) => l,
            Err(e) => {
                if !reported {
                    log(format_args!(
                        "vsock port {port} unavailable: {e}; retrying quietly"
                    ));
                    reported = true;
                }
                retry.sleep();
                continue;
            }
        };
        log(format_args!("listening on vsock port {port}"));
        loop {
            match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                    let cfg = cfg.clone();
                    thread::spawn(move || serve_vsock_connection(conn, &cfg));
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => {}
                Err(e) => {
                    log(format_args!("vsock accept failed: {e}; listening again"));
                    break;
                }
            }
        }
        retry.sleep();
    }
}

fn listen_vsock(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    socket::listen(&fd, Backlog::new(16)?)?;
    Ok(fd)
}

fn serve_vsock_connection(conn: OwnedFd, cfg: &Arc<ServeConfig>) {
    let conn = File::from(conn);
    let writer = match conn.try_clone() {
        Ok(w) => Arc::new(FrameWriter::new(w)),
        Err(e) => {
            log(format_args!("vsock connection unusable: {e}"));
            return;
        }
    };
    log(format_args!("host connected over vsock"));
    match serve_session(&conn, &writer, cfg) {
        Ok(_) => log(format_args!("host closed its vsock connection")),
        Err(e) => log(format_args!("vsock connection failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_found_by_name_in_sysfs_when_udev_made_no_link() {
        let root = tempfile::tempdir().unwrap();
        let (sysfs, dev) = (root.path().join("sys"), root.path().join("dev"));
        for (port, name) in [("vport0p0", "other\n"), ("vport1p1", "banger.agent\n")] {
            std::fs::create_dir_all(sysfs.join(port)).unwrap();
            std::fs::write(sysfs.join(port).join("name"), name).unwrap();
        }
        std::fs::create_dir_all(dev.join("virtio-ports")).unwrap();
        let link = dev.join("virtio-ports/banger.agent");
        // Named in sysfs but without a device node: not usable yet.
        assert_eq!(find_serial_port(&link, &sysfs, &dev), None);
        std::fs::write(dev.join("vport1p1"), "").unwrap();
        assert_eq!(
            find_serial_port(&link, &sysfs, &dev),
            Some(dev.join("vport1p1"))
        );
        // udev's link wins when it is there.
        std::fs::write(&link, "").unwrap();
        assert_eq!(find_serial_port(&link, &sysfs, &dev), Some(link.clone()));
        // No sysfs directory at all (virtio_console not loaded yet).
        std::fs::remove_file(&link).unwrap();
        assert_eq!(
            find_serial_port(&link, &root.path().join("none"), &dev),
            None
        );
    }
}
