//! Reading a secret the operator named in the config file (a password file, the API token
//! file): a regular file of at most 4 KiB, read without ever blocking on a FIFO or device.
//! Symbolic links are followed: operators link mounted secrets (systemd credentials,
//! Kubernetes secrets). A leaf: it imports nothing of the crate.
//!
//! Files named by an API caller are never read: API streams refer to credential sets the
//! operator defined (`[http.api_credentials.<name>]`).

use std::io::Read;
use std::path::Path;

/// Largest secret file accepted.
pub const MAX_SECRET_BYTES: u64 = 4096;

/// The file's text without its trailing line break.
pub fn read_secret_file(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("is not a regular file"));
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(std::io::Error::other(format!(
            "is {} bytes; a secret file holds at most {MAX_SECRET_BYTES}",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    f.take(MAX_SECRET_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(std::io::Error::other(format!(
            "grew past {MAX_SECRET_BYTES} bytes while it was read"
        )));
    }
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
        assert!(e.to_string().contains("at most 4096"), "{e}");
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
