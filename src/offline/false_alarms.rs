//! `dfwatch export-false-alarms`: the events an operator marked as false alarms in the event
//! store, as a LIST `dfwatch eval` reads (their face crops, labelled real).

use std::path::Path;

use anyhow::Context;

/// Writes the LIST of the events an operator marked as false alarms in the event store at
/// `db`: each face crop the store kept as `<alert id>.jpg` in `out`, labelled real, its
/// `video_id` the stream and track (so crops of one face form one unit). Events without a
/// stored crop are named in comment lines. Returns (crops written, events without one).
pub fn export(db: &Path, out: &Path) -> anyhow::Result<(usize, usize)> {
    use crate::events::db::{Db, MediaKind, Review};
    let db = Db::open_read_only(db)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut list = String::from("path,label,method,video_id\n");
    let (mut written, mut without) = (0usize, 0usize);
    let mut after: Option<String> = None;
    loop {
        let page = db.export_page(None, after.as_deref(), 500)?;
        let Some(last) = page.last() else { break };
        after = Some(last.alert_id.clone());
        for e in page.iter().filter(|e| e.review == Some(Review::FalseAlarm)) {
            // Alert ids are ULIDs (Crockford base 32): safe as file names; checked anyway.
            if e.alert_id.is_empty() || !e.alert_id.chars().all(|c| c.is_ascii_alphanumeric()) {
                continue;
            }
            match db.media(&e.alert_id, MediaKind::Face)? {
                Some(jpeg) => {
                    let name = format!("{}.jpg", e.alert_id);
                    std::fs::write(out.join(&name), jpeg)
                        .with_context(|| format!("writing {}", out.join(&name).display()))?;
                    let unit = format!("{}/{}", e.stream, e.track_id).replace(['"', ','], "_");
                    list.push_str(&format!("{name},real,,{unit}\n"));
                    written += 1;
                }
                None => {
                    list.push_str(&format!(
                        "# {}: no face crop stored (its stream had store_media = false)\n",
                        e.alert_id
                    ));
                    without += 1;
                }
            }
        }
    }
    std::fs::write(out.join("list.csv"), list)
        .with_context(|| format!("writing {}", out.join("list.csv").display()))?;
    Ok((written, without))
}
