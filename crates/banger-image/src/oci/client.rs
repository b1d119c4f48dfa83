//! banger's own thin client for the OCI distribution API (`/v2/NAME/manifests/REF`,
//! `/v2/NAME/blobs/DIGEST`), on the workspace's reqwest with rustls, and [`OciError`], the one
//! error type of the `oci` modules.
//!
//! Why not `oci-client`: its current release needs reqwest 0.13 and sha2 0.11 (a second HTTP and
//! hash stack in the build), reads manifest and token bodies without any size cap, and gives no
//! control over where credentials go. banger treats every registry as hostile, so the few
//! requests it needs are made here, with these rules:
//!
//! - **Scheme.** https, with the system's usual TLS verification. Plain http only for loopback
//!   registries (`localhost`, `127.0.0.0/8`, `[::1]`, any port), as Docker does, and for those
//!   the caller lists as insecure (`host` or `host:port`; the `insecure_registries` config key).
//!   Redirects and token realms ([`url_allowed`]) may be https anywhere; plain http only when
//!   the registry itself is plain-http (loopback or insecure-listed) and only on that same host.
//!   So a remote https registry can never send banger to plain http, not even to a loopback
//!   port (which any user of a shared host can bind). At most 10 redirects.
//! - **Auth.** Requests go out anonymously. A `401` with `WWW-Authenticate: Bearer realm=...`
//!   makes the client ask the realm for a token (`?service=...&scope=repository:NAME:pull`, with
//!   Basic credentials when `auth` finds some) and retry with `Authorization: Bearer`; a `Basic`
//!   challenge is answered with Basic credentials. Only the registry's own answers are
//!   challenges: a `401` from wherever a redirect led (blob storage, a CDN, an open redirect on
//!   it) is a plain error, so such a host can never name a realm to receive the credentials.
//!   Credentials are looked up only when the registry asks for them, and go only to the registry
//!   and the realm it names: reqwest drops `Authorization` on redirects to another host or port
//!   (blob downloads are often redirected to storage), which the integration tests check.
//!   Secrets never appear in logs, errors or `Debug` output.
//! - **Caps.** Every untrusted body is read with a cap, never whole: manifests and indexes
//!   4 MiB, tokens 64 KiB, error bodies 16 KiB (the config's 1 MiB is enforced by the blob cache).
//!
//! Manifest semantics live in `manifest`, blob storage in `cache`, credentials in `auth`.

use crate::capped::{read_body_at_most, BodyError};
use crate::digest::Sha256Digest;
use crate::download::{range_answer, range_from, DownloadError, RangeAnswer, Source};
use crate::oci::auth::{self, AuthError, Credentials};
use crate::oci::manifest::{ManifestError, MANIFEST_ACCEPT};
use crate::oci::reference::{shorten, Reference};
use banger_hint::Hint;
use base64::Engine;
use futures_util::StreamExt;
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{StatusCode, Url};
use std::borrow::Cow;
use std::ffi::OsString;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The largest token response read.
pub const TOKEN_MAX_BYTES: u64 = 64 << 10;
/// The largest error body read (for its message).
pub const ERROR_BODY_MAX_BYTES: u64 = 16 << 10;
const MAX_REDIRECTS: usize = 10;
/// Whole-request limit for small documents (manifests, tokens), so a registry that trickles
/// bytes cannot hold a pull forever; blob downloads only have the per-read timeout.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(120);

/// How to reach registries: which may use plain http, where credentials come from.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryOptions {
    /// Registries reached over plain http besides loopback ones: `host` (any port) or
    /// `host:port`; a leading `http://` or `https://` and a trailing `/` are ignored.
    pub insecure: Vec<String>,
    /// Docker's `config.json` (see [`auth::docker_config_path`]); `None`: always anonymous.
    pub docker_config: Option<PathBuf>,
    /// PATH for `docker-credential-*` helpers; `None`: the process's PATH.
    pub credential_path: Option<OsString>,
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: Vec::new(),
            docker_config: None,
            credential_path: None,
            user_agent: concat!("banger/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

impl fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("insecure", &self.insecure)
            .field("docker_config", &self.docker_config)
            .field("user_agent", &self.user_agent)
            .finish_non_exhaustive()
    }
}

