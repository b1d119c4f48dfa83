//! Taking on a new identity: what a guest restored from a snapshot does, at the host's request
//! (`reidentify`), before anyone uses it. Every VM made from one snapshot starts as a copy of
//! the same machine; this makes it its own: the host's clock, fresh randomness in the kernel's
//! pool, its own MAC and address (the bridge's guard lets it send from nothing else), host
//! name, DNS, machine-id and SSH host key.
//!
//! The request is checked whole before anything changes ([`Identity::from_request`]: a MAC, a
//! machine-id, a bounded seed and key, `banger.*` words that parse), then the steps run in an
//! order that matters: clock and randomness first (what follows may use them), the network
//! next (the old address must stop at once), then the names and keys. The first step that
//! fails ends it with an error: a half-renamed guest is not to be used, and the host deletes
//! it.
//!
//! The work disk is swapped here too (`work_disk`): a VM about to be kept as a warm snapshot
//! unmounts its work disk at the host's request, and each VM restored from it (and the VM
//! itself, once the snapshot is taken) mounts its own, the one now behind `/dev/vdb`
//! ([`crate::guest::workdisk`]).
//!
//! Behind [`IdentityControl`] so the serve loop is tested without changing the test machine.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cmdline::{self, BootSettings};
use crate::guest::serve::{log, report};
use crate::guest::workdisk::{self, MountOutcome, ReleaseOutcome};
use crate::guest::{clock, dns, hostname, network, SetupConfig};
use crate::protocol::SshHostKey;

/// Least and most randomness a request may carry.
pub const SEED_BYTES: std::ops::RangeInclusive<usize> = 16..=512;
/// Largest SSH host key file accepted (an ed25519 key is about 400 bytes).
pub const MAX_KEY_BYTES: usize = 16 * 1024;

/// A checked `reidentify` request.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub boot: BootSettings,
    pub mac: [u8; 6],
    pub machine_id: String,
    pub seed: Vec<u8>,
    pub ssh_host_key: Option<SshHostKey>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("boot", &self.boot.to_string())
            .field("mac", &network::format_mac(self.mac))
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Checks a request from the host; the error says what is wrong with it.
    pub fn from_request(
        boot: &str,
        mac: &str,
        machine_id: &str,
        seed: Vec<u8>,
        ssh_host_key: Option<SshHostKey>,
    ) -> Result<Identity, String> {
        let parsed = cmdline::parse(boot);
        if let Some(w) = parsed.warnings.first() {
            return Err(format!("bad settings: {w}"));
        }
        let boot = parsed.settings;
        if boot.ip.is_none() || boot.hostname.is_none() {
            return Err("the new identity needs an address and a host name".into());
        }
        let mac = parse_mac(mac).ok_or_else(|| format!("{mac:?} is not a MAC address"))?;
        if mac[0] & 1 != 0 {
            return Err("a multicast MAC cannot be an interface's address".into());
        }
        if machine_id.len() != 32
            || !machine_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err("a machine-id is 32 lowercase hex digits".into());
        }
        if !SEED_BYTES.contains(&seed.len()) {
            return Err(format!(
                "the seed has {} bytes, not {} to {}",
                seed.len(),
                SEED_BYTES.start(),
                SEED_BYTES.end()
            ));
        }
        if let Some(key) = &ssh_host_key {
            if key.private.len() > MAX_KEY_BYTES
                || key.public.len() > MAX_KEY_BYTES
                || !key.public.starts_with("ssh-")
                || key.public.trim_end().contains('\n')
            {
                return Err("the SSH host key is not one OpenSSH key pair".into());
            }
        }
        Ok(Identity {
            boot,
            mac,
            machine_id: machine_id.to_owned(),
            seed,
            ssh_host_key,
        })
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Something that can make this guest another VM.
pub trait IdentityControl: Send + Sync {
    /// Applies `identity`, all of it, or says which step failed.
    fn become_vm(&self, identity: &Identity) -> Result<(), String>;
    /// Unmounts (`mounted: false`) the work disk, leaving nothing of it in this guest, or
    /// mounts (`true`) the one now behind its device; or says what failed.
    fn work_disk(&self, mounted: bool) -> Result<(), String>;
}

/// A stand-in for tests: records what it was asked to become and do with the work disk.
#[derive(Debug, Default)]
pub struct RecordingIdentity {
    pub seen: std::sync::Mutex<Vec<Identity>>,
    /// The `mounted` of each `work_disk` request, in order.
    pub work_disk_calls: std::sync::Mutex<Vec<bool>>,
    /// Refuse `work_disk` requests with this `mounted` (recorded all the same), as a guest
    /// whose `/root` is busy, or whose disk will not mount, does.
    pub refuse_work_disk: std::sync::Mutex<Option<bool>>,
}

impl IdentityControl for RecordingIdentity {
    fn become_vm(&self, identity: &Identity) -> Result<(), String> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(identity.clone());
        Ok(())
    }

    fn work_disk(&self, mounted: bool) -> Result<(), String> {
        self.work_disk_calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(mounted);
        let refuse = *self
            .refuse_work_disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match refuse {
            Some(m) if m == mounted => Err(format!(
                "refused (a stand-in that {} the work disk)",
                if mounted {
                    "cannot mount"
                } else {
                    "cannot unmount"
                }
            )),
            _ => Ok(()),
        }
    }
}

