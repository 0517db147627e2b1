//! Non-maximum suppression.

use crate::types::BBox;

/// How overlap is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nms {
    /// Intersection over union.
    Union,
    /// Intersection over the smaller box (suppresses boxes nested in others).
    Min,
}

/// Indices of the boxes kept, best score first: each box suppresses the lower-scored boxes
/// that overlap it by more than `threshold`. `inclusive` counts box edges as pixels
/// (`w = x1 - x0 + 1`), as MTCNN's lineage does.
pub fn nms(
    boxes: &[BBox],
    scores: &[f32],
    threshold: f32,
    kind: Nms,
    inclusive: bool,
) -> Vec<usize> {
    let one = if inclusive { 1.0 } else { 0.0 };
    let area = |b: &BBox| ((b.x1 - b.x0 + one).max(0.0)) * ((b.y1 - b.y0 + one).max(0.0));
    let mut order: Vec<usize> = (0..boxes.len().min(scores.len())).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep = Vec::new();
    let mut dead = vec![false; boxes.len()];
    for (n, &i) in order.iter().enumerate() {
        if dead[i] {
            continue;
        }
        keep.push(i);
        let a = &boxes[i];
        for &j in &order[n + 1..] {
            if dead[j] {
                continue;
            }
            let b = &boxes[j];
            let iw = (a.x1.min(b.x1) - a.x0.max(b.x0) + one).max(0.0);
            let ih = (a.y1.min(b.y1) - a.y0.max(b.y0) + one).max(0.0);
            let inter = iw * ih;
            let o = match kind {
                Nms::Union => inter / (area(a) + area(b) - inter),
                Nms::Min => inter / area(a).min(area(b)),
            };
            if o > threshold {
                dead[j] = true;
            }
        }
    }
    keep
}

/// Intersection over union of two boxes (pixel edges, not inclusive).
pub fn iou(a: &BBox, b: &BBox) -> f32 {
    let iw = (a.x1.min(b.x1) - a.x0.max(b.x0)).max(0.0);
    let ih = (a.y1.min(b.y1) - a.y0.max(b.y0)).max(0.0);
    let inter = iw * ih;
    let u = a.area() + b.area() - inter;
    if u > 0.0 { inter / u } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x0: f32, y0: f32, x1: f32, y1: f32) -> BBox {
        BBox { x0, y0, x1, y1 }
    }

    #[test]
    fn overlapping_lower_scores_are_suppressed() {
        let boxes = [
            b(0., 0., 10., 10.),
            b(1., 1., 11., 11.),
            b(20., 20., 30., 30.),
            b(2., 2., 5., 5.),
        ];
        let scores = [0.8, 0.9, 0.7, 0.95];
        // Union: the nested small box barely overlaps by IoU and survives.
        assert_eq!(nms(&boxes, &scores, 0.5, Nms::Union, false), vec![3, 1, 2]);
        // Min: the nested box is wholly inside box 1, which it suppresses (higher score).
        assert_eq!(nms(&boxes, &scores, 0.5, Nms::Min, false), vec![3, 2]);
        assert!((iou(&boxes[0], &boxes[0]) - 1.0).abs() < 1e-6);
        assert_eq!(iou(&boxes[0], &boxes[2]), 0.0);
    }
}