/// Every failure of resolving or fetching an image. Messages name the image, the registry and
/// the URL (which never holds credentials); where a user can act, [`Hint::hint`] says how.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot reach registry {registry} at {url}: {reason}")]
    Transport {
        registry: String,
        url: String,
        reason: &'static str,
        hint: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered 401 Unauthorized for {reference}{detail}")]
    Unauthorized {
        reference: String,
        registry: String,
        url: String,
        detail: String,
        hint: String,
    },
    #[error("{reference} was not found: {url} answered 404 Not Found{detail}")]
    NotFound {
        reference: String,
        url: String,
        detail: String,
    },
    #[error("{url} answered HTTP {status} for {reference}{detail}")]
    Status {
        reference: String,
        url: String,
        status: StatusCode,
        detail: String,
    },
    #[error("the {what} from {url} is larger than {max} bytes; banger stopped reading it")]
    TooLarge {
        what: &'static str,
        url: String,
        max: u64,
    },
    #[error(
        "registry {registry} sends banger to {realm} for a token, which is plain http away from \
         the registry's own loopback or insecure-listed host; banger sends nothing there"
    )]
    InsecureRealm { registry: String, realm: String },
    #[error("registry {registry} asks for authentication banger cannot do: {detail}")]
    Challenge { registry: String, detail: String },
    #[error("the token service {realm} for registry {registry} answered {detail}")]
    Token {
        registry: String,
        realm: String,
        detail: String,
    },
    #[error(
        "manifest {what} of {reference} has digest {}, not {}",
        actual.oci(), expected.oci()
    )]
    ManifestDigest {
        reference: String,
        what: String,
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("cannot use image {reference}")]
    Manifest {
        reference: String,
        #[source]
        source: ManifestError,
    },
    #[error("cannot read the credentials for registry {registry}")]
    Credentials {
        registry: String,
        #[source]
        source: AuthError,
    },
    #[error(
        "pulling {reference} needs {} MiB more in {}, which has {} MiB free",
        mib_up(*needed), path.display(), free >> 20
    )]
    NoSpace {
        reference: String,
        path: PathBuf,
        /// Bytes still to download: declared sizes minus what is cached or partial.
        needed: u64,
        /// Bytes an unprivileged user may still write there.
        free: u64,
    },
    #[error(transparent)]
    Download(#[from] DownloadError),
    #[error("blob cache: {what} {}", path.display())]
    Cache {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for OciError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            OciError::Transport { hint, .. } => Some((*hint).into()),
            OciError::Unauthorized { hint, .. } => Some(hint.as_str().into()),
            OciError::NotFound { .. } => Some(
                "check the image name and tag (`docker.io/library/NAME:TAG` is what a bare NAME \
                 means)"
                    .into(),
            ),
            OciError::InsecureRealm { .. } => Some(
                "a token service must be https, or plain http on the same host as a registry \
                 that is on loopback or in insecure_registries"
                    .into(),
            ),
            OciError::ManifestDigest { .. } => Some(
                "the registry served other bytes than the digest names; do not trust this \
                 registry's answer"
                    .into(),
            ),
            OciError::NoSpace { .. } => Some(
                "free some space there (`banger image prune` removes blobs no image needs and \
                 unfinished downloads) and pull again"
                    .into(),
            ),
            // Transparent: the download error is not in the chain, so its hint is asked here.
            OciError::Download(e) => e.hint(),
            // The manifest and credential errors are sources, and the report asks them itself.
            OciError::Status { .. }
            | OciError::TooLarge { .. }
            | OciError::Challenge { .. }
            | OciError::Token { .. }
            | OciError::Manifest { .. }
            | OciError::Credentials { .. }
            | OciError::Cache { .. } => None,
        }
    }
}

impl OciError {
    /// True when the disk filled up while writing the cache, or a pull would not fit in its
    /// free space.
    pub fn is_disk_full(&self) -> bool {
        match self {
            OciError::Download(DownloadError::DiskFull { .. }) | OciError::NoSpace { .. } => true,
            OciError::Cache { source, .. } => crate::download::is_disk_full(source),
            _ => false,
        }
    }

    /// True when the registry refused us (401), so a login would help.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, OciError::Unauthorized { .. })
    }

    /// True when the image, tag or digest does not exist there.
    pub fn is_not_found(&self) -> bool {
        matches!(self, OciError::NotFound { .. })
    }
}

