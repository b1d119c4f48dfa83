//! Test parts for `tests/registry.rs`: a real `docker-registry` on 127.0.0.1 with its own config
//! (anonymous, htpasswd or token auth), OCI layouts written here and pushed with `skopeo`, a
//! token service signing JWTs with `openssl`, and small HTTP servers on loopback that proxy to
//! the registry with faults (flipped byte, cut transfer, redirect) or play a hostile registry.
//! Every process and server stops when its guard drops; every file lives in a temp dir.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// Fails (never skips) when a tool the tests need is missing.
pub fn require(tool: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("these tests need `{tool}`: install the Debian package `{package}` (apt-get install {package})");
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn oci_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------- registry

pub enum RegistryAuth {
    Anonymous,
    Htpasswd {
        user: String,
        password: String,
    },
    Token {
        realm: String,
        service: String,
        issuer: String,
        cert: PathBuf,
    },
}

/// A `docker-registry serve` process on 127.0.0.1, killed on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Starts a registry storing into `storage` (shared between instances, so an image can be
    /// pushed anonymously and then served with auth).
    pub async fn start(storage: &Path, auth: RegistryAuth) -> Registry {
        let bin = require("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let auth_yaml = match &auth {
            RegistryAuth::Anonymous => String::new(),
            RegistryAuth::Htpasswd { user, password } => {
                let out = Command::new(require("htpasswd", "apache2-utils"))
                    .args(["-nbB", user, password])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "htpasswd failed");
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, &out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                    file.display()
                )
            }
            RegistryAuth::Token {
                realm,
                service,
                issuer,
                cert,
            } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                cert.display()
            ),
        };
        for _attempt in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n\
                     http:\n  addr: 127.0.0.1:{port}\n  secret: banger-test-secret\n{auth_yaml}",
                    storage.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut child = child;
            if wait_ready(&mut child, port).await {
                return Registry { child, port, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
            eprintln!("registry on port {port} did not start (retrying): {log}");
        }
        panic!("docker-registry did not start; see the log lines above");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Waits until the registry answers `/v2/` (200 or 401), or it exits, or 20 s pass.
async fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = reqwest::Client::new();
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}/v2/"))
            .send()
            .await
        {
            if matches!(r.status().as_u16(), 200 | 401) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

// ---------------------------------------------------------------- images

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    Gzip,
    Zstd,
    None,
}

