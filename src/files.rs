//! Reading files the daemon is pointed at: a model bundle's files, secrets the operator
//! named in the config file. Regular files only, opened without ever blocking on a FIFO or a
//! device, read no further than a cap. A leaf: it imports nothing of the crate.
//!
//! Files named by an API caller are never read: API streams refer to credential sets the
//! operator defined (`[http.api_credentials.<name>]`).

use std::io::Read;
use std::path::Path;

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

#[cfg(test)]
mod tests {
    use super::*;

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
