//! The OCI registry client and blob cache against a real `docker-registry` on 127.0.0.1, with
//! images made here and pushed with `skopeo`, and loopback proxies that lie, cut or redirect.
//! Needs the Debian packages docker-registry, skopeo, apache2-utils (htpasswd) and openssl; fails
//! with the package to install when one is missing. No traffic leaves loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod registry_util;

use banger_image::digest::Sha256Digest;
use banger_image::download::DownloadError;
use banger_image::oci::cache::{fetch_layers, BlobCache};
use banger_image::oci::client::{OciError, RegistryOptions};
use banger_image::oci::manifest::{current_digest, resolve, Compression};
use banger_image::oci::reference::Reference;
use banger_image::progress::RecordingProgress;
use registry_util::*;
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The error as the daemon shows it: the chain, then each hint on a `hint:` line.
fn report(e: &(dyn Error + 'static)) -> String {
    banger_hint::Report::new(e, &[banger_image::HINTS]).to_string()
}

fn sample_layers() -> Vec<Layer> {
    vec![
        Layer::new(
            &[
                ("etc/os-release", b"ID=banger-test\n".to_vec()),
                ("bin/big", noise(300_000, 1)),
            ],
            Comp::Gzip,
        ),
        Layer::new(&[("usr/share/z", noise(200_000, 2))], Comp::Zstd),
        Layer::new(&[("etc/motd", b"hello\n".to_vec())], Comp::None),
    ]
}

fn sample_config() -> serde_json::Value {
    serde_json::json!({
        "Env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
        "WorkingDir": "/work",
        "User": "1000:1000",
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hi"],
    })
}

/// An image in a fresh layout, tagged `v1`.
fn sample_image() -> (Layout, Vec<Layer>, Built) {
    let mut layout = Layout::new();
    let layers = sample_layers();
    let refs: Vec<&Layer> = layers.iter().collect();
    let built = layout.image("amd64", &refs, sample_config());
    layout.tag("v1", OCI_MANIFEST, &built.manifest);
    (layout, layers, built)
}

fn reference(host: &str, rest: &str) -> Reference {
    Reference::parse(&format!("{host}/{rest}")).unwrap()
}

fn digest(oci: &str) -> Sha256Digest {
    Sha256Digest::parse_oci(oci).unwrap()
}

fn options() -> RegistryOptions {
    RegistryOptions {
        user_agent: "banger-test".into(),
        ..Default::default()
    }
}

fn assert_layers_cached(cache: &BlobCache, layers: &[Layer]) {
    for l in layers {
        let path = cache.blob_path(&digest(&l.digest()));
        assert_eq!(std::fs::read(&path).unwrap(), l.blob, "{}", path.display());
        assert!(!cache.partial_path(&digest(&l.digest())).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_pull_resolves_and_caches_gzip_zstd_and_plain_layers() {
    let storage = tempfile::tempdir().unwrap();
    let registry = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
    let (layout, layers, built) = sample_image();
    let pushed = layout.push("v1", &registry.host(), "team/app", false);
    assert_eq!(
        pushed,
        oci_digest(&built.manifest),
        "skopeo kept the digests"
    );

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path().join("oci"));
    let r = reference(&registry.host(), "team/app:v1");
    let rec = RecordingProgress::new();
    let img = resolve(&r, &options(), &cache, &rec).await.unwrap();
    assert_eq!(img.reference, r);
    assert_eq!(img.manifest_digest.oci(), oci_digest(&built.manifest));
    assert_eq!(img.config_digest.oci(), oci_digest(&built.config));
    assert_eq!(img.config.env, ["PATH=/usr/bin:/bin", "GREETING=hi"]);
    assert_eq!(img.config.working_dir.as_deref(), Some("/work"));
    assert_eq!(img.config.user.as_deref(), Some("1000:1000"));
    assert_eq!(img.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(img.config.cmd, ["echo hi"]);
    let got: Vec<(String, u64, Compression, String)> = img
        .layers
        .iter()
        .map(|l| (l.digest.oci(), l.size, l.compression, l.diff_id.oci()))
        .collect();
    let want: Vec<(String, u64, Compression, String)> = layers
        .iter()
        .zip([Compression::Gzip, Compression::Zstd, Compression::None])
        .map(|(l, c)| (l.digest(), l.blob.len() as u64, c, l.diff_id()))
        .collect();
    assert_eq!(got, want);
    // The config is in the cache, verified; layers are not yet.
    assert_eq!(
        std::fs::read(cache.blob_path(&img.config_digest)).unwrap(),
        built.config
    );
    assert!(!cache.blob_path(&img.layers[0].digest).exists());

    let rec = RecordingProgress::new();
    fetch_layers(&img, &options(), &cache, &rec).await.unwrap();
    assert_layers_cached(&cache, &layers);
    for l in &layers {
        let size = l.blob.len() as u64;
        assert_eq!(
            rec.item_reports(&l.digest()).last(),
            Some(&(size, Some(size)))
        );
    }
    let total: u64 = layers.iter().map(|l| l.blob.len() as u64).sum();
    let last_bytes = rec.events().into_iter().rev().find_map(|e| match e {
        banger_image::progress::Event::Bytes { done, total } => Some((done, total)),
        _ => None,
    });
    assert_eq!(
        last_bytes,
        Some((total, Some(total))),
        "the sum over all layers"
    );

    // Everything cached: a second fetch reports each layer complete at once.
    let rec = RecordingProgress::new();
    fetch_layers(&img, &options(), &cache, &rec).await.unwrap();
    assert_eq!(rec.item_reports(&layers[0].digest()).len(), 1);

    assert_eq!(
        current_digest(&r, &options()).await.unwrap(),
        img.manifest_digest
    );

    // Prune with the image's blobs kept frees nothing; with nothing kept frees them all.
    let mut keep: std::collections::HashSet<Sha256Digest> =
        img.layers.iter().map(|l| l.digest).collect();
    keep.insert(img.config_digest);
    assert_eq!(cache.prune(&keep).await.unwrap(), 0);
    let freed = cache.prune(&Default::default()).await.unwrap();
    assert_eq!(freed, total + built.config.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_picks_linux_amd64_and_pull_by_digest_works() {
    let storage = tempfile::tempdir().unwrap();
    let registry = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
    let mut layout = Layout::new();
    let amd = Layer::new(&[("arch", b"amd64".to_vec())], Comp::Gzip);
    let arm = Layer::new(&[("arch", b"arm64".to_vec())], Comp::Gzip);
    let amd_img = layout.image("amd64", &[&amd], serde_json::Value::Null);
    let arm_img = layout.image("arm64", &[&arm], serde_json::Value::Null);
    let index = layout.index(&[
        ("linux", "arm64", &arm_img.manifest),
        ("linux", "amd64", &amd_img.manifest),
    ]);
    layout.tag("multi", OCI_INDEX, &index);
    let pushed = layout.push("multi", &registry.host(), "multi/app", false);
    assert_eq!(pushed, oci_digest(&index));

    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let by_tag = reference(&registry.host(), "multi/app:multi");
    let img = resolve(&by_tag, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_eq!(img.manifest_digest.oci(), oci_digest(&amd_img.manifest));
    assert_eq!(img.layers.len(), 1);
    assert_eq!(img.layers[0].digest.oci(), amd.digest());
    assert_eq!(img.config, Default::default());
    fetch_layers(&img, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_layers_cached(&cache, std::slice::from_ref(&amd));
    assert!(
        !cache.blob_path(&digest(&arm.digest())).exists(),
        "arm64 is never fetched"
    );

    // current_digest names the platform manifest without fetching it.
    assert_eq!(
        current_digest(&by_tag, &options()).await.unwrap(),
        img.manifest_digest
    );

    // Pinned to the index's digest, and to the platform manifest's.
    for pin in [oci_digest(&index), oci_digest(&amd_img.manifest)] {
        let r = reference(&registry.host(), &format!("multi/app@{pin}"));
        let pinned = resolve(&r, &options(), &cache, &RecordingProgress::new())
            .await
            .unwrap();
        assert_eq!(pinned.manifest_digest, img.manifest_digest);
        assert_eq!(pinned.reference.tag(), None);
    }
    // A digest the registry does not have.
    let r = reference(
        &registry.host(),
        &format!("multi/app@{}", oci_digest(b"nothing")),
    );
    let err = resolve(&r, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_without_amd64_lists_the_platforms_offered() {
    let storage = tempfile::tempdir().unwrap();
    let registry = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
    let mut layout = Layout::new();
    let arm = Layer::new(&[("arch", b"arm64".to_vec())], Comp::Zstd);
    let arm_img = layout.image("arm64", &[&arm], serde_json::Value::Null);
    let index = layout.index(&[("linux", "arm64", &arm_img.manifest)]);
    layout.tag("arm", OCI_INDEX, &index);
    layout.push("arm", &registry.host(), "only/arm", false);
    let cache_dir = tempfile::tempdir().unwrap();
    let r = reference(&registry.host(), "only/arm:arm");
    let err = resolve(
        &r,
        &options(),
        &BlobCache::new(cache_dir.path()),
        &RecordingProgress::new(),
    )
    .await
    .unwrap_err();
    let msg = report(&err);
    assert!(msg.contains(&format!("cannot use image {r}")), "{msg}");
    assert!(
        msg.contains("no linux/amd64 image in it; it offers linux/arm64\nhint:"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_v2_manifests_pull_like_oci_ones() {
    let storage = tempfile::tempdir().unwrap();
    let registry = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
    let mut layout = Layout::new();
    let layer = Layer::new(&[("docker", b"v2".to_vec())], Comp::Gzip);
    let built = layout.image("amd64", &[&layer], sample_config());
    layout.tag("d", OCI_MANIFEST, &built.manifest);
    let pushed = layout.push("d", &registry.host(), "docker/app", true);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let r = reference(&registry.host(), "docker/app:d");
    let img = resolve(&r, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_eq!(
        img.manifest_digest.oci(),
        pushed,
        "the converted manifest's digest"
    );
    assert_ne!(
        pushed,
        oci_digest(&built.manifest),
        "skopeo converted it to Docker v2"
    );
    assert_eq!(img.layers[0].compression, Compression::Gzip);
    assert_eq!(img.layers[0].digest.oci(), layer.digest());
    assert_eq!(img.config.env, ["PATH=/usr/bin:/bin", "GREETING=hi"]);
    fetch_layers(&img, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_layers_cached(&cache, std::slice::from_ref(&layer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_is_not_found_with_a_hint() {
    let storage = tempfile::tempdir().unwrap();
    let registry = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
    let cache_dir = tempfile::tempdir().unwrap();
    let r = reference(&registry.host(), "nobody/here:1");
    let err = resolve(
        &r,
        &options(),
        &BlobCache::new(cache_dir.path()),
        &RecordingProgress::new(),
    )
    .await
    .unwrap_err();
    let msg = report(&err);
    assert!(err.is_not_found(), "{msg}");
    assert!(msg.contains(&r.to_string()) && msg.contains("404"), "{msg}");
    assert!(
        msg.contains("\nhint: check the image name and tag"),
        "{msg}"
    );
    assert!(!msg.contains("docker login"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_uses_the_docker_config_and_a_wrong_password_gets_the_login_hint() {
    let storage = tempfile::tempdir().unwrap();
    let (layout, layers, built) = sample_image();
    {
        let anon = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
        layout.push("v1", &anon.host(), "private/app", false);
    }
    let registry = Registry::start(
        storage.path(),
        RegistryAuth::Htpasswd {
            user: "alice".into(),
            password: "s3cret-pw".into(),
        },
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let r = reference(&registry.host(), "private/app:v1");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());

    // Anonymous: 401 with the login hint.
    let err = resolve(&r, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap_err();
    let msg = report(&err);
    assert!(err.is_unauthorized(), "{msg}");
    assert!(
        msg.contains(&format!("hint: run `docker login {}`", registry.host())),
        "{msg}"
    );

    // The right password from config.json.
    let opts = RegistryOptions {
        docker_config: Some(docker_config(
            home.path(),
            &registry.host(),
            "alice",
            "s3cret-pw",
        )),
        ..options()
    };
    let img = resolve(&r, &opts, &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_eq!(img.manifest_digest.oci(), oci_digest(&built.manifest));
    fetch_layers(&img, &opts, &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_layers_cached(&cache, &layers);
    assert_eq!(
        current_digest(&r, &opts).await.unwrap(),
        img.manifest_digest
    );

    // A wrong one: refused, with a hint to log in again, and no secret in the message.
    let opts = RegistryOptions {
        docker_config: Some(docker_config(
            home.path(),
            &registry.host(),
            "alice",
            "wrong-pw",
        )),
        ..options()
    };
    let err = current_digest(&r, &opts).await.unwrap_err();
    let msg = format!("{} {err:?}", report(&err));
    assert!(err.is_unauthorized(), "{msg}");
    assert!(
        msg.contains("refused the credentials") && msg.contains("docker login"),
        "{msg}"
    );
    assert!(
        !msg.contains("wrong-pw") && !msg.contains("s3cret"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_from_the_realm_with_basic_credentials() {
    let storage = tempfile::tempdir().unwrap();
    let (layout, layers, built) = sample_image();
    {
        let anon = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
        layout.push("v1", &anon.host(), "tok/app", false);
    }
    let signer = Signer::new();
    let (issuer, service) = ("banger-test-issuer", "banger-test-registry");
    let token = signer.token(issuer, service, "tok/app");
    let tokens = token_service(token.clone(), Some(basic_header("bob", "hunter22"))).await;
    let registry = Registry::start(
        storage.path(),
        RegistryAuth::Token {
            realm: format!("http://{}/token", tokens.host()),
            service: service.into(),
            issuer: issuer.into(),
            cert: signer.cert.clone(),
        },
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let opts = RegistryOptions {
        docker_config: Some(docker_config(
            home.path(),
            &registry.host(),
            "bob",
            "hunter22",
        )),
        ..options()
    };
    let r = reference(&registry.host(), "tok/app:v1");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let img = resolve(&r, &opts, &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_eq!(img.manifest_digest.oci(), oci_digest(&built.manifest));
    fetch_layers(&img, &opts, &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_layers_cached(&cache, &layers);
    let seen = tokens.requests();
    assert!(!seen.is_empty());
    for req in &seen {
        assert!(
            req.path.contains(&format!("service={service}"))
                && req.path.contains("scope=repository%3Atok%2Fapp%3Apull"),
            "{}",
            req.path
        );
        assert_eq!(
            req.header("authorization"),
            Some(basic_header("bob", "hunter22").as_str())
        );
    }

    // Without credentials the token service says no: a 401 with the login hint.
    let err = resolve(&r, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap_err();
    assert!(err.is_unauthorized(), "{err}");
    assert!(report(&err).contains("docker login"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_realm_elsewhere_is_refused_without_contacting_it() {
    let fake = bearer_challenger("http://198.51.100.7/token").await;
    let home = tempfile::tempdir().unwrap();
    let opts = RegistryOptions {
        docker_config: Some(docker_config(home.path(), &fake.host(), "u", "topsecret")),
        ..options()
    };
    let r = reference(&fake.host(), "x/y:1");
    let err = current_digest(&r, &opts).await.unwrap_err();
    let msg = report(&err);
    assert!(matches!(err, OciError::InsecureRealm { .. }), "{msg}");
    assert!(
        msg.contains("http://198.51.100.7/token") && msg.contains("hint:"),
        "{msg}"
    );
    assert_eq!(
        fake.requests().len(),
        1,
        "one anonymous request, nothing else"
    );
    assert_eq!(fake.requests()[0].header("authorization"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_does_not_match_its_pinned_digest_is_refused() {
    let (_layout, _layers, built) = sample_image();
    let fake = fixed(
        "200 OK",
        vec![("Content-Type".into(), OCI_MANIFEST.into())],
        built.manifest.clone(),
    )
    .await;
    let pin = oci_digest(b"some other manifest");
    let r = reference(&fake.host(), &format!("x/y@{pin}"));
    let err = current_digest(&r, &options()).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OciError::ManifestDigest { .. }), "{msg}");
    assert!(
        msg.contains(&pin) && msg.contains(&oci_digest(&built.manifest)),
        "{msg}"
    );
}

/// Pushes the sample image and puts a fault proxy in front of the registry.
async fn behind_proxy(
    storage: &std::path::Path,
) -> (Registry, Server, Arc<Mutex<Faults>>, Vec<Layer>) {
    let registry = Registry::start(storage, RegistryAuth::Anonymous).await;
    let (layout, layers, _) = sample_image();
    layout.push("v1", &registry.host(), "proxied/app", false);
    let faults = Arc::new(Mutex::new(Faults::default()));
    let proxy = proxy(registry.host(), faults.clone()).await;
    (registry, proxy, faults, layers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_layer_is_refused_and_nothing_is_kept() {
    let storage = tempfile::tempdir().unwrap();
    let (_registry, proxy, faults, layers) = behind_proxy(storage.path()).await;
    let victim = layers[0].digest();
    faults.lock().unwrap().flip.insert(victim.clone(), 12_345);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let r = reference(&proxy.host(), "proxied/app:v1");
    let img = resolve(&r, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    let err = fetch_layers(&img, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            OciError::Download(DownloadError::DigestMismatch { .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&victim["sha256:".len()..]),
        "names the blob: {msg}"
    );
    let d = digest(&victim);
    assert!(
        !cache.blob_path(&d).exists(),
        "no corrupt blob in the cache"
    );
    assert!(
        !cache.partial_path(&d).exists(),
        "no corrupt partial either"
    );
    // Once the proxy stops lying, the pull completes.
    faults.lock().unwrap().flip.clear();
    fetch_layers(&img, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_layers_cached(&cache, &layers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_with_a_range_request() {
    let storage = tempfile::tempdir().unwrap();
    let (_registry, proxy, faults, layers) = behind_proxy(storage.path()).await;
    let victim = layers[0].digest();
    faults
        .lock()
        .unwrap()
        .cut_once
        .insert(victim.clone(), 100_000);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let r = reference(&proxy.host(), "proxied/app:v1");
    let img = resolve(&r, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    let err = fetch_layers(&img, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OciError::Download(DownloadError::Truncated { got: 100_000, .. })
        ),
        "{err}"
    );
    assert!(
        report(&err).contains("\nhint: run the command again to resume"),
        "{err}"
    );
    let d = digest(&victim);
    assert_eq!(
        std::fs::metadata(cache.partial_path(&d)).unwrap().len(),
        100_000
    );

    let rec = RecordingProgress::new();
    fetch_layers(&img, &options(), &cache, &rec).await.unwrap();
    assert_layers_cached(&cache, &layers);
    let ranges: Vec<Option<String>> = proxy
        .requests()
        .iter()
        .filter(|q| q.path.ends_with(&format!("/blobs/{victim}")))
        .map(|q| q.header("range").map(str::to_owned))
        .collect();
    assert_eq!(ranges, [None, Some("bytes=100000-".to_string())]);
    assert!(
        rec.logs()
            .iter()
            .any(|l| l.contains("resuming") && l.contains("at byte 100000")),
        "{:?}",
        rec.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_manifest_is_cut_at_the_cap_quickly() {
    use tokio::io::AsyncWriteExt;
    // Streams up to 1 GiB without a length, counting what it managed to send.
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = sent.clone();
    let endless = Server::start(handler(move |_req, mut conn: tokio::net::TcpStream| {
        let counter = counter.clone();
        async move {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {OCI_MANIFEST}\r\nConnection: close\r\n\r\n"
            );
            if conn.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b' '; 64 << 10];
            for _ in 0..(1u64 << 30) / chunk.len() as u64 {
                if conn.write_all(&chunk).await.is_err() {
                    return;
                }
                counter.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }))
    .await;
    let started = Instant::now();
    let err = current_digest(&reference(&endless.host(), "big/one:1"), &options())
        .await
        .unwrap_err();
    assert!(
        matches!(err, OciError::TooLarge { max, .. } if max == 4 << 20),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sent < 64 << 20, "the server got to send {sent} bytes");

    // A declared length over the cap is refused before reading.
    let declared = Server::start(handler(|_req, mut conn: tokio::net::TcpStream| {
        async move {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n{{");
            let _ = conn.write_all(head.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    }))
    .await;
    let started = Instant::now();
    let err = current_digest(&reference(&declared.host(), "big/two:1"), &options())
        .await
        .unwrap_err();
    assert!(matches!(err, OciError::TooLarge { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_redirect_to_another_port_drops_authorization() {
    let storage = tempfile::tempdir().unwrap();
    let (layout, layers, built) = sample_image();
    {
        let anon = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
        layout.push("v1", &anon.host(), "redir/app", false);
    }
    let registry = Registry::start(
        storage.path(),
        RegistryAuth::Htpasswd {
            user: "carol".into(),
            password: "pa55word".into(),
        },
    )
    .await;
    // Storage on another loopback port: serves the blobs (from the layers we made) to anyone.
    let mut blobs: std::collections::HashMap<String, Vec<u8>> = layers
        .iter()
        .map(|l| (l.digest(), l.blob.clone()))
        .collect();
    blobs.insert(oci_digest(&built.config), built.config.clone());
    let storage_server = Server::start(handler(move |req: Seen, mut conn| {
        let blobs = blobs.clone();
        async move {
            let d = req.path.rsplit('/').next().unwrap_or("").to_owned();
            match blobs.get(&d) {
                Some(b) => respond(&mut conn, "200 OK", &[], b).await,
                None => respond(&mut conn, "404 Not Found", &[], b"").await,
            }
        }
    }))
    .await;
    let faults = Arc::new(Mutex::new(Faults {
        redirect_blobs_to: Some(format!("http://{}", storage_server.host())),
        ..Default::default()
    }));
    let front = proxy(registry.host(), faults).await;
    let home = tempfile::tempdir().unwrap();
    let opts = RegistryOptions {
        docker_config: Some(docker_config(
            home.path(),
            &front.host(),
            "carol",
            "pa55word",
        )),
        ..options()
    };
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let r = reference(&front.host(), "redir/app:v1");
    let img = resolve(&r, &opts, &cache, &RecordingProgress::new())
        .await
        .unwrap();
    fetch_layers(&img, &opts, &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_layers_cached(&cache, &layers);
    let want = basic_header("carol", "pa55word");
    let front_blob_gets: Vec<Seen> = front
        .requests()
        .into_iter()
        .filter(|q| q.path.contains("/blobs/"))
        .collect();
    // The first blob GET of each client is anonymous and gets the registry's 401; every later
    // one carries the credentials and is redirected.
    for l in &layers {
        let d = l.digest();
        assert!(
            front_blob_gets
                .iter()
                .any(|q| q.path.ends_with(&d) && q.header("authorization") == Some(want.as_str())),
            "the registry got credentials for {d}"
        );
    }
    let at_storage = storage_server.requests();
    assert!(at_storage.len() >= layers.len(), "{at_storage:?}");
    for q in &at_storage {
        assert_eq!(
            q.header("authorization"),
            None,
            "credentials leaked to {}",
            q.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pulls_of_one_image_at_once_share_the_cache() {
    let storage = tempfile::tempdir().unwrap();
    let registry = Registry::start(storage.path(), RegistryAuth::Anonymous).await;
    let (layout, layers, _) = sample_image();
    layout.push("v1", &registry.host(), "twice/app", false);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let r = reference(&registry.host(), "twice/app:v1");
    let (opts, p1, p2) = (
        options(),
        RecordingProgress::new(),
        RecordingProgress::new(),
    );
    let (a, b) = tokio::join!(
        resolve(&r, &opts, &cache, &p1),
        resolve(&r, &opts, &cache, &p2)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b);
    let (x, y) = tokio::join!(
        fetch_layers(&a, &opts, &cache, &p1),
        fetch_layers(&b, &opts, &cache, &p2)
    );
    x.unwrap();
    y.unwrap();
    assert_layers_cached(&cache, &layers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_is_a_connection_error_with_a_hint() {
    // A port nothing listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = reference(&format!("127.0.0.1:{port}"), "x/y:1");
    let err = current_digest(&r, &options()).await.unwrap_err();
    let msg = report(&err);
    assert!(matches!(err, OciError::Transport { .. }), "{msg}");
    assert!(
        msg.contains(&format!("cannot reach registry 127.0.0.1:{port}"))
            && msg.contains("the connection failed")
            && msg.contains("\nhint: check the registry name"),
        "{msg}"
    );
}

/// An image pushed to a registry that wants `carol`'s password, with a proxy in front that
/// redirects her blob GETs to `storage_base`; returns the options holding her credentials.
async fn redirecting_registry(
    storage: &std::path::Path,
    home: &std::path::Path,
    storage_base: String,
) -> (Registry, Server, RegistryOptions) {
    let (layout, _, _) = sample_image();
    {
        let anon = Registry::start(storage, RegistryAuth::Anonymous).await;
        layout.push("v1", &anon.host(), "redir/app", false);
    }
    let registry = Registry::start(
        storage,
        RegistryAuth::Htpasswd {
            user: "carol".into(),
            password: "pa55word".into(),
        },
    )
    .await;
    let faults = Arc::new(Mutex::new(Faults {
        redirect_blobs_to: Some(storage_base),
        ..Default::default()
    }));
    let front = proxy(registry.host(), faults).await;
    let opts = RegistryOptions {
        docker_config: Some(docker_config(home, &front.host(), "carol", "pa55word")),
        ..options()
    };
    (registry, front, opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_where_a_blob_was_redirected_gets_no_credentials() {
    // The "storage" a blob is redirected to asks for a token from a realm of its choosing (on
    // the registry's own loopback host, which the realm rule alone would allow).
    let realm = token_service("stolen".into(), None).await;
    let storage_server = bearer_challenger(&format!("http://{}/token", realm.host())).await;
    let storage = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let (_registry, front, opts) = redirecting_registry(
        storage.path(),
        home.path(),
        format!("http://{}", storage_server.host()),
    )
    .await;
    let cache_dir = tempfile::tempdir().unwrap();
    let r = reference(&front.host(), "redir/app:v1");
    let err = resolve(
        &r,
        &opts,
        &BlobCache::new(cache_dir.path()),
        &RecordingProgress::new(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        realm.requests().is_empty(),
        "the storage host's realm was asked for a token: {:?}",
        realm.requests()
    );
    assert!(
        matches!(&err, OciError::Status { status, .. } if status.as_u16() == 401),
        "{msg}"
    );
    assert!(
        !err.is_unauthorized() && !msg.contains("docker login"),
        "{msg}"
    );
    assert!(
        msg.contains(&storage_server.host()) && msg.contains("redirect"),
        "{msg}"
    );
    for q in storage_server.requests() {
        assert_eq!(
            q.header("authorization"),
            None,
            "credentials leaked to storage"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_realm_on_another_loopback_host_is_refused() {
    let realm = token_service_on("127.0.0.2", "t".into(), None).await;
    let fake = bearer_challenger(&format!("http://{}/token", realm.host())).await;
    let home = tempfile::tempdir().unwrap();
    let opts = RegistryOptions {
        docker_config: Some(docker_config(home.path(), &fake.host(), "u", "topsecret")),
        ..options()
    };
    let err = current_digest(&reference(&fake.host(), "x/y:1"), &opts)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OciError::InsecureRealm { .. }), "{msg}");
    assert!(msg.contains(&realm.host()), "{msg}");
    assert!(realm.requests().is_empty(), "{:?}", realm.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_plain_http_on_another_loopback_host_is_refused() {
    let elsewhere = fixed_on("127.0.0.2", "200 OK", vec![], b"{}".to_vec()).await;
    let fake = fixed(
        "307 Temporary Redirect",
        vec![(
            "Location".into(),
            format!("http://{}/v2/x/y/manifests/1", elsewhere.host()),
        )],
        b"".to_vec(),
    )
    .await;
    let err = current_digest(&reference(&fake.host(), "x/y:1"), &options())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, OciError::Transport { .. }), "{msg}");
    assert!(msg.contains("a redirect was refused"), "{msg}");
    assert!(
        elsewhere.requests().is_empty(),
        "{:?}",
        elsewhere.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_download_that_fills_the_disk_is_disk_full_and_leaves_no_partial() {
    let storage = tempfile::tempdir().unwrap();
    let (_registry, proxy, _faults, layers) = behind_proxy(storage.path()).await;
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = BlobCache::new(cache_dir.path());
    let r = reference(&proxy.host(), "proxied/app:v1");
    let img = resolve(&r, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    // The first layer's partial is /dev/full: every write fails with ENOSPC.
    let victim = digest(&layers[0].digest());
    let part = cache.partial_path(&victim);
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();
    let err = fetch_layers(&img, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(err.is_disk_full(), "{msg}");
    assert!(
        msg.contains("no space left") && msg.contains(&victim.to_string()),
        "{msg}"
    );
    assert!(
        std::fs::symlink_metadata(&part).is_err(),
        "the partial stayed behind"
    );
    assert!(!cache.blob_path(&victim).exists());
    // With the disk "freed", the pull completes.
    fetch_layers(&img, &options(), &cache, &RecordingProgress::new())
        .await
        .unwrap();
    assert_layers_cached(&cache, &layers);
}
