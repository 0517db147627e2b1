//! The page a person reads of an [`EvalReport`]: one self-contained HTML file (inline SVG, no
//! script, no network) with the ROC curves, the score histograms per label and the tables.

use std::fmt::Write;

use super::eval_report::{EvalReport, LevelMetrics};
use super::metrics::Estimate;

/// Rows of the per-file table shown (the JSON report has them all).
const MAX_FILE_ROWS: usize = 2000;
const BINS: usize = 20;
const MAX_ROC_POINTS: usize = 2000;

/// Escapes text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

fn est(e: &Option<Estimate>) -> String {
    match e {
        Some(e) if e.resamples > 0 => format!(
            "{:.4} <small>[{:.4}, {:.4}]</small>",
            e.value, e.low, e.high
        ),
        Some(e) => format!("{:.4}", e.value),
        None => "&ndash;".into(),
    }
}

/// The ROC of both levels in one 320x320 plot.
fn roc_svg(levels: &[(&str, &LevelMetrics, &str)]) -> String {
    let (w, pad) = (320.0, 36.0);
    let side = w - 2.0 * pad;
    let mut s = format!(
        "<svg viewBox=\"0 0 {w} {w}\" width=\"{w}\" height=\"{w}\" role=\"img\" \
         aria-label=\"ROC curves\"><rect x=\"{pad}\" y=\"{pad}\" width=\"{side}\" \
         height=\"{side}\" fill=\"none\" stroke=\"#888\"/><line x1=\"{pad}\" y1=\"{}\" \
         x2=\"{}\" y2=\"{pad}\" stroke=\"#ccc\" stroke-dasharray=\"4\"/>",
        pad + side,
        pad + side
    );
    for (name, l, colour) in levels {
        if l.roc.is_empty() {
            continue;
        }
        // At most about MAX_ROC_POINTS points drawn (frame-level curves have one per
        // distinct score), the last always.
        let step = l.roc.len().div_ceil(MAX_ROC_POINTS).max(1);
        let last = l.roc.len() - 1;
        let pts: Vec<String> = l
            .roc
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i == last)
            .map(|(_, p)| p)
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    pad + p.fpr * side,
                    pad + (1.0 - p.tpr) * side
                )
            })
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
            pts.join(" "),
            esc(name)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"12\">false-positive rate</text>\
         <text x=\"12\" y=\"{}\" font-size=\"12\" transform=\"rotate(-90 12 {})\" \
         text-anchor=\"middle\">true-positive rate</text>",
        w / 2.0,
        w - 8.0,
        w / 2.0,
        w / 2.0
    );
    let mut y = pad + side - 8.0 - 16.0 * levels.len() as f64;
    for (name, l, colour) in levels {
        y += 16.0;
        let auc = l
            .auc
            .map(|a| format!(" (AUC {:.3})", a.value))
            .unwrap_or_default();
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{y}\" font-size=\"12\" fill=\"{colour}\">{}{auc}</text>",
            pad + side * 0.35,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// Histograms of the per-file scores, one colour per label.
fn histogram_svg(real: &[f64], fake: &[f64]) -> String {
    let (w, h, pad) = (420.0, 240.0, 30.0);
    let count = |v: &[f64]| {
        let mut bins = [0usize; BINS];
        for &x in v {
            let b = ((x.clamp(0.0, 1.0) * BINS as f64) as usize).min(BINS - 1);
            bins[b] += 1;
        }
        bins
    };
    let (r, f) = (count(real), count(fake));
    let top = r.iter().chain(&f).copied().max().unwrap_or(1).max(1) as f64;
    let bw = (w - 2.0 * pad) / BINS as f64;
    let plot_h = h - 2.0 * pad;
    let mut s = format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" \
         aria-label=\"score histograms\"><line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" \
         stroke=\"#888\"/>",
        h - pad,
        w - pad,
        h - pad
    );
    for (bins, colour, shift, label) in [(&r, "#2b7bb9", 0.0, "real"), (&f, "#c0392b", 0.5, "fake")]
    {
        for (i, &n) in bins.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let bh = n as f64 / top * plot_h;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{colour}\" \
                 fill-opacity=\"0.8\"><title>{label} {:.2}-{:.2}: {n}</title></rect>",
                pad + (i as f64 + shift) * bw,
                h - pad - bh,
                bw / 2.0,
                i as f64 / BINS as f64,
                (i + 1) as f64 / BINS as f64
            );
        }
    }
    let _ = write!(
        s,
        "<text x=\"{pad}\" y=\"{}\" font-size=\"11\">0</text><text x=\"{}\" y=\"{}\" \
         font-size=\"11\" text-anchor=\"end\">1</text><text x=\"{}\" y=\"{}\" font-size=\"12\" \
         text-anchor=\"middle\">score (mean q0); blue real ({}), red fake ({})</text></svg>",
        h - pad + 14.0,
        w - pad,
        h - pad + 14.0,
        w / 2.0,
        h - 4.0,
        real.len(),
        fake.len()
    );
    s
}