/// Bytes in MiB, rounded up (so a need is never shown as 0).
fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Whether plain http may be used for `host` (`host`, `host:port`, `[v6]:port`): loopback
/// registries and those in `insecure`. Everything else is https only.
pub fn plain_http_allowed(host: &str, insecure: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    let name = host_without_port(&host);
    if is_loopback(name) {
        return true;
    }
    insecure.iter().any(|entry| {
        let e = entry.trim().to_ascii_lowercase();
        let e = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
            .unwrap_or(&e);
        let e = e.trim_end_matches('/');
        !e.is_empty() && (e == host || e == name)
    })
}

/// `host:port` -> `host`; `[::1]:5000` -> `[::1]`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        host.split(':').next().unwrap_or(host)
    }
}

fn is_loopback(name: &str) -> bool {
    if name == "localhost" {
        return true;
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback());
    }
    name.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
}

/// `host[:port]` of a URL, as [`plain_http_allowed`] wants it.
fn url_host(url: &Url) -> String {
    // host_str() keeps the brackets of an IPv6 address.
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// May a redirect or a token request of the registry at `registry` (its API host, `host[:port]`)
/// go to `url`? https: always. Plain http: only when the registry itself is reached over plain
/// http (loopback or insecure-listed) and `url` is on that same host, on a port
/// [`plain_http_allowed`] allows. A registry reached over https can never send banger to plain
/// http, loopback included: credentials would cross in clear text to a port any local user may
/// have bound, and a redirect could reach local services.
pub fn url_allowed(url: &Url, registry: &str, insecure: &[String]) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => {
            let target = url_host(url).to_ascii_lowercase();
            let registry = registry.to_ascii_lowercase();
            plain_http_allowed(&registry, insecure)
                && host_without_port(&target) == host_without_port(&registry)
                && plain_http_allowed(&target, insecure)
        }
        _ => false,
    }
}

/// One `WWW-Authenticate` challenge: scheme (lowercased) and parameters (names lowercased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
}

impl Challenge {
    fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a `WWW-Authenticate` value (RFC 7235: one or more challenges, comma separated, each a
/// scheme and `name=value` or `name="quoted"` parameters). Junk ends parsing; what parsed is kept.
pub(crate) fn parse_challenges(header: &str) -> Vec<Challenge> {
    let b = header.as_bytes();
    let mut i = 0;
    let mut out: Vec<Challenge> = Vec::new();
    let is_token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/:".contains(&c);
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> String {
        let start = *i;
        while *i < b.len() && is_token(b[*i]) {
            *i += 1;
        }
        header[start..*i].to_owned()
    };
    loop {
        while i < b.len() && (b[i] == b',' || b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        if i >= b.len() {
            return out;
        }
        let scheme = token(&mut i);
        if scheme.is_empty() {
            return out;
        }
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: Vec::new(),
        };
        loop {
            skip_ws(&mut i);
            let save = i;
            let name = token(&mut i);
            skip_ws(&mut i);
            if name.is_empty() || i >= b.len() || b[i] != b'=' {
                // Not a parameter: the next challenge's scheme (or junk).
                i = save;
                break;
            }
            i += 1;
            skip_ws(&mut i);
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = Vec::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    v.push(b[i]);
                    i += 1;
                }
                i += 1; // closing quote (or past the end)
                String::from_utf8_lossy(&v).into_owned()
            } else {
                token(&mut i)
            };
            challenge.params.push((name.to_ascii_lowercase(), value));
            skip_ws(&mut i);
            if i < b.len() && b[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
        // Each round consumed at least the scheme token, so this loop ends.
        out.push(challenge);
    }
}

/// A document fetched from the manifest endpoint.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    /// `Docker-Content-Digest`, when it is a sha256 digest.
    pub header_digest: Option<Sha256Digest>,
}

/// The `Authorization` value in use; its `Debug` never shows it.
#[derive(Clone, Default)]
struct AuthHeader(Option<HeaderValue>);

impl fmt::Debug for AuthHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "<redacted>"
        } else {
            "none"
        })
    }
}