impl Comp {
    pub fn media_type(self) -> &'static str {
        match self {
            Comp::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Comp::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Comp::None => "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// A layer: tar of `files`, compressed.
pub struct Layer {
    pub tar: Vec<u8>,
    pub blob: Vec<u8>,
    pub comp: Comp,
}

impl Layer {
    pub fn new(files: &[(&str, Vec<u8>)], comp: Comp) -> Layer {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let blob = match comp {
            Comp::None => tar.clone(),
            Comp::Zstd => zstd::encode_all(tar.as_slice(), 3).unwrap(),
            Comp::Gzip => {
                let mut child = Command::new(require("gzip", "gzip"))
                    .args(["-n", "-c"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = child.stdin.take().unwrap();
                let input = tar.clone();
                let writer = std::thread::spawn(move || stdin.write_all(&input));
                let out = child.wait_with_output().unwrap();
                writer.join().unwrap().unwrap();
                assert!(out.status.success());
                out.stdout
            }
        };
        Layer { tar, blob, comp }
    }

    pub fn digest(&self) -> String {
        oci_digest(&self.blob)
    }

    pub fn diff_id(&self) -> String {
        oci_digest(&self.tar)
    }
}

/// Pseudo-random bytes that do not compress (so blob sizes are predictable).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A descriptor as JSON.
pub fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": oci_digest(data), "size": data.len()})
}

/// An OCI image layout directory being written.
pub struct Layout {
    pub dir: tempfile::TempDir,
    refs: Vec<serde_json::Value>,
}

/// What was written for one platform image.
pub struct Built {
    pub manifest: Vec<u8>,
    pub config: Vec<u8>,
}

impl Layout {
    pub fn new() -> Layout {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        Layout {
            dir,
            refs: Vec::new(),
        }
    }

    pub fn blob(&self, data: &[u8]) {
        std::fs::write(
            self.dir.path().join("blobs/sha256").join(sha256_hex(data)),
            data,
        )
        .unwrap();
    }

    /// Writes config, layers and manifest for one platform; returns the bytes.
    pub fn image(&self, arch: &str, layers: &[&Layer], config_extra: serde_json::Value) -> Built {
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id()).collect();
        let mut config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": config_extra,
        });
        if config["config"].is_null() {
            config.as_object_mut().unwrap().remove("config");
        }
        let config = serde_json::to_vec(&config).unwrap();
        self.blob(&config);
        let mut layer_descs = Vec::new();
        for l in layers {
            self.blob(&l.blob);
            layer_descs.push(descriptor(l.comp.media_type(), &l.blob));
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": layer_descs,
        }))
        .unwrap();
        self.blob(&manifest);
        Built { manifest, config }
    }

    /// Writes an index of `(os, arch, manifest bytes)`; returns its bytes.
    pub fn index(&self, entries: &[(&str, &str, &[u8])]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, m)| {
                let mut d = descriptor(OCI_MANIFEST, m);
                d["platform"] = serde_json::json!({"os": os, "architecture": arch});
                d
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        }))
        .unwrap();
        self.blob(&index);
        index
    }

    /// Names `data` (a manifest or index already written) as `tag` in index.json.
    pub fn tag(&mut self, tag: &str, media_type: &str, data: &[u8]) {
        let mut d = descriptor(media_type, data);
        d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        self.refs.push(d);
        std::fs::write(
            self.dir.path().join("index.json"),
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": self.refs}))
                .unwrap(),
        )
        .unwrap();
    }

    /// `skopeo copy` of `tag` to `registry/repo:tag`, digests preserved (or converted to Docker
    /// v2 with `docker_format`); returns the pushed manifest digest as skopeo reports it.
    pub fn push(&self, tag: &str, registry: &str, repo: &str, docker_format: bool) -> String {
        let skopeo = require("skopeo", "skopeo");
        let digestfile = self.dir.path().join(format!("{tag}.digest"));
        let mut cmd = Command::new(skopeo);
        cmd.args(["--insecure-policy", "copy", "--quiet", "--all"])
            .arg("--dest-tls-verify=false")
            .arg("--digestfile")
            .arg(&digestfile);
        if docker_format {
            cmd.args(["--format", "v2s2"]);
        } else {
            cmd.arg("--preserve-digests");
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", self.dir.path().display()))
            .arg(format!("docker://{registry}/{repo}:{tag}"))
            .env("HOME", self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(digestfile)
            .unwrap()
            .trim()
            .to_owned()
    }
}

// ---------------------------------------------------------------- docker config

/// A Docker config.json with inline credentials for `host`.
pub fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&serde_json::json!({"auths": {host: {"auth": auth}}})).unwrap(),
    )
    .unwrap();
    path
}

// ---------------------------------------------------------------- HTTP plumbing

/// One request as a test server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

async fn read_head(conn: &mut TcpStream) -> Option<Seen> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await.ok()? == 0 || head.len() > 64 << 10 {
            return None;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    Some(Seen {
        method,
        path,
        headers,
    })
}

pub async fn respond(
    conn: &mut TcpStream,
    status: &str,
    headers: &[(String, String)],
    body: &[u8],
) {
    let mut h = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = conn.write_all(h.as_bytes()).await;
    let _ = conn.write_all(body).await;
    let _ = conn.flush().await;
    let _ = conn.shutdown().await;
}

type Handler = Arc<
    dyn Fn(Seen, TcpStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Wraps an async closure as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Seen, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    Arc::new(move |req, conn| Box::pin(f(req, conn)))
}

