//! A real PostgreSQL server for one test: `initdb` and `pg_ctl` in a temp dir, as an
//! unprivileged user (Postgres refuses to run as root, and CI runs as root), on a free loopback
//! port, with password (SCRAM) authentication. Stopped and removed on drop.
//!
//! The binaries are found through `$CAPIT_PG_BIN`, then `initdb` on `PATH`, then Debian's
//! `/usr/lib/postgresql/<version>/bin`. Where there are none, [`Postgres::start`] returns `None`
//! and the test skips with a line saying so, unless `CAPIT_REQUIRE_POSTGRES` is set (`.ci/run`
//! sets it once it has installed Debian's `postgresql` package).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::{TempDir, wait_for};

/// The role and database the tests' pools live in.
pub const USER: &str = "capit";
pub const DATABASE: &str = "capit";

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    /// `Some(user)` when running as root: the server runs as that user.
    run_as: Option<&'static str>,
    pub port: u16,
    pub password: String,
    running: bool,
}

/// Where the server binaries are, if anywhere.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CAPIT_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    for dir in on_path {
        if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
            // Debian's wrappers in /usr/bin need a cluster; the real binaries sit beside the server.
            let real = std::fs::canonicalize(dir.join("pg_ctl")).ok().and_then(|p| p.parent().map(Path::to_path_buf));
            return real.or(Some(dir));
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Postgres {
    /// A fresh server with database [`DATABASE`] owned by [`USER`], or `None` (the test skips)
    /// where PostgreSQL is not installed.
    pub fn start() -> Option<Postgres> {
        Postgres::start_with(&[], &[])
    }

    /// As [`start`](Self::start), with extra `postgresql.conf` lines and files in the data
    /// directory (e.g. a TLS certificate and key), written 0600 for the server before it starts.
    pub fn start_with(conf: &[&str], files: &[(&str, &str)]) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            assert!(std::env::var_os("CAPIT_REQUIRE_POSTGRES").is_none(), "CAPIT_REQUIRE_POSTGRES is set but initdb was not found");
            eprintln!("skipped: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        // SAFETY: geteuid has no preconditions.
        let run_as = (unsafe { libc::geteuid() } == 0).then_some("nobody");
        let dir = TempDir::new();
        let password = format!("pw-{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
        let mut pg = Postgres { dir, bin, run_as, port: 0, password, running: false };
        std::fs::set_permissions(pg.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = pg.root();
        std::fs::create_dir(&root).unwrap();
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", pg.password)).unwrap();
        if pg.run_as.is_some() {
            let status = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(&root).status().unwrap();
            assert!(status.success(), "chown of the Postgres dir failed");
        }
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(root.join("data"))
            .args(["-U", USER, "-A", "scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut lines = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", root.display()),
            "fsync = off".into(),
            "synchronous_commit = off".into(),
            "full_page_writes = off".into(),
            "shared_buffers = 16MB".into(),
            "max_connections = 60".into(),
        ];
        lines.extend(conf.iter().map(|s| s.to_string()));
        let config = root.join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(&lines.join("\n"));
        text.push('\n');
        std::fs::write(&config, text).unwrap();
        for (name, contents) in files {
            pg.file(name, contents);
        }
        // A free port can be taken between the look and the bind: try a few.
        for _ in 0..5 {
            pg.port = free_port();
            if pg.try_start() {
                pg.create_database();
                return Some(pg);
            }
        }
        panic!("Postgres did not start: {}", pg.log_text());
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("pg")
    }

    /// A file in the server's own directory, readable by the server (certificates).
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.root().join("data").join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        if self.run_as.is_some() {
            Command::new("chown").arg("nobody:nogroup").arg(&path).status().unwrap();
        }
        path
    }

    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut cmd = Command::new("setpriv");
                cmd.args([format!("--reuid={user}"), "--regid=nogroup".into(), "--clear-groups".into()]).arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.command("pg_ctl").arg("-D").arg(self.root().join("data")).args(args).output().unwrap()
    }

    fn try_start(&mut self) -> bool {
        let log = self.root().join("log");
        let port = format!("-p {}", self.port);
        let out = self.pg_ctl(&["-l", log.to_str().unwrap(), "-o", &port, "-w", "-t", "30", "start"]);
        self.running = out.status.success();
        self.running
    }

    fn create_database(&self) {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg(format!("CREATE DATABASE {DATABASE} OWNER {USER}"))
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap();
        assert!(out.status.success(), "creating the database failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The server's log, for failure messages.
    pub fn log_text(&self) -> String {
        let log = self.root().join("log");
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// The connection URL, without the password (as a user types it on the command line).
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// A libpq password file (`PGPASSFILE`) that gives this server's password, 0600.
    pub fn passfile(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("pgpass-{}", self.port));
        std::fs::write(&path, format!("127.0.0.1:{}:{DATABASE}:{USER}:{}\n", self.port, self.password)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// Runs SQL through `psql` and returns its unaligned, tuples-only output, trimmed.
    #[track_caller]
    pub fn query(&self, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "-d", DATABASE, "-v", "ON_ERROR_STOP=1", "-Atq", "-c"])
            .arg(sql)
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap();
        assert!(out.status.success(), "psql failed on {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Stops the server (fast shutdown: open connections are cut).
    pub fn stop(&mut self) {
        if self.running {
            let out = self.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"]);
            assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
            self.running = false;
        }
    }

    /// Starts a stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        assert!(!self.running, "Postgres is running");
        wait_for("Postgres to start again", Duration::from_secs(30), || self.try_start().then_some(()));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "-t", "30", "stop"]);
        }
    }
}
