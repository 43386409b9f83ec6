//! Where capit keeps its files (design.md, "Where things live"). Pure functions of the
//! environment values passed in, shared by capitd and capitctl so both agree on the socket.

use std::path::PathBuf;

/// The environment values the default paths depend on, read once by each binary's config.
#[derive(Clone, Debug, Default)]
pub struct PathEnv {
    pub capit_home: Option<PathBuf>,
    pub capit_socket: Option<PathBuf>,
    pub home: Option<PathBuf>,
    pub xdg_data_home: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$NOTIFY_SOCKET`: where systemd listens for readiness (a `Type=notify` unit).
    pub notify_socket: Option<PathBuf>,
}

impl PathEnv {
    /// Reads the variables; empty values count as unset, as the XDG spec asks.
    pub fn from_process() -> PathEnv {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        PathEnv {
            capit_home: var("CAPIT_HOME"),
            capit_socket: var("CAPIT_SOCKET"),
            home: var("HOME"),
            xdg_data_home: var("XDG_DATA_HOME"),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
            notify_socket: var("NOTIFY_SOCKET"),
        }
    }

    /// The data directory: `$CAPIT_HOME`, else the platform's per-user data dir.
    pub fn data_dir(&self) -> Option<PathBuf> {
        if let Some(home) = &self.capit_home {
            return Some(home.clone());
        }
        if cfg!(target_os = "macos") {
            return self.home.as_ref().map(|h| h.join("Library/Application Support/capit"));
        }
        match &self.xdg_data_home {
            Some(data) if data.is_absolute() => Some(data.join("capit")),
            _ => self.home.as_ref().map(|h| h.join(".local/share/capit")),
        }
    }

    /// The control socket: `$CAPIT_SOCKET`, else in `$CAPIT_HOME`, else
    /// `$XDG_RUNTIME_DIR/capit/capitd.sock` on Linux, else in the data dir.
    pub fn socket_path(&self) -> Option<PathBuf> {
        if let Some(socket) = &self.capit_socket {
            return Some(socket.clone());
        }
        if let Some(home) = &self.capit_home {
            return Some(home.join("capitd.sock"));
        }
        if !cfg!(target_os = "macos")
            && let Some(runtime) = self.xdg_runtime_dir.as_ref().filter(|r| r.is_absolute())
        {
            return Some(runtime.join("capit").join("capitd.sock"));
        }
        self.data_dir().map(|d| d.join("capitd.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capit_home_overrides_everything_but_the_socket_variable() {
        let env = PathEnv {
            capit_home: Some("/t/h".into()),
            home: Some("/home/u".into()),
            xdg_runtime_dir: Some("/run/user/1".into()),
            ..PathEnv::default()
        };
        assert_eq!(env.data_dir().unwrap(), PathBuf::from("/t/h"));
        assert_eq!(env.socket_path().unwrap(), PathBuf::from("/t/h/capitd.sock"));
        let env = PathEnv { capit_socket: Some("/s.sock".into()), ..env };
        assert_eq!(env.socket_path().unwrap(), PathBuf::from("/s.sock"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn xdg_defaults_on_linux() {
        let env = PathEnv { home: Some("/home/u".into()), xdg_runtime_dir: Some("/run/user/1".into()), ..PathEnv::default() };
        assert_eq!(env.data_dir().unwrap(), PathBuf::from("/home/u/.local/share/capit"));
        assert_eq!(env.socket_path().unwrap(), PathBuf::from("/run/user/1/capit/capitd.sock"));
        let env = PathEnv { xdg_data_home: Some("/d".into()), xdg_runtime_dir: None, ..env };
        assert_eq!(env.data_dir().unwrap(), PathBuf::from("/d/capit"));
        assert_eq!(env.socket_path().unwrap(), PathBuf::from("/d/capit/capitd.sock"));
    }
}
