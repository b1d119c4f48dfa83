//! Who a command runs as: an OCI `User` value (`name`, `uid`, `name:group`, `uid:gid`,
//! `name:gid`, `uid:group`) resolved against the guest's `/etc/passwd` and `/etc/group`, the
//! way container runtimes do it.
//!
//! Both files belong to the image, so they are untrusted input: each is read only if it is a
//! regular file (a FIFO would hang the agent), at most [`MAX_DB_BYTES`] of it, and lines that do
//! not parse — comments, NIS `+`/`-` entries, wrong field counts, non-numeric or out-of-range
//! ids, invalid UTF-8 — are skipped rather than trusted. A numeric uid needs no entry (the
//! command then gets gid 0 unless the value names a group, and `HOME=/`); a name must have one.
//!
//! This module only decides; switching (setgroups, setgid, setuid in the child) is
//! [`crate::guest::exec`]'s.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The most of `/etc/passwd` or `/etc/group` that is read; real ones are a few KiB.
pub const MAX_DB_BYTES: u64 = 4 * 1024 * 1024;
/// The most supplementary groups a command gets (the kernel's `NGROUPS_MAX`).
pub const MAX_GROUPS: usize = 65536;

/// A resolved user: what the child switches to before it runs the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// Every group for `setgroups`, the primary one first.
    pub groups: Vec<u32>,
    /// The home directory from `/etc/passwd`; `None` for a uid without an entry.
    pub home: Option<String>,
    /// The login shell from `/etc/passwd`, when it names one.
    pub shell: Option<String>,
}

impl Identity {
    /// `HOME` for the command: the passwd entry's, else `/` (what container runtimes give a
    /// uid without an entry).
    pub fn home_or_root(&self) -> &str {
        self.home.as_deref().unwrap_or("/")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("cannot run as user {spec:?}: user {user:?} is not in {}", path.display())]
    UnknownUser {
        spec: String,
        user: String,
        path: PathBuf,
    },
    #[error("cannot run as user {spec:?}: group {group:?} is not in {}", path.display())]
    UnknownGroup {
        spec: String,
        group: String,
        path: PathBuf,
    },
    #[error("cannot run as user {spec:?}: {id} cannot be used as a user or group id")]
    InvalidId { spec: String, id: u32 },
    #[error("cannot run as user {spec:?}: the user part is empty")]
    Empty { spec: String },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One usable line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One usable line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves `spec` against `etc/passwd` and `etc/group`.
pub fn resolve(spec: &str, etc: &Path) -> Result<Identity, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err(UserError::Empty {
            spec: spec.to_string(),
        });
    }
    let passwd_path = etc.join("passwd");
    let users = parse_passwd(&read_db(&passwd_path)?);
    let user_num = numeric(user);
    let entry = users
        .into_iter()
        .find(|e| e.name == user || Some(e.uid) == user_num);
    let check = |id: u32| {
        // -1 means "leave unchanged" to setuid/setgid/chown.
        if id == u32::MAX {
            Err(UserError::InvalidId {
                spec: spec.to_string(),
                id,
            })
        } else {
            Ok(id)
        }
    };
    let (uid, mut gid) = match (&entry, user_num) {
        (Some(e), _) => (e.uid, e.gid),
        (None, Some(uid)) => (check(uid)?, 0),
        (None, None) => {
            return Err(UserError::UnknownUser {
                spec: spec.to_string(),
                user: user.to_string(),
                path: passwd_path,
            })
        }
    };

    let group_path = etc.join("group");
    // A missing or unreadable group file only matters when a group is named.
    let groups_db = match read_db(&group_path) {
        Ok(bytes) => parse_group(&bytes),
        Err(e) if group.is_some_and(|g| numeric(g).is_none()) => return Err(e),
        Err(_) => Vec::new(),
    };
    let groups = match group {
        Some(g) => {
            let g_num = numeric(g);
            gid = match groups_db
                .iter()
                .find(|e| e.name == g || Some(e.gid) == g_num)
            {
                Some(e) => e.gid,
                None => match g_num {
                    Some(n) => check(n)?,
                    None => {
                        return Err(UserError::UnknownGroup {
                            spec: spec.to_string(),
                            group: g.to_string(),
                            path: group_path,
                        })
                    }
                },
            };
            // An explicit group is the only one, as with `docker run --user u:g`.
            vec![gid]
        }
        None => {
            let mut all = vec![gid];
            let mut seen = std::collections::HashSet::from([gid]);
            if let Some(e) = &entry {
                for g in &groups_db {
                    if all.len() >= MAX_GROUPS {
                        break;
                    }
                    if g.members.contains(&e.name) && seen.insert(g.gid) {
                        all.push(g.gid);
                    }
                }
            }
            all
        }
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        home: entry.as_ref().map(|e| e.home.clone()),
        shell: entry
            .as_ref()
            .map(|e| e.shell.clone())
            .filter(|s| !s.is_empty()),
    })
}