/// A loopback HTTP server running `handler` per connection; records requests; stops on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(handler: Handler) -> Server {
        Server::start_on("127.0.0.1", handler).await
    }

    /// [`Server::start`] on another loopback address (`127.0.0.2`: "another host" for the
    /// rules that allow plain http only on the registry's own host).
    pub async fn start_on(ip: &str, handler: Handler) -> Server {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (seen, handler) = (s2.clone(), handler.clone());
                tokio::spawn(async move {
                    if let Some(req) = read_head(&mut conn).await {
                        seen.lock().unwrap().push(req.clone());
                        handler(req, conn).await;
                    }
                });
            }
        });
        Server { addr, seen, task }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// What a [`proxy`] does to the responses for one blob (by digest), each at most once.
#[derive(Default)]
pub struct Faults {
    /// Invert the byte at this offset of the blob (every time).
    pub flip: HashMap<String, usize>,
    /// Close the connection after this many body bytes, the first time only.
    pub cut_once: HashMap<String, usize>,
    /// Answer authorised blob GETs with a 307 to this base URL (same path), as registries do
    /// after checking credentials; unauthorised ones go on to the registry (and get its 401).
    pub redirect_blobs_to: Option<String>,
}

/// A proxy to `upstream` (host:port) that applies `faults` to blob responses.
pub async fn proxy(upstream: String, faults: Arc<Mutex<Faults>>) -> Server {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let h = handler(move |req: Seen, mut conn: TcpStream| {
        let (client, upstream, faults) = (client.clone(), upstream.clone(), faults.clone());
        async move {
            let blob = req
                .path
                .split("/blobs/")
                .nth(1)
                .map(|d| d.split('?').next().unwrap_or("").to_owned());
            let redirect = faults.lock().unwrap().redirect_blobs_to.clone();
            let authorised = req.header("authorization").is_some();
            if let (Some(_), Some(base), true) = (&blob, redirect, authorised) {
                let loc = format!("{base}{}", req.path);
                respond(
                    &mut conn,
                    "307 Temporary Redirect",
                    &[("Location".into(), loc)],
                    b"",
                )
                .await;
                return;
            }
            let mut up = client.get(format!("http://{upstream}{}", req.path));
            for (k, v) in &req.headers {
                if !matches!(k.as_str(), "host" | "connection" | "content-length") {
                    up = up.header(k, v);
                }
            }
            let resp = match up.send().await {
                Ok(r) => r,
                Err(_) => return,
            };
            let status = resp.status();
            let headers: Vec<(String, String)> = resp
                .headers()
                .iter()
                .filter(|(k, _)| {
                    !matches!(
                        k.as_str(),
                        "content-length" | "connection" | "transfer-encoding"
                    )
                })
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            let mut body = resp.bytes().await.unwrap_or_default().to_vec();
            let status_line = format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            if let Some(d) = &blob {
                let (flip, cut) = {
                    let mut f = faults.lock().unwrap();
                    (f.flip.get(d).copied(), f.cut_once.remove(d))
                };
                let start = req
                    .header("range")
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
                    .filter(|_| status.as_u16() == 206)
                    .unwrap_or(0);
                if let Some(at) = flip {
                    if at >= start && at - start < body.len() {
                        body[at - start] ^= 0xff;
                    }
                }
                if let Some(at) = cut {
                    // Promise the whole body, send part of it, hang up.
                    let mut h = format!(
                        "HTTP/1.1 {status_line}\r\nContent-Length: {}\r\nConnection: close\r\n",
                        body.len()
                    );
                    for (k, v) in &headers {
                        h.push_str(&format!("{k}: {v}\r\n"));
                    }
                    h.push_str("\r\n");
                    let _ = conn.write_all(h.as_bytes()).await;
                    let _ = conn.write_all(&body[..at.min(body.len())]).await;
                    let _ = conn.flush().await;
                    let _ = conn.shutdown().await;
                    return;
                }
            }
            respond(&mut conn, &status_line, &headers, &body).await;
        }
    });
    Server::start(h).await
}

