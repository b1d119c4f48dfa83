//! The images service with real processes and mounts (these tests run as root): a build whose
//! client goes away is cancelled (its stand-in debootstrap and that one's child killed, the
//! /proc it mounted unmounted, its staging directory removed, its name free again), and the
//! start-up sweep unmounts and removes what an interrupted build left.

use super::*;
use banger_api::BuildImageRequest;
use banger_image::testproc::{
    alive, debootstrap_script, mount, mounted_under, pids_in, MountGuard, Reaper, StandIn,
};
use banger_image::HostPrivileged;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
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

#[tokio::test]
async fn a_build_whose_client_goes_away_is_cancelled_and_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    // Dropped in reverse: the processes are killed, then what they mounted goes.
    let _mounts = MountGuard(root.clone());
    let reaper = Reaper::new();
    let pids = root.join("pids");
    let runner = StandIn {
        host: HostPrivileged::detect().unwrap(),
        debootstrap: debootstrap_script(&root, &pids),
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

    let p = pids_in(&pids).await;
    reaper.add(&p);
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
}

#[tokio::test]
async fn the_start_up_sweep_unmounts_and_removes_what_an_interrupted_build_left() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let _mounts = MountGuard(root.clone());
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
}
