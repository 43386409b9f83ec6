//! Wires the daemon together: directories, store, state, the proxy on TCP and the control
//! service on a Unix socket, and an orderly stop.
//!
//! Shutdown order: stop accepting; let open proxy requests finish (bounded by the grace
//! period) and their settlements reach the ledger; stop the control service; flush and close
//! the store; remove the socket.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{ControlServer, ControlService};
use crate::state::State;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("binding the proxy on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("another capitd is already serving the socket {0}")]
    SocketInUse(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("control service: {0}")]
    Control(#[from] tonic::transport::Error),
    #[error("upstream TLS roots: {0}")]
    UpstreamTls(std::io::Error),
    #[error("master keys at rest: {0}")]
    Keyring(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AppError + '_ {
    move |source| AppError::Io { path: path.to_path_buf(), source }
}

/// Runs the daemon until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    // A file-size limit (ulimit -f) reached is then a write error, which the store rides out
    // like a full disk, rather than a signal that kills the daemon.
    // SAFETY: setting a signal's disposition to ignore has no preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    private_dir(&config.home)?;
    let database = config.home.join("capit.redb");
    let (store, mut snapshot) = Store::open(&database)?;
    // Before anything is served: the keyring may take a moment (or an unlock prompt).
    let (protection, keys, management) = {
        let (store, storage) = (store.clone(), config.key_storage);
        let (mut keys, mut management) = (std::mem::take(&mut snapshot.keys), std::mem::take(&mut snapshot.management_keys));
        tokio::task::spawn_blocking(move || {
            crate::keyring::protect_at_rest(&database, storage, &store, &mut keys, &mut management).map(|p| (p, keys, management))
        })
        .await
        .map_err(|e| AppError::Keyring(e.to_string()))?
        .map_err(|e| AppError::Keyring(e.to_string()))?
    };
    (snapshot.keys, snapshot.management_keys) = (keys, management);
    tracing::info!(at_rest = protection.at_rest(), "{}", protection.detail);
    let memberships = std::mem::take(&mut snapshot.teams);
    let state = Arc::new(State::new(store.clone(), snapshot, config.home.clone())?.with_access(config.access.clone()));
    state.events().set_alert_actions(config.alerts.clone());
    state.set_key_protection(protection);

    // Built before binding anything, so that a bad --upstream-ca stops the start cleanly.
    let client = crate::proxy::upstream_client(config.proxy.upstream_ca.as_deref()).map_err(AppError::UpstreamTls)?;
    // The daemon's own calls (OpenRouter's key management) go over the same TLS client.
    let outbound = crate::proxy::outbound::Outbound::new(client.clone(), std::time::Duration::from_secs(30));
    let backstop = Arc::new(crate::backstop::service::Backstop::new(state.clone(), outbound));
    let teams = crate::team::service::Teams::start(state.clone(), memberships, crate::team::service::REPORT_INTERVAL);
    let proxy_listener = TcpListener::bind(config.listen).await.map_err(|source| AppError::Listen { addr: config.listen, source })?;
    let proxy_addr = proxy_listener.local_addr().map_err(io(&config.home))?;
    state.set_listen_addr(proxy_addr);
    let control_listener = bind_socket(&config.socket).await?;
    tracing::info!(proxy = %proxy_addr, control = %config.socket.display(), home = %config.home.display(), "capitd {} listening", env!("CARGO_PKG_VERSION"));

    let stop = CancellationToken::new();
    let proxy = tokio::spawn(crate::proxy::serve(proxy_listener, state.clone(), client, config.proxy.clone(), stop.clone()));
    let control = tokio::spawn(serve_control(control_listener, backstop.clone(), teams.clone(), stop.clone()));
    let key_checks = tokio::spawn(backstop.clone().run(config.key_check_interval, stop.clone()));
    let notify_socket = config.notify_socket.as_deref().map(Path::as_os_str);
    let status = format!("STATUS=proxy on http://{proxy_addr}, control socket {}", config.socket.display());
    crate::readiness::tell(notify_socket, &format!("READY=1\n{status}"));

    shutdown.await;
    crate::readiness::tell(notify_socket, "STOPPING=1");
    stop.cancel();
    match proxy.await {
        Ok(Err(e)) => tracing::error!(error = %e, "proxy stopped with an error"),
        Err(e) => tracing::error!(error = %e, "proxy task failed"),
        Ok(Ok(())) => {}
    }
    // Watch streams end once the last settlements are published, so the control service can stop.
    state.events().close();
    let control_result = control.await;
    let _ = key_checks.await;
    // Once the proxy has drained, every member reports what settled, one last time.
    teams.shutdown().await;
    drop(teams);
    drop(backstop);
    // What is no longer in flight needs no lease: a clean stop leaves nothing to charge.
    state.lower_leases_to_holds();
    drop(state);
    store.close();
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!(error = %e, "removing the control socket failed");
    }
    tracing::info!("capitd stopped");
    match control_result {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(error = %e, "control task failed");
            Ok(())
        }
    }
}

/// Creates `dir` (and parents) and makes it 0700.
fn private_dir(dir: &Path) -> Result<(), AppError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mode = std::fs::metadata(dir).map_err(io(dir))?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// Binds the control socket 0600 in a 0700 directory, replacing a stale socket file but never
/// a live daemon's.
async fn bind_socket(path: &Path) -> Result<UnixListener, AppError> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AppError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io(path))?;
    }
    let listener = UnixListener::bind(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    Ok(listener)
}

async fn serve_control(
    listener: UnixListener,
    backstop: Arc<crate::backstop::service::Backstop>,
    teams: Arc<crate::team::service::Teams>,
    stop: CancellationToken,
) -> Result<(), AppError> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let my_uid = unsafe { libc::getuid() };
    let incoming = UnixListenerStream::new(listener).filter_map(move |conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == my_uid => Some(Ok(stream)),
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), "refused a control connection from another user");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a control connection whose peer is unknown");
                None
            }
        },
        Err(e) => Some(Err(e)),
    });
    tonic::transport::Server::builder()
        // LiteLLM's full price file is a few MiB; tonic's default limit is 4 MiB.
        .add_service(ControlServer::new(ControlService::new(backstop, teams)).max_decoding_message_size(64 * 1024 * 1024))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}