/// The real thing, acting on this guest.
#[derive(Debug, Clone, Default)]
pub struct SystemIdentity {
    pub setup: SetupConfig,
}

impl IdentityControl for SystemIdentity {
    fn become_vm(&self, identity: &Identity) -> Result<(), String> {
        let fail = |step: &str, e: &dyn std::fmt::Display| format!("{step}: {e}");
        if let Some(secs) = identity.boot.time {
            clock::sync_forward(secs).map_err(|e| fail("clock", &e))?;
        }
        reseed(&identity.seed).map_err(|e| fail("random seed", &e))?;
        // Checked in from_request: both present.
        if let Some(cidr) = identity.boot.ip {
            network::readdress(
                &self.setup.interface,
                identity.mac,
                cidr,
                identity.boot.gateway,
            )
            .map_err(|e| fail("network", &e))?;
        }
        if let Some(name) = &identity.boot.hostname {
            hostname::apply(name, &self.setup.etc).map_err(|e| fail("host name", &e))?;
        }
        if !identity.boot.dns.is_empty() {
            dns::write_resolv_conf(&self.setup.etc, &identity.boot.dns)
                .map_err(|e| fail("dns", &e))?;
        }
        write_machine_id(&self.setup.etc, &identity.machine_id)
            .map_err(|e| fail("machine-id", &e))?;
        if let Some(key) = &identity.ssh_host_key {
            install_host_key(&self.setup.etc, key).map_err(|e| fail("ssh host key", &e))?;
        }
        remember_settings(
            Path::new(crate::guest::REIDENTIFIED_SETTINGS),
            &identity.boot,
        )
        .map_err(|e| fail("remembering the settings", &e))?;
        Ok(())
    }

    fn work_disk(&self, mounted: bool) -> Result<(), String> {
        let (device, home) = (&self.setup.work_device, &self.setup.home);
        // Only what the host's answer does not tell is logged here: that there was nothing
        // to do.
        if mounted {
            let outcome = workdisk::attach_work_disk(device, home, self.setup.device_wait)
                .map_err(|e| report(&e))?;
            if outcome == MountOutcome::AlreadyMounted {
                log(format_args!(
                    "work disk: {} already mounted; permissions fixed",
                    home.display()
                ));
            }
        } else {
            let outcome = workdisk::release_work_disk(device, home).map_err(|e| report(&e))?;
            if outcome == ReleaseOutcome::NotMounted {
                log(format_args!(
                    "work disk: nothing mounted at {}; nothing to unmount",
                    home.display()
                ));
            }
        }
        Ok(())
    }
}

/// Keeps the settings this guest now has in `path` for an agent that restarts during this
/// boot (see [`crate::guest::read_boot_settings`]), written whole through a rename.
pub fn remember_settings(path: &Path, settings: &BootSettings) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    fs_err::write(&tmp, settings.to_string())?;
    fs_err::rename(&tmp, path)
}

/// Mixes `seed` into the kernel's pool and, where the kernel allows, credits it and reseeds
/// the generator at once: a restored guest's generator state is a copy of the snapshot's, and
/// every copy would otherwise produce the same "random" bytes until it reseeds on its own.
pub fn reseed(seed: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut random = fs_err::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    random.write_all(seed)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + seed.len());
    let bits = i32::try_from(seed.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(seed);
    // RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let fd = random.file().as_raw_fd();
    // SAFETY: RNDADDENTROPY reads a rand_pool_info laid out as above (two ints, then buf_size
    // bytes), which `info` holds and outlives the call. It needs CAP_SYS_ADMIN: without it
    // the write above has still mixed the seed in, uncredited.
    let credited = unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) } == 0;
    if credited {
        // SAFETY: RNDRESEEDCRNG takes no argument.
        unsafe { libc::ioctl(fd, RNDRESEEDCRNG) };
    }
    Ok(())
}

/// Writes `etc/machine-id`, replacing it whole.
pub fn write_machine_id(etc: &Path, id: &str) -> std::io::Result<()> {
    replace_file(&etc.join("machine-id"), format!("{id}\n").as_bytes(), 0o444)
}

/// Replaces the ed25519 host key with `key` and, when sshd runs, tells it to read its keys
/// again (SIGHUP makes it re-execute itself; connections already open stay).
pub fn install_host_key(etc: &Path, key: &SshHostKey) -> std::io::Result<()> {
    let dir = etc.join("ssh");
    if !dir.is_dir() {
        return Ok(());
    }
    let mut private = key.private.clone();
    if !private.ends_with('\n') {
        private.push('\n');
    }
    let public = format!("{}\n", key.public.trim_end());
    replace_file(&dir.join("ssh_host_ed25519_key"), private.as_bytes(), 0o600)?;
    replace_file(
        &dir.join("ssh_host_ed25519_key.pub"),
        public.as_bytes(),
        0o644,
    )?;
    if let Ok(pid) = fs_err::read_to_string("/run/sshd.pid") {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }
    Ok(())
}