/// A server that answers every request with a fixed status, headers and body.
pub async fn fixed(status: &'static str, headers: Vec<(String, String)>, body: Vec<u8>) -> Server {
    fixed_on("127.0.0.1", status, headers, body).await
}

/// A registry that answers everything with 401 and a Bearer challenge naming `realm`.
pub async fn bearer_challenger(realm: &str) -> Server {
    fixed(
        "401 Unauthorized",
        vec![(
            "WWW-Authenticate".into(),
            format!(r#"Bearer realm="{realm}",service="s""#),
        )],
        b"{}".to_vec(),
    )
    .await
}

/// [`fixed`] on another loopback address.
pub async fn fixed_on(
    ip: &str,
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> Server {
    let h = handler(move |_req, mut conn| {
        let (headers, body) = (headers.clone(), body.clone());
        async move { respond(&mut conn, status, &headers, &body).await }
    });
    Server::start_on(ip, h).await
}

// ---------------------------------------------------------------- token service

/// A key and self-signed certificate made with openssl, and JWTs signed with it.
pub struct Signer {
    dir: tempfile::TempDir,
    pub cert: PathBuf,
    key: PathBuf,
    cert_der_b64: String,
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl Signer {
    pub fn new() -> Signer {
        let openssl = require("openssl", "openssl");
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("key.pem"), dir.path().join("cert.pem"));
        let out = Command::new(&openssl)
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=banger-test-token",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let der = Command::new(&openssl)
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap();
        assert!(der.status.success());
        let cert_der_b64 = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
        Signer {
            dir,
            cert,
            key,
            cert_der_b64,
        }
    }

    /// An RS256 JWT granting pull and push on `repo`.
    pub fn token(&self, issuer: &str, service: &str, repo: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [self.cert_der_b64]});
        let claims = serde_json::json!({
            "iss": issuer, "sub": "tester", "aud": service,
            "exp": now + 3600, "nbf": now - 60, "iat": now - 60, "jti": format!("jti-{now}"),
            "access": [{"type": "repository", "name": repo, "actions": ["pull", "push"]}],
        });
        let signing_input = format!(
            "{}.{}",
            b64url(&serde_json::to_vec(&header).unwrap()),
            b64url(&serde_json::to_vec(&claims).unwrap())
        );
        let mut child = Command::new(require("openssl", "openssl"))
            .args(["dgst", "-sha256", "-binary", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(signing_input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        format!("{signing_input}.{}", b64url(&out.stdout))
    }
}

/// A token endpoint at `/token` handing out `token`; with `basic` set it wants exactly that
/// `Authorization: Basic ...` value and answers 401 otherwise.
pub async fn token_service(token: String, basic: Option<String>) -> Server {
    token_service_on("127.0.0.1", token, basic).await
}

/// [`token_service`] on another loopback address.
pub async fn token_service_on(ip: &str, token: String, basic: Option<String>) -> Server {
    let h = handler(move |req: Seen, mut conn| {
        let (token, basic) = (token.clone(), basic.clone());
        async move {
            let ok = match &basic {
                None => true,
                Some(want) => req.header("authorization") == Some(want.as_str()),
            };
            if ok && req.path.starts_with("/token?") {
                let body = serde_json::to_vec(
                    &serde_json::json!({"access_token": token, "expires_in": 3600}),
                )
                .unwrap();
                respond(
                    &mut conn,
                    "200 OK",
                    &[("Content-Type".into(), "application/json".into())],
                    &body,
                )
                .await;
            } else {
                respond(&mut conn, "401 Unauthorized", &[], b"{\"details\":\"no\"}").await;
            }
        }
    });
    Server::start_on(ip, h).await
}

pub fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}
