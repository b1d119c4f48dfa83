//! Daemon start-up and shutdown: directories, the single-instance lock, the socket, the router.
//!
//! One `bangerd` runs per user. It holds an exclusive `flock` on `bangerd.lock` in the state dir
//! for its whole life; a second daemon started by a racing CLI finds the lock taken and exits
//! quietly, and a daemon killed with `kill -9` releases it with its process. Only the lock holder
//! may remove a stale socket. The socket is created under a 0177 umask (so it is 0600 from the
//! start, never briefly world-connectable) in a 0700 directory.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::{delete, get, post};
use axum::Router;
use banger_config::{Config, Paths};
use banger_net::{HostNet, Network, PrivilegedRunner, SystemHostNet};
use banger_vmm::{Backends, VmmSettings};
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::watch;

use crate::dns::DnsService;
use crate::routes::{images as image_routes, vms as vm_routes};
use crate::store::Store;
use crate::{images, vms, AppState};

/// What happened when we tried to become the daemon.
pub enum Startup {
    /// We hold the lock and serve until stopped.
    Serving,
    /// Another daemon already holds the lock; nothing to do.
    AlreadyRunning,
}

fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // An existing directory may have been created with looser bits by something else.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))
}

fn take_lock(path: &Path) -> anyhow::Result<Option<Flock<File>>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(anyhow::anyhow!("cannot lock {}: {e}", path.display())),
    }
}

/// The VM service's effects on this host: the real network, the VMM the config and the host
/// allow, the `.vm` server, sshd over TCP, and the installed guest agent. Made once, here.
fn host_effects(config: &Config, paths: &Paths) -> anyhow::Result<vms::Effects> {
    let mut bridge = config.bridge();
    // Marked on the bridge it creates, so another daemon (another user, another state
    // directory) never uses or deletes it.
    bridge.owner = banger_net::BridgeOwner::new(nix::unistd::geteuid().as_raw(), &paths.state_dir);
    let net: Arc<Network<dyn HostNet>> = Arc::new(Network::new(
        SystemHostNet::new(PrivilegedRunner::detect(), &bridge),
        bridge,
    ));
    let dns = Arc::new(DnsService::new(net.clone()));
    Ok(vms::Effects {
        net,
        vmms: Backends::for_this_host(&VmmSettings::from_config(config)),
        dns,
        sshd: Arc::new(vms::TcpSshd),
        agent_binary: vms::AgentBinary::Installed,
        timeouts: vms::Timeouts::from_env(),
    })
}

/// Runs the daemon until it is asked to stop or receives SIGTERM/SIGINT.
pub async fn run(paths: Paths) -> anyhow::Result<Startup> {
    ensure_private_dir(&paths.state_dir)?;
    ensure_private_dir(&paths.runtime_dir)?;
    let Some(_lock) = take_lock(&paths.daemon_lock())? else {
        return Ok(Startup::AlreadyRunning);
    };

    let config = Config::load(&paths.config_file())?;
    let store = Store::open(&paths.database())?;
    let image_locks = crate::image_locks::ImageLocks::default();
    let images = images::Images::new(
        paths.clone(),
        store.clone(),
        config.clone(),
        image_locks.clone(),
    );
    images
        .sweep()
        .await
        .context("cannot clean up after an earlier run")?;
    let vms = Arc::new(vms::Vms::new(
        paths.clone(),
        store.clone(),
        config.clone(),
        image_locks,
        host_effects(&config, &paths)?,
    ));
    vms.reconcile()
        .await
        .context("cannot reconcile VMs with the host")?;

    let socket = paths.socket();
    match std::fs::remove_file(&socket) {
        Ok(()) => tracing::info!("removed stale socket {}", socket.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", socket.display())),
    }
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(&socket);
    nix::sys::stat::umask(old_umask);
    let listener = listener.with_context(|| format!("cannot listen on {}", socket.display()))?;

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let state = Arc::new(AppState {
        paths: paths.clone(),
        images,
        vms,
        stop: stop_tx,
    });
    let app = router(state);
    tracing::info!(
        pid = std::process::id(),
        "bangerd {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        socket.display()
    );

    let shutdown = async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
        tokio::select! {
            _ = stop_rx.wait_for(|stop| *stop) => {},
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down");
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("API server failed")?;
    // Remove the socket while we still hold the lock, so no one connects to a dead daemon.
    let _ = std::fs::remove_file(&socket);
    Ok(Startup::Serving)
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/version", get(crate::version))
        .route("/v1/daemon/stop", post(crate::stop))
        .route("/v1/images", get(image_routes::list))
        .route("/v1/images/build", post(image_routes::build))
        .route("/v1/images/pull", post(image_routes::pull))
        .route("/v1/images/export", post(image_routes::export))
        .route("/v1/images/register", post(image_routes::register))
        .route("/v1/images/prune", post(image_routes::prune))
        .route(
            "/v1/images/{name}",
            get(image_routes::show).delete(image_routes::delete),
        )
        .route("/v1/vms", get(vm_routes::list).post(vm_routes::create))
        .route(
            "/v1/vms/{name}",
            get(vm_routes::show).delete(vm_routes::delete),
        )
        .route("/v1/vms/{name}/start", post(vm_routes::start))
        .route("/v1/vms/{name}/stop", post(vm_routes::stop))
        .route("/v1/vms/{name}/restart", post(vm_routes::restart))
        .route("/v1/vms/{name}/exec", post(vm_routes::exec))
        .route(
            "/v1/vms/{name}/exec/{session}/stdin",
            post(vm_routes::exec_stdin),
        )
        .route(
            "/v1/vms/{name}/exec/{session}/signal",
            post(vm_routes::exec_signal),
        )
        .route(
            "/v1/vms/{name}/exec/{session}/resize",
            post(vm_routes::exec_resize),
        )
        .route("/v1/vms/{name}/ssh", get(vm_routes::ssh))
        .route("/v1/vms/{name}/logs", get(vm_routes::logs))
        .route("/v1/vms/{name}/snapshot", post(vm_routes::snapshot))
        .route("/v1/vms/{name}/fork", post(vm_routes::fork))
        .route("/v1/snapshots", get(vm_routes::list_snapshots))
        .route("/v1/snapshots/{name}", delete(vm_routes::delete_snapshot))
        .route("/v1/kernels", get(image_routes::list_kernels))
        .route("/v1/kernels/register", post(image_routes::register_kernel))
        .route("/v1/kernels/pull", post(image_routes::pull_kernel))
        .route("/v1/kernels/{name}", delete(image_routes::delete_kernel))
        .layer(axum::middleware::from_fn(crate::server::version_gate))
        .with_state(state)
}
