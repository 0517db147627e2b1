//! `dfwatch export-false-alarms`: the events an operator marked as false alarms in the event
//! store, as a LIST `dfwatch eval` reads (their face crops, labelled real).
//!
//! The store is hostile input like any file: it is opened read-only and never followed
//! through a symlink, an alert id must look like one before it names a file, and nothing
//! else from it (stream names, notes) reaches the LIST.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Face crops written (rows of the LIST).
    pub crops: usize,
    /// False alarms without a stored crop (named in comment lines).
    pub without_crop: usize,
    /// False alarms whose id is not an alert id (skipped).
    pub bad_ids: usize,
}

/// An alert id as the daemon makes them (a ULID: 26 characters of Crockford base 32); only
/// such ids name files.
fn is_alert_id(id: &str) -> bool {
    id.len() == 26 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Creates `path`, which must not exist (`O_EXCL`: no file, link or hard link that was
/// planted there is written through), never through a symlink, mode 0600.
fn create(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// `out` made new (mode 0700), or an existing empty directory that is not a symlink: the
/// export writes only new files, into a place nobody has prepared for it.
fn prepare(out: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .with_context(|| format!("creating {}", out.display())),
        Err(e) => Err(e).with_context(|| out.display().to_string()),
        Ok(m) if m.file_type().is_symlink() => anyhow::bail!(
            "{} is a symbolic link; name a new or empty directory",
            out.display()
        ),
        Ok(m) if !m.is_dir() => anyhow::bail!("{} is not a directory", out.display()),
        Ok(_) => {
            let any = std::fs::read_dir(out)
                .with_context(|| out.display().to_string())?
                .next()
                .is_some();
            anyhow::ensure!(
                !any,
                "{} is not empty; name a new or empty directory (the export never writes over \
                 files; an export that stopped part way leaves its files there: remove them, or \
                 export elsewhere)",
                out.display()
            );
            Ok(())
        }
    }
}

/// Writes `list.csv` in `out` with the events the store at `db` holds as false alarms: each
/// stored face crop as `<alert id>.jpg`, labelled real, one unit per alert (`video_id` its
/// alert id). Events without a stored crop are named in comment lines.
pub fn export(db: &Path, out: &Path) -> anyhow::Result<Exported> {
    use crate::events::db::{Db, MediaKind, Review};
    let db = Db::open_read_only(db)?;
    prepare(out)?;
    let mut list = String::from(
        "# False alarms exported from the event store by `dfwatch export-false-alarms`. The\n\
         # crops are the store's JPEGs of the aligned faces: their scores can differ a little\n\
         # from those of the faces that raised the alerts.\n\
         path,label,method,video_id\n",
    );
    let mut done = Exported {
        crops: 0,
        without_crop: 0,
        bad_ids: 0,
    };
    let mut after: Option<String> = None;
    loop {
        let page = db.export_page(None, after.as_deref(), 500)?;
        let Some(last) = page.last() else { break };
        after = Some(last.alert_id.clone());
        for e in page.iter().filter(|e| e.review == Some(Review::FalseAlarm)) {
            if !is_alert_id(&e.alert_id) {
                done.bad_ids += 1;
                continue;
            }
            match db.media(&e.alert_id, MediaKind::Face)? {
                Some(jpeg) => {
                    let name = format!("{}.jpg", e.alert_id);
                    let path = out.join(&name);
                    create(&path)
                        .and_then(|mut f| f.write_all(&jpeg))
                        .with_context(|| format!("writing {}", path.display()))?;
                    list.push_str(&format!("{name},real,,{}\n", e.alert_id));
                    done.crops += 1;
                }
                None => {
                    list.push_str(&format!(
                        "# {}: no face crop stored (its stream had store_media = false)\n",
                        e.alert_id
                    ));
                    done.without_crop += 1;
                }
            }
        }
    }
    let path = out.join("list.csv");
    create(&path)
        .and_then(|mut f| f.write_all(list.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_is_a_new_or_empty_directory_and_nothing_is_written_over() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("a/b");
        prepare(&fresh).unwrap();
        assert!(fresh.is_dir());
        prepare(&fresh).unwrap();
        // A victim file, hard-linked into the output under the name the export would write.
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::hard_link(&victim, fresh.join("list.csv")).unwrap();
        let e = prepare(&fresh).unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        // Even past the check (a file planted after it), O_EXCL refuses to write through.
        assert!(create(&fresh.join("list.csv")).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path().join("elsewhere"), &link).unwrap();
        assert!(
            prepare(&link)
                .unwrap_err()
                .to_string()
                .contains("symbolic link")
        );
        assert!(
            prepare(&victim)
                .unwrap_err()
                .to_string()
                .contains("not a directory")
        );
        // New files are private.
        use std::os::unix::fs::PermissionsExt;
        create(&fresh.join("new.jpg")).unwrap();
        let mode = std::fs::metadata(fresh.join("new.jpg"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn only_alert_ids_name_files() {
        assert!(is_alert_id("01JAAAAAAAAAAAAAAAAAAAAAAA"));
        for bad in [
            "",
            "../../etc/passwd",
            "01JAAAAAAAAAAAAAAAAAAAAAA/",
            "a\nb",
            "01J",
        ] {
            assert!(!is_alert_id(bad), "{bad:?}");
        }
    }
}