fn level_row(name: &str, l: &LevelMetrics) -> String {
    format!(
        "<tr><th>{name}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        l.real,
        l.fake,
        est(&l.auc),
        est(&l.ap),
        est(&l.eer),
        est(&l.accuracy_at_0_5)
    )
}

/// The page.
pub fn render(r: &EvalReport) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>dfwatch eval: {}</title>\
         <style>body{{font:14px/1.4 sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}small{{color:#666}}\
         .plots{{display:flex;gap:2em;flex-wrap:wrap}}</style></head><body>",
        esc(&r.list)
    );
    let m = &r.model;
    let _ = write!(
        s,
        "<h1>dfwatch eval</h1><p>List <code>{}</code>; model <b>{}</b> {} (manifest {}{}); detector {}.</p>\
         <p>{}</p><p>{} files in {} units; {} without a face, {} failed, {} from the cache. \
         Intervals: bootstrap, {} resamples, seed {}.</p>",
        esc(&r.list),
        esc(&m.name),
        esc(&m.version),
        esc(&m.manifest_sha256[..m.manifest_sha256.len().min(12)]),
        if m.trained {
            ""
        } else {
            "; <b>synthetic, untrained: these scores mean nothing</b>"
        },
        esc(&r.detector),
        esc(&r.protocol),
        r.counts.files,
        r.counts.units,
        r.counts.no_face,
        r.counts.failed,
        r.counts.cached,
        r.bootstrap.resamples,
        r.bootstrap.seed
    );
    s.push_str(
        "<table><tr><th>level</th><th>real</th><th>fake</th><th>AUC</th><th>AP</th><th>EER</th>\
         <th>accuracy at 0.5</th></tr>",
    );
    s.push_str(&level_row("video", &r.video_level));
    s.push_str(&level_row("frame", &r.frame_level));
    s.push_str("</table><div class=\"plots\">");
    s.push_str(&roc_svg(&[
        ("video level", &r.video_level, "#c0392b"),
        ("frame level", &r.frame_level, "#2b7bb9"),
    ]));
    let by = |fake: bool| -> Vec<f64> {
        r.files
            .iter()
            .filter(|f| (f.label == "fake") == fake)
            .filter_map(|f| f.score)
            .collect()
    };
    s.push_str(&histogram_svg(&by(false), &by(true)));
    s.push_str("</div>");
    if !r.per_method.is_empty() {
        s.push_str("<h2>Per method (its fakes against every real video)</h2><table><tr><th>method</th><th>fake</th><th>real</th><th>AUC</th></tr>");
        for pm in &r.per_method {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&pm.method),
                pm.fake,
                pm.real,
                est(&pm.auc)
            );
        }
        s.push_str("</table>");
    }
    if !r.explanations.is_empty() {
        s.push_str(
            "<h2>Explanations against what each method alters</h2><table><tr><th>method</th>\
             <th>videos</th><th>alters</th><th>attribute named</th><th>attribute right</th>\
             <th>region precision</th><th>region recall</th></tr>",
        );
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or("&ndash;".into());
        for e in &r.explanations {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.method),
                e.units,
                esc(&e.altered.join(", ")),
                e.attribute_named,
                e.attribute_correct,
                opt(e.region_precision),
                opt(e.region_recall)
            );
        }
        s.push_str("</table>");
    }
    s.push_str("<h2>Definitions</h2><dl>");
    for (k, v) in &r.definitions {
        let _ = write!(s, "<dt><b>{}</b></dt><dd>{}</dd>", esc(k), esc(v));
    }
    s.push_str("</dl><h2>Files</h2><table><tr><th>path</th><th>label</th><th>method</th><th>score</th><th>frames scored</th><th>named</th><th>error</th></tr>");
    for f in r.files.iter().take(MAX_FILE_ROWS) {
        let named = f
            .named_attribute
            .iter()
            .chain(&f.named_regions)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{}</td><td>{}</td></tr>",
            esc(&f.path),
            f.label,
            esc(f.method.as_deref().unwrap_or("")),
            f.score
                .map(|v| format!("{v:.4}"))
                .unwrap_or("&ndash;".into()),
            f.frames_scored,
            f.frames_sampled,
            esc(&named),
            esc(f.error.as_deref().unwrap_or(""))
        );
    }
    s.push_str("</table>");
    if r.files.len() > MAX_FILE_ROWS {
        let _ = write!(
            s,
            "<p>{} more files in the JSON report.</p>",
            r.files.len() - MAX_FILE_ROWS
        );
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<script>\"a\"&'b'\u{7}"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;\u{fffd}"
        );
    }

    #[test]
    fn histogram_counts_every_score_once() {
        let svg = histogram_svg(&[0.0, 0.04, 0.5], &[1.0, 0.99]);
        assert!(svg.contains("real 0.00-0.05: 2"), "{svg}");
        assert!(svg.contains("real 0.50-0.55: 1"), "{svg}");
        assert!(svg.contains("fake 0.95-1.00: 2"), "{svg}");
        assert!(svg.contains("blue real (3), red fake (2)"));
    }
}
