//! The images service with real processes and mounts (these tests run as root): a build whose
//! client goes away is cancelled (its stand-in debootstrap and that one's child killed, the
//! /proc it mounted unmounted, its staging directory removed, its name free again), and the
//! start-up sweep unmounts and removes what an interrupted build left.

use super::*;
use banger_api::BuildImageRequest;
use banger_image::privileged::PrivOutput;
use banger_image::{HostPrivileged, PrivCommand, PrivError};
use futures_util::future::BoxFuture;
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// The real runner, with debootstrap replaced by a stand-in script.
struct StandIn {
    host: HostPrivileged,
    debootstrap: PathBuf,
}

impl Privileged for StandIn {
    fn run_until<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>> {
        Box::pin(async move {
            if cmd.op == "debootstrap" {
                let mut c = cmd.clone();
                c.program = self.debootstrap.clone();
                self.host.run_until(&c, progress, cancel).await
            } else {
                self.host.run_until(cmd, progress, cancel).await
            }
        })
    }

    fn file_owner(&self) -> (u32, u32) {
        self.host.file_owner()
    }
}

/// A debootstrap that writes into the tree (its 6th argument), mounts a /proc there like the
/// real one, starts a child, records both pids in `pids` and waits.
fn stand_in(dir: &Path, pids: &Path) -> PathBuf {
    let script = dir.join("debootstrap");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntree=$6\nmkdir -p \"$tree/proc\" \"$tree/etc\"\n\
             echo x > \"$tree/etc/passwd\"\nmount -t tmpfs banger-test \"$tree/proc\"\n\
             sleep 1000 &\necho $$ $! > {p}.new\nmv {p}.new {p}\nwait\n",
            p = pids.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

fn mounted_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    banger_image::workdir::mounts_under(&info, dir)
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills a test's processes and unmounts what it mounted, even when it fails half-way.
struct Cleanup {
    pids: Mutex<Vec<i32>>,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &pid in self.pids.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if alive(pid) {
                // SAFETY: kill(2) has no memory effects; the pid is one this test saw start.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for point in mounted_under(&self.dir) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&point)
                .status();
        }
    }
}

fn images(dir: &Path, privileged: Option<Arc<dyn Privileged>>) -> Images {
    let paths = Paths {
        config_dir: dir.join("config"),
        state_dir: dir.join("state"),
        cache_dir: dir.join("cache"),
        runtime_dir: dir.join("run"),
    };
    std::fs::create_dir_all(&paths.state_dir).unwrap();
    let store = Store::open(&paths.database()).unwrap();
    let config = Config {
        // Never contacted: the stand-in does not download.
        debian_mirror: Some("http://127.0.0.1:9/debian".into()),
        ..Config::default()
    };
    let images = Images::new(
        paths,
        store,
        config,
        crate::image_locks::ImageLocks::default(),
    );
    match privileged {
        Some(p) => images.with_privileged(p),
        None => images,
    }
}

fn mount(args: &[&str], target: &Path) {
    let ok = std::process::Command::new("mount")
        .args(args)
        .arg(target)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount {args:?} {}", target.display());
}

#[tokio::test]
async fn a_build_whose_client_goes_away_is_cancelled_and_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let cleanup = Cleanup {
        pids: Mutex::new(Vec::new()),
        dir: root.clone(),
    };
    let pids = root.join("pids");
    let runner = StandIn {
        host: HostPrivileged::detect().unwrap(),
        debootstrap: stand_in(&root, &pids),
    };
    let images = Arc::new(images(&root, Some(Arc::new(runner))));
    // The daemon's build route, on a Unix socket of its own.
    let app = {
        let images = images.clone();
        axum::Router::new().route(
            "/build",
            axum::routing::post(
                move |axum::Json(req): axum::Json<BuildImageRequest>| async move {
                    crate::server::stream(move |e| async move { images.build(req, e).await })
                },
            ),
        )
    };
    let sock = root.join("api.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut client = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let body = serde_json::to_vec(&BuildImageRequest {
        recipe: "debian-bookworm-slim".into(),
        name: None,
        force: false,
    })
    .unwrap();
    let head = format!(
        "POST /build HTTP/1.1\r\nhost: banger\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&body).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let p: Vec<i32> = loop {
        if let Ok(s) = std::fs::read_to_string(&pids) {
            break s.split_whitespace().map(|p| p.parse().unwrap()).collect();
        }
        assert!(Instant::now() < deadline, "the stand-in never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cleanup.pids.lock().unwrap().extend_from_slice(&p);
    let tmp = root.join("state/tmp");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 1);
    assert_eq!(mounted_under(&tmp).len(), 1, "the stand-in's /proc");

    // The CLI is killed: its connection closes.
    drop(client);
    wait_until(
        "debootstrap and its child end",
        Duration::from_secs(5),
        || !p.iter().any(|&pid| alive(pid)),
    )
    .await;
    wait_until(
        "the staging directory is removed",
        Duration::from_secs(10),
        || std::fs::read_dir(&tmp).unwrap().count() == 0,
    )
    .await;
    assert!(mounted_under(&root).is_empty());
    wait_until("the name is free again", Duration::from_secs(5), || {
        images.reserve("debian-bookworm-slim").is_ok()
    })
    .await;
    assert!(images.list().await.unwrap().is_empty());
    server.abort();
    drop(cleanup);
}

#[tokio::test]
async fn the_start_up_sweep_unmounts_and_removes_what_an_interrupted_build_left() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let cleanup = Cleanup {
        pids: Mutex::new(Vec::new()),
        dir: root.clone(),
    };
    let images = images(&root, None);
    let tmp = root.join("state/tmp");
    let tree = tmp.join("op-build/tree");
    // What the bind mount shows stands for the host's /dev and must survive.
    let host_dev = root.join("host-dev");
    std::fs::create_dir_all(&host_dev).unwrap();
    std::fs::write(host_dev.join("null"), "precious").unwrap();
    for d in ["proc", "dev", "etc"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::write(tree.join("etc/shadow"), "root:*:").unwrap();
    mount(&["-t", "tmpfs", "banger-test", "--"], &tree.join("proc"));
    mount(
        &["--bind", "--", &host_dev.display().to_string()],
        &tree.join("dev"),
    );
    // A pull's staging and a stray file need no root.
    std::fs::create_dir_all(tmp.join("op-pull")).unwrap();
    std::fs::write(tmp.join("op-pull/rootfs.ext4.partial"), "x").unwrap();
    std::fs::write(tmp.join("stray"), "x").unwrap();

    images.sweep().await.unwrap();

    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "{:?}",
        std::fs::read_dir(&tmp).unwrap().collect::<Vec<_>>()
    );
    assert!(mounted_under(&root).is_empty());
    assert_eq!(
        std::fs::read_to_string(host_dev.join("null")).unwrap(),
        "precious"
    );
    drop(cleanup);
}
