//! The daemon's validated configuration: flags over environment over defaults, checked once at
//! start so that a bad value stops the daemon with a message naming it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::paths::PathEnv;
use crate::proxy::{BodyLimits, ConnLimits, ProxyConfig};

/// The raw command line of `capitd`.
#[derive(Debug, clap::Parser)]
#[command(name = "capitd", version, about = "capit daemon: holds master keys and proxies agents' LLM traffic with per-grant caps")]
pub struct Cli {
    /// Address of the proxy; loopback only. Port 0 picks a free port.
    #[arg(long, env = "CAPIT_LISTEN", default_value = "127.0.0.1:8787")]
    pub listen: String,
    /// Data directory (database, and the socket unless --socket); default per platform.
    #[arg(long, env = "CAPIT_HOME")]
    pub home: Option<PathBuf>,
    /// Control socket path.
    #[arg(long, env = "CAPIT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Seconds to wait for an upstream's response headers, and the longest silence mid-reply.
    #[arg(long, default_value_t = 600)]
    pub upstream_timeout: u64,
    /// Seconds to keep reading a reply whose client went away, to capture its usage.
    #[arg(long, default_value_t = 120)]
    pub drain_timeout: u64,
    /// Largest request body accepted, in MiB.
    #[arg(long, default_value_t = 32)]
    pub max_body_mib: usize,
    /// Seconds open requests get to finish at shutdown.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// PEM file of extra root certificates to trust for upstream TLS (a gateway's private CA).
    #[arg(long)]
    pub upstream_ca: Option<PathBuf>,
    /// Seconds a request may wait for a grant's requests in flight to settle when only their
    /// holds are in the way, before it is refused with retry-after.
    #[arg(long, default_value_t = 60)]
    pub queue_timeout: u64,
    /// Requests that may wait at once per grant; more are refused at once.
    #[arg(long, default_value_t = 64)]
    pub queue_depth: u64,
    /// Seconds between checks of the provider keys capit made (OpenRouter): usage against the
    /// ledger, limits against the grants, deletions still pending.
    #[arg(long, default_value_t = 300)]
    pub key_check_interval: u64,
    /// Seconds an access request waits for an answer, and an answer for its collection.
    #[arg(long, default_value_t = 3600)]
    pub request_ttl: u64,
    /// Access requests waiting for an answer at once; more are refused (429).
    #[arg(long, default_value_t = 16)]
    pub max_pending_requests: u64,
    /// Program run as `PROGRAM capit MESSAGE` when an access request arrives or a spend alert
    /// fires, or "none" (default: notify-send on Linux, osascript on macOS, where present).
    #[arg(long)]
    pub notify_command: Option<PathBuf>,
    /// Command run (with `sh -c`) when a grant's spend reaches an alert threshold; it gets
    /// CAPIT_GRANT, CAPIT_PERCENT, CAPIT_SPENT, CAPIT_CAP, CAPIT_PERIOD and CAPIT_PROVIDER.
    #[arg(long, env = "CAPIT_ON_ALERT", value_name = "CMD")]
    pub on_alert: Option<String>,
    /// Seconds a client has to send a request's headers, from their first byte (slowloris).
    #[arg(long, default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a connection with no request in flight stays open.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Seconds a request body has to arrive in full.
    #[arg(long, default_value_t = 60)]
    pub body_timeout: u64,
    /// Open proxy connections at most; default: what the open-file limit allows (two
    /// descriptors each), up to 8192.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Open proxy connections of one user (the uid owning the client's socket) at most;
    /// default: half of --max-connections.
    #[arg(long)]
    pub max_connections_per_user: Option<usize>,
    /// A web origin (https://app.example.com) whose pages may call the proxy; repeatable. Other
    /// pages are refused.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origins: Vec<String>,
    /// Where master keys are kept at rest: auto (sealed under the OS keyring where one is
    /// reachable, else as text in the 0600 database), keyring (or do not start), file.
    #[arg(long, env = "CAPIT_KEY_STORAGE", default_value = "auto")]
    pub key_storage: String,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub home: PathBuf,
    pub socket: PathBuf,
    pub listen: SocketAddr,
    pub proxy: ProxyConfig,
    pub key_check_interval: Duration,
    pub access: crate::access::AccessConfig,
    pub alerts: crate::events::AlertActions,
    /// systemd's notification socket, when run as a `Type=notify` service.
    pub notify_socket: Option<PathBuf>,
    pub key_storage: crate::keyring::KeyStorage,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0:?} is not an address such as 127.0.0.1:8787")]
    BadListen(String),
    #[error("{0}")]
    NotLoopback(String),
    #[error("no data directory: set CAPIT_HOME or HOME, or pass --home")]
    NoHome,
    #[error("{name} must be between {min} and {max}")]
    OutOfRange { name: &'static str, min: u64, max: u64 },
    #[error("{0}")]
    BadOrigin(String),
    #[error("--key-storage {0:?} must be auto, keyring or file")]
    BadKeyStorage(String),
}