/// A client for one repository of one registry.
pub(crate) struct RegistryClient {
    http: reqwest::Client,
    reference: String,
    registry: String,
    repository: String,
    base: Url,
    /// `host[:port]` of `base`, for the redirect and realm rules.
    api_host: String,
    insecure: Vec<String>,
    docker_config: Option<PathBuf>,
    credential_path: Option<OsString>,
    credentials: tokio::sync::OnceCell<Option<Credentials>>,
    /// Whether credentials were sent (changes the 401 hint).
    sent_credentials: AtomicBool,
    auth: tokio::sync::Mutex<AuthHeader>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("reference", &self.reference)
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    pub(crate) fn new(reference: &Reference, options: &RegistryOptions) -> Result<Self, OciError> {
        let host = reference.api_host();
        let scheme = if plain_http_allowed(host, &options.insecure) {
            "http"
        } else {
            "https"
        };
        let base_text = format!("{scheme}://{host}/v2/{}/", reference.repository());
        let transport = |source: reqwest::Error| OciError::Transport {
            registry: reference.registry().to_owned(),
            url: base_text.clone(),
            reason: "the HTTP client could not be set up",
            hint: "this is a bug in banger; please report it",
            source,
        };
        // Validated by Reference::parse, so this parses; fall back to an error anyway.
        let base = Url::parse(&base_text).map_err(|e| OciError::Challenge {
            registry: reference.registry().to_owned(),
            detail: format!("cannot form its URL: {e}"),
        })?;
        let insecure = options.insecure.clone();
        let (policy_insecure, policy_host) = (insecure.clone(), host.to_owned());
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if !url_allowed(attempt.url(), &policy_host, &policy_insecure) {
                attempt.error(
                    "redirect to plain http away from the registry's own loopback or \
                     insecure-listed host refused",
                )
            } else {
                attempt.follow()
            }
        });
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // A stalled transfer fails (and can be resumed) instead of hanging forever.
            .read_timeout(Duration::from_secs(60))
            .user_agent(options.user_agent.clone())
            .redirect(policy)
            .referer(false)
            .build()
            .map_err(transport)?;
        Ok(RegistryClient {
            http,
            reference: reference.to_string(),
            registry: reference.registry().to_owned(),
            repository: reference.repository().to_owned(),
            base,
            api_host: host.to_owned(),
            insecure,
            docker_config: options.docker_config.clone(),
            credential_path: options.credential_path.clone(),
            credentials: tokio::sync::OnceCell::new(),
            sent_credentials: AtomicBool::new(false),
            auth: tokio::sync::Mutex::new(AuthHeader::default()),
        })
    }

    fn url(&self, path: &str) -> Url {
        // Every path segment was validated (repository, tag, digest), so joining cannot escape.
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    fn transport_error(&self, url: &str, e: reqwest::Error) -> OciError {
        let chain = error_chain_text(&e);
        let (reason, hint) = if e.is_timeout() {
            (
                "it did not answer in time",
                "run the command again; a pull resumes where it stopped",
            )
        } else if e.is_redirect() {
            (
                "a redirect was refused",
                "the registry redirected to plain http on another host, or in a loop; banger does not follow that",
            )
        } else if ["certificate", "tls", "handshake", "corrupt message", "peer"]
            .iter()
            .any(|w| chain.contains(w))
        {
            (
                "the TLS connection failed",
                "check the registry's certificate; a registry that only speaks plain http on a trusted network can be added to insecure_registries",
            )
        } else if e.is_connect() {
            (
                "the connection failed",
                "check the registry name and your network",
            )
        } else {
            (
                "the request failed",
                "check your network and run the command again",
            )
        };
        OciError::Transport {
            registry: self.registry.clone(),
            url: url.to_owned(),
            reason,
            hint,
            source: e.without_url(),
        }
    }

    /// GETs `url` with `headers` (and an overall `timeout`, if any), answering one
    /// authentication challenge. The caller judges the status of the returned response.
    async fn get(
        &self,
        url: &Url,
        headers: HeaderMap,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, OciError> {
        let mut challenged = false;
        loop {
            let used = self.auth.lock().await.clone();
            let mut req = self.http.get(url.clone()).headers(headers.clone());
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            if let Some(h) = &used.0 {
                req = req.header(AUTHORIZATION, h.clone());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| self.transport_error(url.as_str(), e))?;
            if resp.status() != StatusCode::UNAUTHORIZED
                || challenged
                || !self.answered_by_registry(&resp)
            {
                // A 401 from where a redirect led is not the registry's challenge: answering it
                // would let that host pick the realm the credentials go to.
                return Ok(resp);
            }
            challenged = true;
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_challenges)
                .collect();
            if !self.authenticate(&challenges, &used).await? {
                return Ok(resp);
            }
        }
    }

    /// Whether `resp` came from the registry itself (same scheme, host and port), not from
    /// wherever a redirect led.
    fn answered_by_registry(&self, resp: &reqwest::Response) -> bool {
        resp.url().origin() == self.base.origin()
    }

    /// Answers a 401: sets a new Authorization header and returns true, or returns false when
    /// there is nothing more to try (the 401 stands).
    async fn authenticate(
        &self,
        challenges: &[Challenge],
        used: &AuthHeader,
    ) -> Result<bool, OciError> {
        let mut current = self.auth.lock().await;
        if current.0 != used.0 {
            // Another request refreshed the token meanwhile: retry with that one.
            return Ok(true);
        }
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let token = self.fetch_token(bearer).await?;
            let mut value =
                HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| OciError::Token {
                    registry: self.registry.clone(),
                    realm: bearer.param("realm").map(shorten).unwrap_or_default(),
                    detail: "a token that is not a valid header value".into(),
                })?;
            value.set_sensitive(true);
            *current = AuthHeader(Some(value));
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            if used.0.is_some() {
                return Ok(false);
            }
            let Some(creds) = self.credentials().await? else {
                return Ok(false);
            };
            let raw = format!("{}:{}", creds.username(), creds.secret());
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
            let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| {
                OciError::Challenge {
                    registry: self.registry.clone(),
                    detail: "credentials that cannot be sent".into(),
                }
            })?;
            value.set_sensitive(true);
            self.sent_credentials.store(true, Ordering::Relaxed);
            *current = AuthHeader(Some(value));
            return Ok(true);
        }
        match challenges.first() {
            Some(c) => Err(OciError::Challenge {
                registry: self.registry.clone(),
                detail: format!("the `{}` scheme", shorten(&c.scheme)),
            }),
            None => Ok(false),
        }
    }

    async fn credentials(&self) -> Result<Option<Credentials>, OciError> {
        let Some(config) = &self.docker_config else {
            return Ok(None);
        };
        self.credentials
            .get_or_try_init(|| async {
                auth::lookup(&self.registry, config, self.credential_path.as_deref())
                    .await
                    .map_err(|source| OciError::Credentials {
                        registry: self.registry.clone(),
                        source,
                    })
            })
            .await
            .cloned()
    }

    /// Asks a Bearer challenge's realm for a pull token for this repository.
    async fn fetch_token(&self, challenge: &Challenge) -> Result<String, OciError> {
        let realm_text = challenge.param("realm").unwrap_or_default();
        let token_err = |detail: String| OciError::Token {
            registry: self.registry.clone(),
            realm: shorten(realm_text),
            detail,
        };
        let mut realm = Url::parse(realm_text)
            .map_err(|_| token_err("nothing: its realm is not a URL".into()))?;
        if !url_allowed(&realm, &self.api_host, &self.insecure) || !realm.username().is_empty() {
            return Err(OciError::InsecureRealm {
                registry: self.registry.clone(),
                realm: shorten(realm_text),
            });
        }
        {
            let mut q = realm.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", &format!("repository:{}:pull", self.repository));
        }
        let mut req = self.http.get(realm.clone()).timeout(DOCUMENT_TIMEOUT);
        if let Some(creds) = self.credentials().await? {
            self.sent_credentials.store(true, Ordering::Relaxed);
            req = req.basic_auth(creds.username(), Some(creds.secret()));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(&redact_query(&realm), e))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let url = redact_query(&realm);
            return Err(self.unauthorized(url, format!(" (the token service answered {status})")));
        }
        if !status.is_success() {
            return Err(token_err(format!("HTTP {status}")));
        }
        let body = read_body_at_most(resp, TOKEN_MAX_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge => token_err(format!("more than {TOKEN_MAX_BYTES} bytes")),
                BodyError::Http(e) => self.transport_error(&redact_query(&realm), e),
            })?;
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|_| token_err("something that is not a token response".into()))?;
        answer
            .token
            .filter(|t| !t.is_empty())
            .or(answer.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| token_err("no token".into()))
    }

    fn unauthorized(&self, url: String, detail: String) -> OciError {
        let host = &self.registry;
        let hint = if self.sent_credentials.load(Ordering::Relaxed) {
            format!(
                "the registry refused the credentials banger found for {host} in the Docker config; \
                 run `docker login {host}` again"
            )
        } else {
            format!(
                "run `docker login {host}` (banger reads ~/.docker/config.json); registries also \
                 answer 401 for repositories that do not exist, so check the name"
            )
        };
        OciError::Unauthorized {
            reference: self.reference.clone(),
            registry: self.registry.clone(),
            url,
            detail,
            hint,
        }
    }

    /// Turns a non-success response into the matching error, reading a capped error body.
    async fn status_error(&self, url: &Url, resp: reqwest::Response) -> OciError {
        let status = resp.status();
        // Only the host, never the URL: after a redirect it may be a signed storage URL.
        let redirected_to = (!self.answered_by_registry(&resp)).then(|| url_host(resp.url()));
        let detail = match read_body_at_most(resp, ERROR_BODY_MAX_BYTES).await {
            Ok(body) => registry_error_detail(&body),
            Err(_) => String::new(),
        };
        let url = url.to_string();
        match (status, redirected_to) {
            (StatusCode::UNAUTHORIZED, Some(host)) => OciError::Status {
                reference: self.reference.clone(),
                url,
                status,
                detail: format!(
                    " after a redirect to {host}{detail}; banger answers authentication \
                     challenges only from the registry itself"
                ),
            },
            (StatusCode::UNAUTHORIZED, None) => self.unauthorized(url, detail),
            (StatusCode::NOT_FOUND, _) => OciError::NotFound {
                reference: self.reference.clone(),
                url,
                detail,
            },
            (status, _) => OciError::Status {
                reference: self.reference.clone(),
                url,
                status,
                detail,
            },
        }
    }

    /// GETs a manifest or index by tag or `sha256:` digest, reading at most `max` bytes.
    pub(crate) async fn get_manifest(
        &self,
        reference: &str,
        max: u64,
    ) -> Result<Fetched, OciError> {
        let url = self.url(&format!("manifests/{reference}"));
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT));
        let resp = self.get(&url, headers, Some(DOCUMENT_TIMEOUT)).await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(&url, resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(200).collect());
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| Sha256Digest::parse_oci(s.trim()).ok());
        let body = read_body_at_most(resp, max).await.map_err(|e| match e {
            BodyError::TooLarge => OciError::TooLarge {
                what: "manifest",
                url: url.to_string(),
                max,
            },
            BodyError::Http(e) => self.transport_error(url.as_str(), e),
        })?;
        Ok(Fetched {
            body,
            content_type,
            header_digest,
        })
    }

    /// The URL of a blob (for messages).
    pub(crate) fn blob_url(&self, digest: &Sha256Digest) -> Url {
        self.url(&format!("blobs/{}", digest.oci()))
    }

    /// Opens a blob at `offset` (with `Range` when > 0); returns the stream and where it really
    /// starts: `offset` for a matching 206, else 0 (the caller restarts).
    pub(crate) async fn open_blob(
        &self,
        digest: &Sha256Digest,
        offset: u64,
    ) -> Result<(Source, u64), OciError> {
        let url = self.blob_url(digest);
        let mut headers = HeaderMap::new();
        if let Some(range) = range_from(offset) {
            headers.insert(RANGE, range);
        }
        let resp = self.get(&url, headers, None).await?;
        let start = match range_answer(&resp, offset) {
            RangeAnswer::StartsAt(start) => start,
            RangeAnswer::Restart => return Box::pin(self.open_blob(digest, 0)).await,
            RangeAnswer::Refused => return Err(self.status_error(&url, resp).await),
        };
        // Errors lose their URL: after a redirect it may be a signed storage URL.
        let stream = resp.bytes_stream().map(|r| r.map_err(|e| e.without_url()));
        Ok((Source::Http(stream.boxed()), start))
    }

    pub(crate) fn manifest_error(&self, source: ManifestError) -> OciError {
        OciError::Manifest {
            reference: self.reference.clone(),
            source,
        }
    }

    pub(crate) fn manifest_digest_mismatch(
        &self,
        what: &str,
        expected: Sha256Digest,
        actual: Sha256Digest,
    ) -> OciError {
        OciError::ManifestDigest {
            reference: self.reference.clone(),
            what: shorten(what),
            expected,
            actual,
        }
    }
}