/// Writes `path` through a temporary file and a rename, with `mode`.
fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".banger-new");
        path.with_file_name(name)
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";
    const BOOT: &str = "banger.ip=172.16.0.9/24 banger.gw=172.16.0.1 banger.hostname=web2 banger.dns=172.16.0.1 banger.time=1796221963";

    fn ok(mac: &str) -> Result<Identity, String> {
        Identity::from_request(BOOT, mac, ID, vec![1; 32], None)
    }

    #[test]
    fn the_settings_a_guest_took_on_are_what_a_restarted_agent_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger-agent/boot-settings");
        let id = ok("02:ba:ac:10:00:09").unwrap();
        remember_settings(&path, &id.boot).unwrap();
        let back = cmdline::parse(&std::fs::read_to_string(&path).unwrap());
        assert!(back.warnings.is_empty(), "{:?}", back.warnings);
        assert_eq!(back.settings, id.boot);
        assert!(!path.with_extension("tmp").exists());
    }

    #[test]
    fn a_request_is_checked_whole_before_anything_changes() {
        let id = ok("02:BA:ac:10:00:09").unwrap();
        assert_eq!(id.mac, [0x02, 0xba, 0xac, 0x10, 0x00, 0x09]);
        assert_eq!(id.boot.hostname.as_ref().unwrap().to_string(), "web2");
        for bad in [
            "02:ba:ac:10:00",
            "02:ba:ac:10:00:09:11",
            "zz:ba:ac:10:00:09",
            "2:ba:ac:10:0:9",
            "03:ba:ac:10:00:09",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
        let mac = "02:ba:ac:10:00:09";
        assert!(Identity::from_request(BOOT, mac, "ABC", vec![1; 32], None).is_err());
        assert!(Identity::from_request(BOOT, mac, &ID.to_uppercase(), vec![1; 32], None).is_err());
        assert!(Identity::from_request(BOOT, mac, ID, vec![1; 8], None).is_err());
        assert!(Identity::from_request(BOOT, mac, ID, vec![1; 4096], None).is_err());
        assert!(Identity::from_request("banger.hostname=x", mac, ID, vec![1; 32], None).is_err());
        assert!(Identity::from_request(
            "banger.ip=nonsense banger.hostname=x",
            mac,
            ID,
            vec![1; 32],
            None
        )
        .is_err());
        let huge = SshHostKey {
            private: "k".repeat(MAX_KEY_BYTES + 1),
            public: "ssh-ed25519 AAAA".into(),
        };
        assert!(Identity::from_request(BOOT, mac, ID, vec![1; 32], Some(huge)).is_err());
        let not_ssh = SshHostKey {
            private: "k".into(),
            public: "rm -rf /".into(),
        };
        assert!(Identity::from_request(BOOT, mac, ID, vec![1; 32], Some(not_ssh)).is_err());
        // The seed and private key stay out of logs.
        let key = SshHostKey {
            private: "SECRET".into(),
            public: "ssh-ed25519 AAAA".into(),
        };
        let id =
            Identity::from_request(BOOT, mac, ID, b"SEEDSEEDSEEDSEED".to_vec(), Some(key)).unwrap();
        let shown = format!("{id:?}");
        assert!(
            !shown.contains("SECRET") && !shown.contains("SEEDSEED"),
            "{shown}"
        );
    }

    #[test]
    fn machine_id_and_host_key_files_are_replaced_with_their_modes() {
        use std::os::unix::fs::PermissionsExt;
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(etc.path().join("machine-id"), "old\n").unwrap();
        write_machine_id(etc.path(), ID).unwrap();
        assert_eq!(
            std::fs::read_to_string(etc.path().join("machine-id")).unwrap(),
            format!("{ID}\n")
        );
        let key = SshHostKey {
            private: "-----BEGIN-----\nkey\n-----END-----".into(),
            public: "ssh-ed25519 AAAA web2".into(),
        };
        // No /etc/ssh: no sshd, nothing to do.
        install_host_key(etc.path(), &key).unwrap();
        assert!(!etc.path().join("ssh").exists());
        std::fs::create_dir(etc.path().join("ssh")).unwrap();
        std::fs::write(
            etc.path().join("ssh/ssh_host_ed25519_key"),
            "the snapshot's key",
        )
        .unwrap();
        install_host_key(etc.path(), &key).unwrap();
        let private = etc.path().join("ssh/ssh_host_ed25519_key");
        assert_eq!(
            std::fs::read_to_string(&private).unwrap(),
            "-----BEGIN-----\nkey\n-----END-----\n"
        );
        assert_eq!(
            std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_to_string(etc.path().join("ssh/ssh_host_ed25519_key.pub")).unwrap(),
            "ssh-ed25519 AAAA web2\n"
        );
        let left: Vec<_> = std::fs::read_dir(etc.path().join("ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn reseeding_mixes_the_seed_in_without_privileges_too() {
        // Root credits and reseeds; anyone may at least mix bytes in. Either way no error.
        reseed(&[7u8; 32]).unwrap();
    }
}
