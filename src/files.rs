//! Reading files the daemon is pointed at: a model bundle's files, secrets the operator
//! named in the config file. Regular files only, opened without ever blocking on a FIFO or a
//! device, read no further than a cap. Also where paths are spelled: relative paths resolved
//! against the config file's directory with `.` and `..` removed ([`resolve`]), and the
//! built-in defaults found in a checkout ([`in_checkout`]). A leaf: it imports nothing of the
//! crate.
//!
//! Files named by an API caller are never read: API streams refer to credential sets the
//! operator defined (`[http.api_credentials.<name>]`).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Largest secret file accepted.
pub const MAX_SECRET_BYTES: u64 = 4096;

/// Whether the last component of a path may be a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Operators link mounted secrets (systemd credentials, Kubernetes secrets).
    Follow,
    /// A bundle's files must be inside it.
    Refuse,
}

/// The bytes of the regular file at `path`, at most `cap` of them: opened with `O_NONBLOCK`
/// (a FIFO or a device never blocks the open), refused unless a regular file, refused by its
/// size before it is read, and read no further than the cap (a file that grows meanwhile is
/// refused too).
pub fn read_capped(path: &Path, cap: u64, links: Links) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = nix::libc::O_NONBLOCK;
    if links == Links::Refuse {
        flags |= nix::libc::O_NOFOLLOW;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            if links == Links::Refuse && e.raw_os_error() == Some(nix::libc::ELOOP) {
                std::io::Error::other("is a symbolic link, which is not followed here")
            } else {
                e
            }
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("is not a regular file"));
    }
    if meta.len() > cap {
        return Err(std::io::Error::other(format!(
            "is {} bytes, more than the {cap} bytes allowed for this file",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::other(format!(
            "grew past the {cap} bytes allowed for this file while it was read"
        )));
    }
    Ok(bytes)
}

/// A secret file's text without its trailing line break (links followed, at most 4 KiB).
pub fn read_secret_file(path: &Path) -> std::io::Result<String> {
    let bytes = read_capped(path, MAX_SECRET_BYTES, Links::Follow)?;
    let text = String::from_utf8(bytes).map_err(|_| std::io::Error::other("is not UTF-8"))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// `path` against `base` (unless it is absolute), with `.` and `..` removed lexically:
/// `/etc/dfwatch/../x` is `/etc/x`. One spelling of a file everywhere it is shown or compared
/// (logs, `/api/streams`, statuses, the child-source guard). Lexical on purpose: the file
/// need not exist yet, and nothing is read to resolve it.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        normalize_lexically(path)
    } else {
        normalize_lexically(&base.join(path))
    }
}

/// `path` without `.` segments, each `..` taking away the segment before it (at the root,
/// `..` stays at the root; a relative path keeps the `..` it cannot take away).
pub fn normalize_lexically(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                Some(Component::ParentDir | Component::CurDir) | None => out.push(".."),
            },
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Where a checkout-relative default (`var/models/mtcnn`, `var/lib/libonnxruntime.so`) may
/// be, in the order to try: under the working directory, then beside the executable
/// (`target/{debug,release}/dfwatch` in a checkout, `/usr/bin/dfwatch`), so a daemon started
/// from another directory (systemd starts it in its state directory) finds the same files.
pub fn in_checkout(rel: &str) -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(rel)];
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(3) {
            v.push(up.join(rel));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_removed_lexically() {
        let base = Path::new("/work/main/configs");
        let cases = [
            ("../var/sample/face.mp4", "/work/main/var/sample/face.mp4"),
            ("./clip.mp4", "/work/main/configs/clip.mp4"),
            ("a/./b/../c", "/work/main/configs/a/c"),
            ("/abs/../x/./y", "/x/y"),
            ("../../../../../etc/passwd", "/etc/passwd"),
            ("clip.mp4", "/work/main/configs/clip.mp4"),
        ];
        for (p, want) in cases {
            assert_eq!(resolve(base, Path::new(p)), Path::new(want), "{p}");
        }
        assert_eq!(normalize_lexically(Path::new("a/../..")), Path::new(".."));
        assert_eq!(normalize_lexically(Path::new("./")), Path::new("."));
        assert_eq!(
            normalize_lexically(Path::new("x/../../y")),
            Path::new("../y")
        );
    }

    #[test]
    fn regular_small_files_through_links_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        assert_eq!(read_secret_file(&p).unwrap(), "s3cret");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(read_secret_file(&link).unwrap(), "s3cret");
        // /dev/zero grew the daemon to 2 GB when it was read whole.
        let e = read_secret_file(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        let e = read_secret_file(&p).unwrap_err();
        assert!(e.to_string().contains("more than the 4096 bytes"), "{e}");
        let fifo = d.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let e = read_secret_file(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
