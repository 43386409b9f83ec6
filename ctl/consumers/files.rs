//! The one way capitctl writes a user's file: the whole new text to a temporary file in the
//! same directory, flushed to disk, then renamed over the old one. A crash or error leaves
//! either the old file or the new one, never half of either, and no temp file.
//!
//! A symlinked file (a dotfile manager's) is written through to its target, so the link stays.
//! A file that holds a key is written 0600 (its group and other bits cleared), and the mode it
//! had is returned so that a revoke can put it back; any other file keeps its mode.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file's text, or `None` when there is no such file (or only a dangling link).
pub fn read(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file a path names once every symlink on the way is followed; the path itself when it is
/// not a link. A dangling link resolves to where its target would be.
pub fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let target = fs::read_link(&current)?;
                current = match current.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!("{}: too many levels of symbolic links", path.display())))
}

/// The permission bits of the file a path names, if it exists.
pub fn mode(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o7777)
}

/// The mode a file that holds a key is written with: its owner bits, readable and writable by
/// the owner, nothing for anyone else.
pub fn secret_mode(mode: u32) -> u32 {
    (mode & 0o700) | 0o600
}

/// Replaces the file's contents atomically (0600 for a new file, in a directory created 0700 if
/// needed). With `holds_key`, the file ends up at most 0600 and the mode it had before is
/// returned when that changed it; otherwise it keeps its mode.
pub fn write_atomic(path: &Path, text: &str, holds_key: bool) -> io::Result<Option<u32>> {
    let target = resolve(path)?;
    let dir = target.parent().ok_or_else(|| io::Error::other("the path has no directory"))?;
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let before = mode(&target);
    let mode = match before {
        Some(mode) if holds_key => secret_mode(mode),
        Some(mode) => mode,
        None => 0o600,
    };
    write_replacing(&target, text, mode)?;
    Ok(before.filter(|old| *old != mode))
}

/// Sets a file's permission bits (through symlinks).
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(resolve(path)?, fs::Permissions::from_mode(mode))
}

/// Removes the file a path names: the target of a symlink, leaving the link as it was.
pub fn remove(path: &Path) -> io::Result<()> {
    fs::remove_file(resolve(path)?)
}

fn write_replacing(target: &Path, text: &str, mode: u32) -> io::Result<()> {
    let dir = target.parent().ok_or_else(|| io::Error::other("the path has no directory"))?;
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("config");
    let temp = dir.join(format!(".{name}.capit-{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::set_permissions(&temp, fs::Permissions::from_mode(mode))?;
        fs::rename(&temp, target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// SHA-256 of a text, in hex: how capit recognises a file it wrote without keeping the text
/// (which holds a virtual key).
pub fn fingerprint(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("capit-files-{tag}-{}-{nanos:x}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_that_holds_a_key_becomes_0600_and_says_what_it_was() {
        let dir = temp_dir("mode");
        let file = dir.join("settings.json");
        fs::write(&file, "{}").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(write_atomic(&file, "{\"k\": 1}", true).unwrap(), Some(0o644));
        assert_eq!(mode(&file), Some(0o600));
        assert_eq!(write_atomic(&file, "{\"k\": 2}", true).unwrap(), None, "already 0600: nothing changed");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(write_atomic(&file, "{}", false).unwrap(), None);
        assert_eq!(mode(&file), Some(0o640), "a file without a key keeps its mode");
        let fresh = dir.join("new").join("x.env");
        assert_eq!(write_atomic(&fresh, "A=1\n", true).unwrap(), None);
        assert_eq!((mode(&fresh), mode(fresh.parent().unwrap())), (Some(0o600), Some(0o700)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_is_written_through_to_its_target_and_stays_a_link() {
        let dir = temp_dir("link");
        fs::create_dir_all(dir.join("dotfiles")).unwrap();
        let target = dir.join("dotfiles").join("aider.yml");
        fs::write(&target, "model: x\n").unwrap();
        let link = dir.join(".aider.conf.yml");
        std::os::unix::fs::symlink("dotfiles/aider.yml", &link).unwrap();
        write_atomic(&link, "model: y\n", true).unwrap();
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is still a link");
        assert_eq!(fs::read_to_string(&target).unwrap(), "model: y\n");
        assert_eq!(resolve(&link).unwrap(), dir.join("dotfiles").join("aider.yml"));
        let dangling = dir.join("dangling.env");
        std::os::unix::fs::symlink(dir.join("dotfiles").join("later.env"), &dangling).unwrap();
        assert_eq!(read(&dangling).unwrap(), None);
        write_atomic(&dangling, "A=1\n", true).unwrap();
        assert_eq!(fs::read_to_string(dir.join("dotfiles").join("later.env")).unwrap(), "A=1\n");
        remove(&dangling).unwrap();
        assert!(fs::symlink_metadata(&dangling).is_ok() && !dir.join("dotfiles").join("later.env").exists());
        let names: Vec<String> =
            fs::read_dir(dir.join("dotfiles")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, ["aider.yml"], "no temp file left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
