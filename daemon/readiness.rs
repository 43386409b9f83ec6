//! Tells a service manager how the daemon is doing: systemd's notification protocol
//! (`sd_notify`), one datagram of `KEY=VALUE` lines to the socket in `$NOTIFY_SOCKET`, which
//! `Type=notify` units get. `READY=1` goes once the store is open and both listeners are bound;
//! `STOPPING=1` when shutdown begins. Without `$NOTIFY_SOCKET` (a terminal, launchd) it does nothing.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to `socket`: a path, or an abstract
/// socket name when it starts with `@` (Linux).
pub fn notify(socket: &OsStr, state: &str) -> std::io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sender.send_to_addr(state.as_bytes(), &addr)?;
            return Ok(());
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = name;
            return Err(std::io::Error::other("abstract sockets exist only on Linux"));
        }
    }
    sender.send_to(state.as_bytes(), std::path::Path::new(socket))?;
    Ok(())
}

/// Notifies when the daemon was started with a notification socket; a failure is logged only.
pub fn tell(socket: Option<&OsStr>, state: &str) {
    if let Some(socket) = socket
        && let Err(e) = notify(socket, state)
    {
        tracing::warn!(error = %e, socket = %socket.to_string_lossy(), "telling the service manager {state:?} failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_reaches_a_path_socket() {
        let path = std::env::temp_dir().join(format!("capit-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        let _ = std::fs::remove_file(&path);
    }
}