impl Config {
    pub fn load(cli: Cli, env: PathEnv) -> Result<Config, ConfigError> {
        let listen: SocketAddr = cli.listen.trim().parse().map_err(|_| ConfigError::BadListen(cli.listen.clone()))?;
        crate::proxy::check_listen_addr(listen).map_err(ConfigError::NotLoopback)?;
        let env = PathEnv { capit_home: cli.home.or(env.capit_home), capit_socket: cli.socket.or(env.capit_socket), ..env };
        let on_alert = cli.on_alert.filter(|cmd| !cmd.trim().is_empty());
        let home = env.data_dir().ok_or(ConfigError::NoHome)?;
        let socket = env.socket_path().ok_or(ConfigError::NoHome)?;
        let range = |name, value: u64, min, max| {
            if (min..=max).contains(&value) { Ok(value) } else { Err(ConfigError::OutOfRange { name, min, max }) }
        };
        let upstream_timeout = range("--upstream-timeout", cli.upstream_timeout, 1, 86_400)?;
        let drain = range("--drain-timeout", cli.drain_timeout, 0, 3_600)?;
        let max_body_mib = range("--max-body-mib", cli.max_body_mib as u64, 1, 1024)?;
        let grace = range("--grace", cli.grace, 0, 3_600)?;
        let queue_timeout = range("--queue-timeout", cli.queue_timeout, 0, 3_600)?;
        let queue_depth = range("--queue-depth", cli.queue_depth, 0, 100_000)?;
        let key_check_interval = range("--key-check-interval", cli.key_check_interval, 1, 86_400)?;
        let request_ttl = range("--request-ttl", cli.request_ttl, 1, 7 * 86_400)?;
        let max_pending = range("--max-pending-requests", cli.max_pending_requests, 1, 1_000)?;
        let notify = match cli.notify_command {
            Some(program) if program.as_os_str() == "none" => crate::access::Notifier::None,
            Some(program) => crate::access::Notifier::Program(program),
            None if cfg!(target_os = "macos") => crate::access::Notifier::AppleScript,
            None => crate::access::Notifier::Program(PathBuf::from("notify-send")),
        };
        let header_timeout = range("--header-timeout", cli.header_timeout, 1, 3_600)?;
        let idle_timeout = range("--idle-timeout", cli.idle_timeout, 1, 86_400)?;
        let body_timeout = range("--body-timeout", cli.body_timeout, 1, 86_400)?;
        let max_connections = cli.max_connections.map(|n| range("--max-connections", n as u64, 16, 1_000_000)).transpose()?;
        let max_per_user = cli.max_connections_per_user.map(|n| range("--max-connections-per-user", n as u64, 1, 1_000_000)).transpose()?;
        let allowed_origins = cli
            .allow_origins
            .iter()
            .map(|o| crate::proxy::parse_origin(o))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ConfigError::BadOrigin)?;
        let key_storage =
            crate::keyring::KeyStorage::parse(cli.key_storage.trim()).ok_or(ConfigError::BadKeyStorage(cli.key_storage.clone()))?;
        Ok(Config {
            home,
            socket,
            listen,
            key_storage,
            proxy: ProxyConfig {
                max_body_bytes: (max_body_mib as usize) * 1024 * 1024,
                upstream_timeout: Duration::from_secs(upstream_timeout),
                body_limits: BodyLimits { idle: Duration::from_secs(upstream_timeout), drain: Duration::from_secs(drain) },
                grace: Duration::from_secs(grace),
                upstream_ca: cli.upstream_ca,
                wait: crate::state::WaitPolicy { timeout: Duration::from_secs(queue_timeout), depth: queue_depth as usize },
                limits: ConnLimits {
                    header_timeout: Duration::from_secs(header_timeout),
                    idle_timeout: Duration::from_secs(idle_timeout),
                    body_timeout: Duration::from_secs(body_timeout),
                    max_connections: max_connections.map(|n| n as usize),
                    max_per_user: max_per_user.map(|n| n as usize),
                },
                allowed_origins,
            },
            key_check_interval: Duration::from_secs(key_check_interval),
            access: crate::access::AccessConfig {
                ttl_seconds: request_ttl as i64,
                max_pending: max_pending as usize,
                notify: notify.clone(),
            },
            alerts: crate::events::AlertActions { hook: on_alert, notifier: notify },
            notify_socket: env.notify_socket,
        })
    }
}