/// The passwd entry of `uid`, if the file is readable and has one (used for the login shell
/// of a command that names no user).
pub fn entry_for_uid(uid: u32, etc: &Path) -> Option<PasswdEntry> {
    let bytes = read_db(&etc.join("passwd")).ok()?;
    parse_passwd(&bytes).into_iter().find(|e| e.uid == uid)
}

/// The gid of the `tty` group, which owns terminal devices, if the image has one.
pub fn tty_group(etc: &Path) -> Option<u32> {
    let bytes = read_db(&etc.join("group")).ok()?;
    parse_group(&bytes)
        .into_iter()
        .find(|g| g.name == "tty")
        .map(|g| g.gid)
}

/// Reads a user database: a regular file, at most [`MAX_DB_BYTES`] of it. A missing file
/// reads as empty (images without `/etc/passwd` exist; numeric users still work there).
fn read_db(path: &Path) -> Result<Vec<u8>, UserError> {
    let err = |source| UserError::Read {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK: opening a FIFO planted as /etc/passwd must not block the agent.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    let meta = file.metadata().map_err(err)?;
    if !meta.is_file() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        )));
    }
    let mut bytes = Vec::new();
    File::take(file, MAX_DB_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_DB_BYTES {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_DB_BYTES} bytes"),
        )));
    }
    Ok(bytes)
}

/// A decimal id as `/etc/passwd` writes it (no sign, no spaces); `None` for anything else.
fn numeric(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The usable lines of a database: UTF-8, not blank, not a comment or NIS entry, split on `:`.
fn records(bytes: &[u8]) -> impl Iterator<Item = Vec<&str>> {
    bytes.split(|b| *b == b'\n').filter_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() || line.starts_with(['#', '+', '-']) {
            return None;
        }
        Some(line.split(':').collect())
    })
}

fn parse_passwd(bytes: &[u8]) -> Vec<PasswdEntry> {
    records(bytes)
        .filter_map(|f| {
            let [name, _pw, uid, gid, _gecos, home, shell] = f.as_slice() else {
                return None;
            };
            let (uid, gid) = (numeric(uid)?, numeric(gid)?);
            if name.is_empty() || uid == u32::MAX || gid == u32::MAX {
                return None;
            }
            Some(PasswdEntry {
                name: name.to_string(),
                uid,
                gid,
                home: home.to_string(),
                shell: shell.to_string(),
            })
        })
        .collect()
}

