//! Setup step 4: the guest's resolver configuration, `/etc/resolv.conf`. A symlink there (to a
//! resolved or resolvconf stub) is replaced by a plain file, since banger's name server is the
//! only one the guest should use.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::guest::fsutil::write_atomic;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the resolver configuration")]
pub struct DnsError(#[source] io::Error);

/// Writes `etc/resolv.conf` with one `nameserver` line per server.
pub fn write_resolv_conf(etc: &Path, servers: &[Ipv4Addr]) -> Result<(), DnsError> {
    write_atomic(
        &etc.join("resolv.conf"),
        resolv_conf(servers).as_bytes(),
        0o644,
    )
    .map_err(DnsError)
}

fn resolv_conf(servers: &[Ipv4Addr]) -> String {
    let mut text = String::from("# Written by banger-agent at boot.\n");
    for s in servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stub_symlink_is_replaced_by_a_file_listing_the_servers() {
        let etc = tempfile::tempdir().unwrap();
        let stub = etc.path().join("stub-resolv.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\n").unwrap();
        std::os::unix::fs::symlink(&stub, etc.path().join("resolv.conf")).unwrap();
        write_resolv_conf(
            etc.path(),
            &[Ipv4Addr::new(172, 16, 0, 1), Ipv4Addr::new(9, 9, 9, 9)],
        )
        .unwrap();
        let path = etc.path().join("resolv.conf");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.ends_with("nameserver 172.16.0.1\nnameserver 9.9.9.9\n"),
            "{text}"
        );
        assert_eq!(
            std::fs::read_to_string(stub).unwrap(),
            "nameserver 127.0.0.53\n"
        );
    }

    #[test]
    fn a_dangling_symlink_is_replaced_and_its_target_never_created() {
        let etc = tempfile::tempdir().unwrap();
        let target = etc.path().join("run/resolved/stub-resolv.conf");
        std::os::unix::fs::symlink(&target, etc.path().join("resolv.conf")).unwrap();
        write_resolv_conf(etc.path(), &[Ipv4Addr::new(172, 16, 0, 1)]).unwrap();
        let path = etc.path().join("resolv.conf");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert!(std::fs::read_to_string(path)
            .unwrap()
            .contains("nameserver 172.16.0.1\n"));
        assert!(!target.exists() && !etc.path().join("run").exists());
    }

    #[test]
    fn a_missing_etc_is_an_error_naming_the_file() {
        let err = write_resolv_conf(Path::new("/nonexistent-etc"), &[]).unwrap_err();
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("/nonexistent-etc"), "{source}");
    }
}
