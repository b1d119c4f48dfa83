//! Pseudo-terminals for `exec` with `tty`: opening a master/slave pair of a given window size,
//! handing the slave to the command's user, making it the controlling terminal of a new session
//! in the child, resizing it, and finding the foreground process group that Ctrl-C and host
//! signals are meant for.
//!
//! Both ends are opened close-on-exec, so no other command inherits them, and the master is
//! non-blocking, so neither the output pump nor the stdin feeder of [`crate::guest::exec`] can
//! get stuck on a session that ended. Everything else about the session (threads, frames, exit)
//! is `exec`'s.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::stat::{fchmod, Mode};
use nix::unistd::{fchown, Gid, Pid, Uid};

use crate::protocol::WindowSize;

/// Both ends of a fresh pseudo-terminal.
#[derive(Debug)]
pub struct Pty {
    /// The agent's end: reads what the command prints, takes what the user types.
    pub master: OwnedFd,
    /// The command's end: its stdin, stdout and stderr.
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size`, both ends close-on-exec, the master non-blocking.
pub fn open(size: WindowSize) -> io::Result<Pty> {
    let ptm = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&ptm)?;
    unlockpt(&ptm)?;
    let slave = open_slave(&ptm)?;
    // SAFETY: into_raw_fd hands over the descriptor posix_openpt opened; nothing else owns it.
    let master = unsafe { OwnedFd::from_raw_fd(ptm.into_raw_fd()) };
    set_size(&master, size)?;
    let flags = OFlag::from_bits_retain(fcntl(&master, FcntlArg::F_GETFL)?);
    fcntl(&master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(Pty { master, slave })
}

/// The slave of `ptm`: through `TIOCGPTPEER` (no path lookup, Linux 4.13+), else by name.
fn open_slave(ptm: &nix::pty::PtyMaster) -> io::Result<OwnedFd> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes the open flags as its integer argument and returns a new
    // descriptor (or -1); it reads and writes no memory of ours.
    let fd = unsafe { libc::ioctl(ptm.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd >= 0 {
        // SAFETY: the ioctl just returned this descriptor to us alone.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let name = CString::new(ptsname_r(ptm)?).map_err(io::Error::other)?;
    // SAFETY: `name` is a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the window size; the kernel sends SIGWINCH to the foreground process group when it
/// changed.
pub fn set_size(master: impl AsFd, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which lives on our stack for the whole call.
    let rc = unsafe { libc::ioctl(master.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The terminal's foreground process group, the one Ctrl-C would reach; `None` when the
/// session has none (its leader is gone).
pub fn foreground_group(master: impl AsFd) -> Option<Pid> {
    nix::unistd::tcgetpgrp(master)
        .ok()
        .filter(|p| p.as_raw() > 0)
}

/// Gives the terminal to the user who will run in it, as login does: owner `uid`, group `gid`
/// (the `tty` group where the image has one), mode 0620. Programs that reopen their terminal by
/// name (`ssh`, `sudo`, `script`) need this once they no longer run as root.
pub fn give_to(slave: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    let fd = slave.as_fd();
    fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    fchmod(fd, Mode::from_bits_truncate(0o620))?;
    Ok(())
}

/// In the child between fork and exec, with the slave already on fd 0: starts a new session
/// and makes the slave its controlling terminal, so the terminal's signals (Ctrl-C, hang-up,
/// SIGWINCH) reach the command. Only async-signal-safe calls.
pub fn become_session_leader() -> io::Result<()> {
    nix::unistd::setsid()?;
    // SAFETY: TIOCSCTTY takes an integer (0: do not steal a terminal from another session);
    // fd 0 is the slave, which the child holds open.
    let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    Errno::result(rc)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of(fd: impl AsFd) -> (u16, u16) {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` into our stack variable.
        let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        (ws.ws_row, ws.ws_col)
    }

    #[test]
    fn a_new_terminal_has_the_size_asked_for_and_can_be_resized() {
        let pty = open(WindowSize {
            rows: 33,
            cols: 101,
        })
        .unwrap();
        assert_eq!(size_of(&pty.slave), (33, 101));
        set_size(&pty.master, WindowSize { rows: 50, cols: 7 }).unwrap();
        assert_eq!(size_of(&pty.slave), (50, 7));
    }

    #[test]
    fn both_ends_are_close_on_exec_and_the_master_does_not_block() {
        let pty = open(WindowSize::DEFAULT).unwrap();
        for fd in [&pty.master, &pty.slave] {
            let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        let flags = OFlag::from_bits_retain(fcntl(&pty.master, FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_NONBLOCK));
        // Nothing typed yet: a read says "try again" instead of hanging the test.
        let mut buf = [0u8; 8];
        assert_eq!(nix::unistd::read(&pty.master, &mut buf), Err(Errno::EAGAIN));
        // A terminal nobody leads has no foreground group.
        assert_eq!(foreground_group(&pty.master), None);
    }
}
