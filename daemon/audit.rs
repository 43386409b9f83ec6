//! The audit log: who changed what in the control plane, and when ("who authorized it, and
//! why"). One JSON line per change in `audit.log` in the data directory (0600), appended with a
//! single write and flushed to disk (`fdatasync`) before the change is reported done, so an
//! acknowledged change is never missing from it, even after `kill -9` or a power loss.
//!
//! Control handlers call [`crate::state::State::audit`] once a change has succeeded, with the
//! [`Actor`] (the control socket's peer) and a [`Change`] that says what changed in words.
//!
//! Invariants:
//! - Entries are numbered and written in one order, under one lock; the file is append-only.
//! - No entry holds a secret: master keys appear as fingerprints at most, virtual keys never
//!   whole (a detail that looks like one is cut to its fingerprint before it is written).
//! - A line torn by a crash mid-write is cut off when the log is next opened, so later lines
//!   are never glued to it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The log's file name in the data directory.
pub const FILE_NAME: &str = "audit.log";

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Who asked for a change: the uid and pid of the control connection's peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    pub uid: u32,
    pub pid: Option<i32>,
}

impl Actor {
    /// The daemon itself (a change it makes on its own account).
    pub fn daemon() -> Actor {
        // SAFETY: getuid has no preconditions and cannot fail.
        Actor { uid: unsafe { libc::getuid() }, pid: Some(std::process::id() as i32) }
    }
}

/// One change, as the handler that made it describes it.
#[derive(Clone, Debug)]
pub struct Change {
    /// A dotted name: `key.add`, `grant.create`, `grant.set`, `service.install`, ...
    pub action: String,
    /// What it was done to: a provider, a model, a grant, a file.
    pub target: String,
    /// The grant it concerns, for `capitctl log --grant`.
    pub grant: Option<String>,
    /// What changed, in words. Never a secret.
    pub detail: String,
}

impl Change {
    pub fn new(action: &str, target: impl Into<String>, detail: impl Into<String>) -> Change {
        Change { action: action.to_string(), target: target.into(), grant: None, detail: detail.into() }
    }

    /// A change to the grant named `name`.
    pub fn grant(action: &str, name: &str, detail: impl Into<String>) -> Change {
        Change { action: action.to_string(), target: name.to_string(), grant: Some(name.to_string()), detail: detail.into() }
    }
}

/// One line of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: i64,
    /// The peer's user name (from its uid), and its uid and process id.
    pub user: String,
    pub uid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    pub action: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    pub detail: String,
}

pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    next_seq: u64,
}

impl AuditLog {
    /// Opens (creating, 0600) the log, cutting off a line a crash left half-written.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io { path: path.to_path_buf(), source };
        let mut file = OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(path).map_err(io)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io)?;
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            tracing::warn!(path = %path.display(), bytes = text.len() - whole, "cutting off a half-written last line of the audit log");
            file.set_len(whole as u64).map_err(io)?;
            file.sync_data().map_err(io)?;
            text.truncate(whole);
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        let last_seq = text.split(|b| *b == b'\n').rev().find_map(|line| serde_json::from_slice::<AuditEntry>(line).ok()).map(|e| e.seq);
        Ok(AuditLog { path: path.to_path_buf(), inner: Mutex::new(Inner { file, next_seq: last_seq.map_or(1, |s| s + 1) }) })
    }

    /// Appends one change and makes it durable. Blocking (it waits for the disk): call it off
    /// the async threads, as [`crate::state::State::audit`] does.
    pub fn append(&self, actor: &Actor, change: Change, at_ms: i64) -> Result<AuditEntry, AuditError> {
        let mut inner = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = AuditEntry {
            seq: inner.next_seq,
            at_ms,
            user: user_name(actor.uid),
            uid: actor.uid,
            pid: actor.pid,
            action: change.action,
            target: scrub(&change.target),
            grant: change.grant,
            detail: scrub(&change.detail),
        };
        let mut line = serde_json::to_vec(&entry).expect("audit entries serialise: strings and numbers");
        line.push(b'\n');
        let io = |source| AuditError::Io { path: self.path.clone(), source };
        let before = inner.file.metadata().map_err(io)?.len();
        if let Err(e) = inner.file.write_all(&line).and_then(|()| inner.file.sync_data()) {
            // A full disk may have taken part of the line: cut it off, or the next line would be
            // glued to it and both lost to a reader.
            let _ = inner.file.set_len(before);
            return Err(io(e));
        }
        inner.next_seq += 1;
        Ok(entry)
    }

    /// Entries at or after `since_ms`, for one grant or all, oldest first.
    pub fn entries(&self, since_ms: i64, grant: Option<&str>) -> Result<Vec<AuditEntry>, AuditError> {
        // Under the lock, so that no line is read half-written.
        let _inner = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let text = std::fs::read(&self.path).map_err(|source| AuditError::Io { path: self.path.clone(), source })?;
        let mut out = Vec::new();
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<AuditEntry>(line) {
                Ok(entry) if entry.at_ms >= since_ms && grant.is_none_or(|g| entry.grant.as_deref() == Some(g)) => out.push(entry),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable line of the audit log"),
            }
        }
        Ok(out)
    }
}

