//! The team database's connection string, as a user gives it on the command line: a
//! `postgres://` URL that must not hold a password (argv is visible to every user of the
//! machine; the password comes from a prompt or a `PGPASSFILE`). Pure.
//!
//! TLS follows libpq's `sslmode` names: `disable`, `prefer` (the default: TLS when the server
//! offers it), `require`, `verify-ca` and `verify-full`. Whenever TLS is used the server's
//! certificate is verified, with its host name, against the Mozilla roots and the PEM file
//! `sslrootcert` names, so `require` is as strict as `verify-full` (libpq's `require` does not
//! verify).

#[derive(Clone, PartialEq, Eq)]
pub struct DbUrl {
    /// The URL as the user gave it (it holds no password), which is what is stored.
    pub given: String,
    /// The URL as given, without `sslrootcert` (which is kept apart) and with `sslmode` in the
    /// form the driver takes.
    pub driver_url: String,
    pub user: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub tls: TlsMode,
    pub root_cert: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.display())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
}

impl DbUrl {
    /// Parses and checks `postgres://[user@]host[:port][/database][?sslmode=...&sslrootcert=...]`.
    pub fn parse(text: &str) -> Result<DbUrl, String> {
        let text = text.trim();
        let rest = text
            .strip_prefix("postgres://")
            .or_else(|| text.strip_prefix("postgresql://"))
            .ok_or_else(|| format!("{:?} is not a postgres:// URL", redact(text)))?;
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = main.split_once('/').unwrap_or((main, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if userinfo.is_some_and(|u| u.contains(':')) {
            return Err("the URL holds a password: give it at the prompt or in a PGPASSFILE instead, never on the command line".into());
        }
        let user = userinfo.map(decode).transpose()?.unwrap_or_default();
        let (host, port_text) = match hostport.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or("an IPv6 host needs its closing ]")?;
                (host, after.strip_prefix(':'))
            }
            None => match hostport.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            },
        };
        let port = match port_text {
            Some(p) => p.parse::<u16>().map_err(|_| format!("{p:?} is not a port"))?,
            None => 5432,
        };
        let host = host.to_string();
        if host.is_empty() || host.contains(',') {
            return Err("the URL must name one host (postgres://user@host:5432/database)".into());
        }
        let database = decode(path)?;
        let mut tls = TlsMode::Prefer;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode(value)?;
            match key {
                "password" => return Err("the URL holds a password: give it at the prompt or in a PGPASSFILE instead".into()),
                "sslmode" => {
                    tls = match value.as_str() {
                        "disable" => TlsMode::Disable,
                        "allow" | "prefer" => TlsMode::Prefer,
                        "require" | "verify-ca" | "verify-full" => TlsMode::Require,
                        other => return Err(format!("sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full")),
                    };
                }
                "sslrootcert" => root_cert = Some(std::path::PathBuf::from(value)),
                "sslcert" | "sslkey" | "sslpassword" | "passfile" | "host" | "hostaddr" => {
                    return Err(format!("{key}= is not supported in a team database URL"));
                }
                _ => kept.push(pair.to_string()),
            }
        }
        kept.push(format!(
            "sslmode={}",
            match tls {
                TlsMode::Disable => "disable",
                TlsMode::Prefer => "prefer",
                TlsMode::Require => "require",
            }
        ));
        let scheme_less = match path.is_empty() {
            true => authority.to_string(),
            false => format!("{authority}/{path}"),
        };
        Ok(DbUrl {
            given: text.to_string(),
            driver_url: format!("postgres://{scheme_less}?{}", kept.join("&")),
            user,
            host,
            port,
            database,
            tls,
            root_cert,
        })
    }

    /// The URL to show and log: it never holds a password.
    pub fn display(&self) -> String {
        let user = if self.user.is_empty() { String::new() } else { format!("{}@", self.user) };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        format!("postgres://{user}{host}:{}/{}", self.port, self.database)
    }

    /// The host is this machine (no TLS needed to keep the traffic private).
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) || self.host.starts_with('/')
    }

    /// The password for this URL from a libpq password file's text (`host:port:db:user:pw`,
    /// `*` matching anything, `\:` and `\\` escaped, `#` comments), as libpq reads it.
    pub fn password_from_passfile(&self, text: &str) -> Option<String> {
        let port = self.port.to_string();
        let user = if self.user.is_empty() { whoami_default() } else { self.user.clone() };
        let database = if self.database.is_empty() { user.clone() } else { self.database.clone() };
        let wanted = [self.host.as_str(), port.as_str(), database.as_str(), user.as_str()];
        for line in text.lines() {
            if line.trim_start().starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let fields = split_passfile_line(line);
            if fields.len() != 5 {
                continue;
            }
            if fields[..4].iter().zip(wanted).all(|(field, want)| field == "*" || field == want) {
                return Some(fields[4].clone());
            }
        }
        None
    }
}

/// The operating system user, as libpq defaults the user name to.
fn whoami_default() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_default()
}

fn split_passfile_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("never empty").push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("never empty").push(c),
        }
    }
    fields
}

/// Percent-decoding of one URL component.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("a bad %-escape in the URL")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL is not UTF-8 once decoded".to_string())
}

/// A URL cut before any password, for an error message about a URL that did not parse (at the
/// last `@`: a password may hold an `@` of its own).
fn redact(text: &str) -> String {
    match text.rsplit_once('@') {
        Some((_, rest)) => format!("…@{rest}"),
        None => text.chars().take(80).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_taken_apart_and_its_tls_settings_kept_for_capit() {
        let url = DbUrl::parse("postgres://capit@db.example.com:6543/team?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x")
            .unwrap();
        assert_eq!((url.user.as_str(), url.host.as_str(), url.port, url.database.as_str()), ("capit", "db.example.com", 6543, "team"));
        assert_eq!((url.tls, url.root_cert.as_deref()), (TlsMode::Require, Some(std::path::Path::new("/etc/ca.pem"))));
        assert_eq!(url.driver_url, "postgres://capit@db.example.com:6543/team?application_name=x&sslmode=require");
        assert_eq!(url.display(), "postgres://capit@db.example.com:6543/team");
        assert!(!url.is_loopback());
        let local = DbUrl::parse("postgresql://127.0.0.1/capit").unwrap();
        assert_eq!((local.port, local.tls, local.is_loopback()), (5432, TlsMode::Prefer, true));
    }

    #[test]
    fn a_password_on_the_command_line_is_refused_without_being_repeated() {
        for url in ["postgres://capit:hunter2@db/team", "postgres://capit@db/team?password=hunter2"] {
            let error = DbUrl::parse(url).unwrap_err();
            assert!(error.contains("password") && !error.contains("hunter2"), "{error}");
        }
        assert!(!DbUrl::parse("mysql://capit:hunter2@db").unwrap_err().contains("hunter2"));
        let error = DbUrl::parse("mysql://capit:hun@ter2@db").unwrap_err();
        assert!(!error.contains("hun") && !error.contains("ter2"), "{error}");
        assert!(DbUrl::parse("postgres://db/team?sslmode=sometimes").is_err());
    }

    #[test]
    fn the_password_file_is_read_as_libpq_reads_it() {
        let url = DbUrl::parse("postgres://capit@127.0.0.1:5433/team").unwrap();
        let file = "# comment\n127.0.0.1:5432:team:capit:wrong-port\n127.0.0.1:5433:*:capit:pa\\:ss\\\\word\n";
        assert_eq!(url.password_from_passfile(file).as_deref(), Some("pa:ss\\word"));
        assert_eq!(url.password_from_passfile("*:*:*:other:x\n"), None);
    }
}
