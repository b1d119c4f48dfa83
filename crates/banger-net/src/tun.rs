//! Persistent tap creation through `/dev/net/tun` ioctls, the same calls `ip tuntap add` makes.
//!
//! Sequence: `TUNSETIFF` (IFF_TAP | IFF_NO_PI) creates the device (or attaches to an existing one with that
//! name), `TUNSETOWNER` lets the given uid open it later without privileges, `TUNSETPERSIST` keeps it after
//! our fd closes. No `IFF_VNET_HDR` / `IFF_MULTI_QUEUE`: the VMM sets the header flag itself when it opens
//! the tap, and a multi-queue mismatch would make its open fail. Only `privileged.rs` calls this.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::unistd::Uid;

const TUN_DEVICE: &str = "/dev/net/tun";

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("could not open {TUN_DEVICE}")]
    Open(#[source] std::io::Error),
    #[error("ioctl {call} failed")]
    Ioctl {
        call: &'static str,
        #[source]
        source: Errno,
    },
    #[error("interface name {0:?} does not fit IFNAMSIZ")]
    Name(String),
}

impl TunError {
    pub fn hint(&self) -> &'static str {
        match self {
            TunError::Open(_) => {
                "load the tun module (`modprobe tun`) and check that /dev/net/tun exists"
            }
            TunError::Ioctl {
                source: Errno::EBUSY,
                ..
            } => "a VM is still using this tap; stop it first",
            TunError::Ioctl {
                source: Errno::EPERM,
                ..
            } => "creating taps needs CAP_NET_ADMIN: run bangerd as root or allow sudo",
            TunError::Ioctl {
                source: Errno::EINVAL,
                ..
            } => {
                "an interface with this name exists and is not a tap; remove it with `ip link del`"
            }
            _ => "see the kernel log (`dmesg`) for details",
        }
    }
}

pub fn create_persistent_tap(name: &str, owner: Uid) -> Result<(), TunError> {
    // SAFETY: `ifreq` is plain old data (a char array and a union of integers and structs of integers);
    // all-zero bytes are a valid value and mean "no name, no flags".
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    // Strictly less than IFNAMSIZ so the zeroed last byte stays the NUL terminator.
    if bytes.is_empty() || bytes.len() >= ifr.ifr_name.len() {
        return Err(TunError::Name(name.to_owned()));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // The flag constants are small positive values that fit a c_short, the type of the union member.
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(TunError::Open)?;
    let fd = file.as_raw_fd();

    // SAFETY: `fd` is an open /dev/net/tun descriptor owned by `file`, alive for this call; TUNSETIFF
    // reads and writes a `struct ifreq`, and `ifr` is one, exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
    check(rc, "TUNSETIFF")?;

    // SAFETY: `fd` is attached to the tap now; TUNSETOWNER takes the uid by value, not a pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOWNER, libc::c_ulong::from(owner.as_raw())) };
    check(rc, "TUNSETOWNER")?;

    // SAFETY: as above; TUNSETPERSIST takes a boolean by value.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    check(rc, "TUNSETPERSIST")?;

    // Dropping `file` closes the fd; the tap stays because it is persistent.
    Ok(())
}

fn check(rc: libc::c_int, call: &'static str) -> Result<(), TunError> {
    if rc < 0 {
        Err(TunError::Ioctl {
            call,
            source: Errno::last(),
        })
    } else {
        Ok(())
    }
}