/// How a virtual key appears in the log: its prefix and last four characters.
pub fn key_hint(key: &str) -> String {
    let tail: String = key.chars().rev().take(4).collect::<Vec<_>>().into_iter().rev().collect();
    format!("sk-capit-…{tail}")
}

/// Replaces anything that looks like a whole virtual key with its fingerprint: a last guard,
/// since no handler should pass one.
fn scrub(text: &str) -> String {
    const PREFIX: &str = "sk-capit-";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        out.push_str(&rest[..at]);
        let tail = &rest[at + PREFIX.len()..];
        let len = tail.bytes().take_while(u8::is_ascii_alphanumeric).count();
        if len >= 8 {
            out.push_str(PREFIX);
            out.push('…');
            out.push_str(&tail[len - 4..len]);
        } else {
            out.push_str(&rest[at..at + PREFIX.len() + len]);
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// The user name of `uid`, or `uid N` when it has none.
fn user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives the use of pwd's fields below.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: getpwuid_r succeeded, so pw_name points at a NUL-terminated string inside buf.
    unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("capit-audit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(FILE_NAME)
    }

    /// Run in a child process of the test binary: a file-size limit a few bytes past the log's
    /// end makes the disk take only part of the next line; then the limit goes and one more
    /// change is written.
    fn append_past_a_full_disk(path: &Path) {
        let actor = Actor { uid: 0, pid: Some(7) };
        let log = AuditLog::open(path).unwrap();
        let room = std::fs::metadata(path).unwrap().len() + 10;
        let mut was = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit and setrlimit on this process with valid structs, the hard limit
        // left as it is; SIGXFSZ ignored so that a write past the limit fails with EFBIG
        // instead of ending the process.
        let set_limit = |bytes: u64, max: u64| unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &libc::rlimit { rlim_cur: bytes, rlim_max: max }), 0);
        };
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut was) }, 0);
        set_limit(room.min(was.rlim_max), was.rlim_max);
        assert!(log.append(&actor, Change::grant("grant.set", "claude", "cap $9.00"), 2_000).is_err());
        set_limit(was.rlim_cur, was.rlim_max);
        log.append(&actor, Change::grant("grant.revoke", "claude", ""), 3_000).unwrap();
    }

    #[test]
    fn a_line_a_full_disk_cut_short_is_taken_back_before_the_next_one() {
        const CHILD: &str = "CAPIT_AUDIT_TEST_FULL_DISK";
        if let Some(path) = std::env::var_os(CHILD) {
            append_past_a_full_disk(Path::new(&path));
            return;
        }
        let path = temp("full");
        let log = AuditLog::open(&path).unwrap();
        log.append(&Actor { uid: 0, pid: Some(7) }, Change::grant("grant.create", "claude", "$5.00/month"), 1_000).unwrap();
        drop(log);
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "audit::tests::a_line_a_full_disk_cut_short_is_taken_back_before_the_next_one", "--test-threads", "1"])
            .env(CHILD, &path)
            .status()
            .unwrap();
        assert!(status.success(), "the child failed: {status}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|line| serde_json::from_str::<AuditEntry>(line).is_ok()), "a torn line was kept:\n{text}");
        let log = AuditLog::open(&path).unwrap();
        let actions: Vec<_> = log.entries(0, None).unwrap().into_iter().map(|e| (e.seq, e.action)).collect();
        assert_eq!(actions, [(1, "grant.create".to_string()), (2, "grant.revoke".to_string())]);
    }

    #[test]
    fn entries_are_numbered_in_order_and_survive_a_torn_last_line() {
        let path = temp("torn");
        let actor = Actor { uid: 0, pid: Some(42) };
        let log = AuditLog::open(&path).unwrap();
        log.append(&actor, Change::new("key.add", "openai", "fingerprint sk-p…WXYZ"), 1_000).unwrap();
        log.append(&actor, Change::grant("grant.create", "claude", "$5.00/month"), 2_000).unwrap();
        drop(log);
        // A crash in the middle of the next write.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"seq":3,"at_ms":3000,"us"#).unwrap();
        drop(file);
        let log = AuditLog::open(&path).unwrap();
        let third = log.append(&actor, Change::grant("grant.revoke", "claude", ""), 4_000).unwrap();
        assert_eq!(third.seq, 3);
        let all = log.entries(0, None).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(log.entries(1_500, None).unwrap().len(), 2);
        assert_eq!(
            log.entries(0, Some("claude")).unwrap().iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["grant.create", "grant.revoke"]
        );
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(all[0].user, user_name(0));
    }

    #[test]
    fn whole_virtual_keys_are_cut_to_a_fingerprint() {
        assert_eq!(scrub("key sk-capit-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789 here"), "key sk-capit-…6789 here");
        assert_eq!(scrub("sk-capit-…6789 and sk-capit-"), "sk-capit-…6789 and sk-capit-");
    }
}