/// A URL for messages: the query (which may carry a service's parameters) is dropped.
fn redact_query(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.to_string()
}

fn error_chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        out.push_str(&err.to_string().to_ascii_lowercase());
        out.push(' ');
        cur = err.source();
    }
    out
}

/// ` (CODE: message)` from a registry error body `{"errors":[{"code","message"}]}`, else empty.
fn registry_error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    let Ok(errors) = serde_json::from_slice::<Errors>(body) else {
        return String::new();
    };
    match errors.errors.first() {
        Some(e) => {
            let text = match (&e.code, &e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => return String::new(),
            };
            let short: String = text.chars().take(200).collect();
            format!(" ({})", shorten(&short))
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_and_listed_registries() {
        let none: Vec<String> = vec![];
        for host in [
            "localhost",
            "localhost:5000",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.8.9.10:443",
            "[::1]",
            "[::1]:5000",
        ] {
            assert!(plain_http_allowed(host, &none), "{host}");
        }
        for host in [
            "registry-1.docker.io",
            "ghcr.io",
            "10.0.0.5:5000",
            "192.168.1.2",
            "[::2]:5000",
            "[fe80::1]",
            "128.0.0.1",
            "localhost.example",
            "127.0.0.1.nip.io",
            "[::ffff:127.0.0.1]",
            "0.0.0.0:5000",
        ] {
            assert!(!plain_http_allowed(host, &none), "{host}");
        }
        let insecure = vec![
            "http://reg.lan:5000/".to_string(),
            "other.lan".to_string(),
            "[fd00::1]:5000".to_string(),
        ];
        assert!(plain_http_allowed("reg.lan:5000", &insecure));
        assert!(
            !plain_http_allowed("reg.lan:5001", &insecure),
            "port listed: only that port"
        );
        assert!(!plain_http_allowed("reg.lan", &insecure));
        assert!(plain_http_allowed("other.lan", &insecure));
        assert!(
            plain_http_allowed("OTHER.lan:8080", &insecure),
            "host listed: any port"
        );
        assert!(plain_http_allowed("[fd00::1]:5000", &insecure));
        assert!(!plain_http_allowed("evil.other.lan", &insecure));
        assert!(!plain_http_allowed("reg.lan.evil:5000", &insecure));
        assert!(!plain_http_allowed("10.1.2.3:5000", &["".to_string()]));
    }

    #[test]
    fn clients_pick_the_scheme_without_any_traffic() {
        let opts = RegistryOptions::default();
        let c = RegistryClient::new(&Reference::parse("10.1.2.3:5000/x").unwrap(), &opts).unwrap();
        assert_eq!(c.base.as_str(), "https://10.1.2.3:5000/v2/x/");
        let c = RegistryClient::new(&Reference::parse("alpine").unwrap(), &opts).unwrap();
        assert_eq!(
            c.base.as_str(),
            "https://registry-1.docker.io/v2/library/alpine/"
        );
        let c = RegistryClient::new(&Reference::parse("[::1]:5000/a/b").unwrap(), &opts).unwrap();
        assert_eq!(c.base.as_str(), "http://[::1]:5000/v2/a/b/");
        let opts = RegistryOptions {
            insecure: vec!["10.1.2.3:5000".into()],
            ..Default::default()
        };
        let c = RegistryClient::new(&Reference::parse("10.1.2.3:5000/x").unwrap(), &opts).unwrap();
        assert_eq!(c.base.as_str(), "http://10.1.2.3:5000/v2/x/");
        assert_eq!(
            c.blob_url(&Sha256Digest::of_bytes(b"")).as_str(),
            format!(
                "http://10.1.2.3:5000/v2/x/blobs/{}",
                Sha256Digest::of_bytes(b"").oci()
            )
        );
    }

    #[test]
    fn realms_and_redirects_go_to_plain_http_only_on_a_plain_http_registrys_own_host() {
        let none: Vec<String> = vec![];
        let ok = |registry: &str, u: &str, insecure: &[String]| {
            url_allowed(&Url::parse(u).unwrap(), registry, insecure)
        };
        // A registry reached over https: https anywhere, plain http nowhere, loopback included.
        for registry in ["registry-1.docker.io", "ghcr.io", "10.1.2.3:5000"] {
            assert!(ok(registry, "https://auth.docker.io/token", &none));
            assert!(ok(registry, "https://127.0.0.1:9000/token", &none));
            for refused in [
                "http://127.0.0.1:9000/token",
                "http://[::1]:9000/token",
                "http://localhost/token",
                "http://ghcr.io/token",
                "http://10.1.2.3:5000/token",
                "ftp://127.0.0.1/token",
                "file:///etc/passwd",
            ] {
                assert!(!ok(registry, refused, &none), "{registry} -> {refused}");
            }
        }
        // A loopback registry: plain http on its own host (any port), nowhere else.
        assert!(ok("127.0.0.1:5000", "http://127.0.0.1:9000/token", &none));
        assert!(ok("127.0.0.1:5000", "http://127.0.0.1/token", &none));
        assert!(ok("[::1]:5000", "http://[::1]:9000/token", &none));
        assert!(ok("LOCALHOST:5000", "http://localhost:9000/t", &none));
        assert!(ok("127.0.0.1:5000", "https://auth.example/token", &none));
        for refused in [
            "http://127.0.0.2:9000/token",
            "http://localhost:9000/token",
            "http://[::1]:9000/token",
            "http://auth.example/token",
            "http://10.0.0.1/token",
        ] {
            assert!(!ok("127.0.0.1:5000", refused, &none), "{refused}");
        }
        // An insecure-listed registry: its own host, on the ports its entry allows.
        let listed = vec!["reg.lan:5000".to_string(), "other.lan".to_string()];
        assert!(ok("reg.lan:5000", "http://reg.lan:5000/token", &listed));
        assert!(!ok("reg.lan:5000", "http://reg.lan:5001/token", &listed));
        assert!(!ok("reg.lan:5000", "http://other.lan/token", &listed));
        assert!(!ok("reg.lan:5000", "http://127.0.0.1:5000/token", &listed));
        assert!(ok("other.lan", "http://other.lan:8080/token", &listed));
        assert!(!ok("other.lan", "http://evil.other.lan/token", &listed));
    }

    #[test]
    fn challenges_parse_like_registries_send_them() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c[0].param("service"), Some("registry.docker.io"));
        assert_eq!(c[0].param("scope"), Some("repository:library/alpine:pull"));
        let c = parse_challenges(r#"Basic realm="Registry Realm""#);
        assert_eq!(c[0].scheme, "basic");
        assert_eq!(c[0].param("realm"), Some("Registry Realm"));
        let c =
            parse_challenges(r#"Basic realm="a, b", Bearer REALM=https://x/t , service = "s\"q""#);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].param("realm"), Some("a, b"));
        assert_eq!(c[1].scheme, "bearer");
        assert_eq!(c[1].param("realm"), Some("https://x/t"));
        assert_eq!(c[1].param("service"), Some("s\"q"));
        // Junk never panics or loops.
        for junk in [
            "",
            ",,,",
            "Bearer",
            "Bearer realm=",
            "Bearer realm=\"unterminated",
            "=\"x\"",
            "\u{1}\u{2}",
            "Bearer ,,, realm",
            "a=b=c",
            "\"",
            "Bearer realm=\"\\",
        ] {
            let _ = parse_challenges(junk);
        }
        let long = format!("Bearer realm=\"{}\"", "x".repeat(100_000));
        assert_eq!(
            parse_challenges(&long)[0].param("realm").map(str::len),
            Some(100_000)
        );
    }

    #[test]
    fn registry_error_bodies_give_a_short_detail() {
        assert_eq!(
            registry_error_detail(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#),
            " (MANIFEST_UNKNOWN: manifest unknown)"
        );
        assert_eq!(registry_error_detail(b"<html>"), "");
        let long = format!(r#"{{"errors":[{{"message":"{}\n"}}]}}"#, "m".repeat(5000));
        let d = registry_error_detail(long.as_bytes());
        assert!(d.len() < 220 && !d.contains('\n'), "{d}");
    }

    #[test]
    fn options_debug_hides_nothing_secret_and_errors_have_hints() {
        let opts = RegistryOptions::default();
        assert!(format!("{opts:?}").contains("banger/"));
        let e = OciError::NotFound {
            reference: "docker.io/library/nope:latest".into(),
            url: "https://registry-1.docker.io/v2/library/nope/manifests/latest".into(),
            detail: String::new(),
        };
        assert!(
            e.hint()
                .unwrap()
                .starts_with("check the image name and tag"),
            "{e}"
        );
        assert!(!e.to_string().contains("hint"), "{e}");
        assert!(e.is_not_found() && !e.is_disk_full());
    }
}