fn parse_group(bytes: &[u8]) -> Vec<GroupEntry> {
    records(bytes)
        .filter_map(|f| {
            let [name, _pw, gid, members] = f.as_slice() else {
                return None;
            };
            let gid = numeric(gid)?;
            if name.is_empty() || gid == u32::MAX {
                return None;
            }
            Some(GroupEntry {
                name: name.to_string(),
                gid,
                members: members
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/ash
# a comment:x:5:5::/:/bin/sh
+nis:x:6:6::/:/bin/sh
broken line
short:x:7:7
badnum:x:-1:7::/:/bin/sh
huge:x:99999999999:7::/:/bin/sh
minus-one:x:4294967295:7::/:/bin/sh
app:x:1234:2345:App User:/home/app:/bin/sh
nosh:x:1500:1500::/srv/nosh:
";
    const GROUP: &str = "\
root:x:0:root
staff:x:3456:app,other
wheel:x:10:root,app
app:x:2345:
dup:x:3456:app
bad:x:notanumber:app
";

    fn etc(passwd: &[u8], group: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("group"), group).unwrap();
        dir
    }

    fn id(uid: u32, gid: u32, groups: &[u32], home: Option<&str>) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.map(str::to_string),
            shell: None,
        }
    }

    #[test]
    fn a_name_takes_its_entry_and_the_groups_it_is_a_member_of() {
        let dir = etc(PASSWD.as_bytes(), GROUP.as_bytes());
        let got = resolve("app", dir.path()).unwrap();
        assert_eq!(
            got,
            Identity {
                shell: Some("/bin/sh".into()),
                ..id(1234, 2345, &[2345, 3456, 10], Some("/home/app"))
            }
        );
        // By uid, the same entry.
        assert_eq!(resolve("1234", dir.path()).unwrap(), got);
        assert_eq!(resolve("nosh", dir.path()).unwrap().shell, None);
    }

    #[test]
    fn an_explicit_group_by_name_or_number_is_the_only_group() {
        let dir = etc(PASSWD.as_bytes(), GROUP.as_bytes());
        let staff = resolve("app:staff", dir.path()).unwrap();
        assert_eq!(
            (staff.uid, staff.gid, staff.groups),
            (1234, 3456, vec![3456])
        );
        let numeric = resolve("1234:77", dir.path()).unwrap();
        assert_eq!((numeric.gid, numeric.groups), (77, vec![77]));
        let named = resolve("4321:wheel", dir.path()).unwrap();
        assert_eq!((named.uid, named.gid), (4321, 10));
    }

    #[test]
    fn a_numeric_uid_without_an_entry_gets_gid_0_and_home_slash() {
        let dir = etc(PASSWD.as_bytes(), GROUP.as_bytes());
        let got = resolve("4321", dir.path()).unwrap();
        assert_eq!(got, id(4321, 0, &[0], None));
        assert_eq!(got.home_or_root(), "/");
        assert_eq!(
            resolve("4321:5432", dir.path()).unwrap(),
            id(4321, 5432, &[5432], None)
        );
        // No passwd or group file at all: numbers still work.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve("10:20", empty.path()).unwrap(),
            id(10, 20, &[20], None)
        );
    }

    #[test]
    fn unknown_names_say_which_user_or_group_and_which_file() {
        let dir = etc(PASSWD.as_bytes(), GROUP.as_bytes());
        let err = resolve("bob", dir.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "cannot run as user \"bob\": user \"bob\" is not in {}/passwd",
                dir.path().display()
            )
        );
        let err = resolve("app:nogroup", dir.path()).unwrap_err().to_string();
        assert!(err.contains("group \"nogroup\" is not in"), "{err}");
        assert!(err.ends_with("/group"), "{err}");
        assert!(matches!(
            resolve(":staff", dir.path()),
            Err(UserError::Empty { .. })
        ));
    }

    #[test]
    fn hostile_lines_are_skipped_not_trusted() {
        let dir = etc(PASSWD.as_bytes(), GROUP.as_bytes());
        for name in [
            "# a comment",
            "+nis",
            "short",
            "badnum",
            "huge",
            "minus-one",
        ] {
            assert!(
                matches!(
                    resolve(name, dir.path()),
                    Err(UserError::UnknownUser { .. })
                ),
                "{name} resolved"
            );
        }
        // The ids -1 and out-of-range ones cannot be asked for by number either.
        assert!(matches!(
            resolve("4294967295", dir.path()),
            Err(UserError::InvalidId { .. })
        ));
        assert!(resolve("99999999999", dir.path()).is_err());
        assert!(resolve("1:4294967295", dir.path()).is_err());
        // Invalid UTF-8 and NUL bytes on one line do not hide the next one.
        let mut passwd = b"\xff\xfe:x:1:1::/:/bin/sh\nzero\0:x:2:2::/:/bin/sh\n".to_vec();
        passwd.extend_from_slice(b"ok:x:3:3::/home/ok:/bin/sh\r\n");
        let dir = etc(&passwd, b"");
        assert_eq!(resolve("ok", dir.path()).unwrap().home.unwrap(), "/home/ok");
    }

    #[test]
    fn an_oversized_or_special_database_is_refused_with_its_path() {
        let mut big = PASSWD.as_bytes().to_vec();
        big.resize(MAX_DB_BYTES as usize + 1, b'x');
        let dir = etc(&big, b"");
        let err = resolve("app", dir.path()).unwrap_err();
        assert!(
            crate::guest::serve::report(&err).contains("larger than"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(
            &dir.path().join("passwd"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let err = resolve("app", dir.path()).unwrap_err();
        assert_eq!(
            crate::guest::serve::report(&err),
            format!(
                "cannot read {}/passwd: not a regular file",
                dir.path().display()
            )
        );
    }

    #[test]
    fn a_huge_member_list_is_bounded() {
        let mut group = String::new();
        for g in 0..(MAX_GROUPS + 10) {
            group.push_str(&format!("g{g}:x:{}:other,app\n", g + 10_000));
        }
        let dir = etc(PASSWD.as_bytes(), group.as_bytes());
        assert_eq!(resolve("app", dir.path()).unwrap().groups.len(), MAX_GROUPS);
    }

    #[test]
    fn the_tty_group_and_entries_by_uid_are_found() {
        let dir = etc(PASSWD.as_bytes(), b"tty:x:5:\n");
        assert_eq!(tty_group(dir.path()), Some(5));
        assert_eq!(entry_for_uid(0, dir.path()).unwrap().shell, "/bin/ash");
        assert_eq!(tty_group(tempfile::tempdir().unwrap().path()), None);
    }
}
