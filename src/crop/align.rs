//! Alignment geometry of SJEDD's crop (SJEDD.md section 1): the template the five landmarks
//! are mapped to, and the least-squares similarity transform that maps them.

/// ArcFace's 112 x 112 five-point template (image-left eye, image-right eye, nose tip,
/// image-left and image-right mouth corner).
pub const ARCFACE_112: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// Side of the reference warp's output.
pub const WARP_SIZE: usize = 317;

/// Margin factor of the reference crop: 0.3 of the side, split over both edges.
const MARGIN: f64 = 0.3;

/// SJEDD's destination points in the 317 x 317 warp: the ArcFace template scaled by 317/112,
/// shifted by 317 * 0.3 / 2 = 47.55, then scaled by 317 / (317 + 2 * 47.55).
pub fn sjedd_template() -> [[f64; 2]; 5] {
    let size = WARP_SIZE as f64;
    let shift = size * MARGIN / 2.0;
    let shrink = size / (size + 2.0 * shift);
    ARCFACE_112.map(|[x, y]| {
        [
            (x * size / 112.0 + shift) * shrink,
            (y * size / 112.0 + shift) * shrink,
        ]
    })
}

/// A 2 x 3 affine map: `[x', y'] = [[a, b, c], [d, e, f]] * [x, y, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine(pub [[f64; 3]; 2]);

impl Affine {
    pub fn identity() -> Self {
        Affine([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    }

    pub fn scale(s: f64) -> Self {
        Affine([[s, 0.0, 0.0], [0.0, s, 0.0]])
    }

    pub fn apply(&self, [x, y]: [f64; 2]) -> [f64; 2] {
        let m = &self.0;
        [
            m[0][0] * x + m[0][1] * y + m[0][2],
            m[1][0] * x + m[1][1] * y + m[1][2],
        ]
    }

    /// `self` after `first`: `x -> self(first(x))`.
    pub fn after(&self, first: &Affine) -> Affine {
        let (a, b) = (&self.0, &first.0);
        let mut m = [[0.0; 3]; 2];
        for (r, row) in m.iter_mut().enumerate() {
            row[0] = a[r][0] * b[0][0] + a[r][1] * b[1][0];
            row[1] = a[r][0] * b[0][1] + a[r][1] * b[1][1];
            row[2] = a[r][0] * b[0][2] + a[r][1] * b[1][2] + a[r][2];
        }
        Affine(m)
    }

    /// The inverse map, or `None` when the map is singular.
    pub fn inverse(&self) -> Option<Affine> {
        let m = &self.0;
        let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
        if det.abs() < 1e-12 || !det.is_finite() {
            return None;
        }
        let d = 1.0 / det;
        let (a, b, c, e) = (m[1][1] * d, -m[0][1] * d, -m[1][0] * d, m[0][0] * d);
        Some(Affine([
            [a, b, -a * m[0][2] - b * m[1][2]],
            [c, e, -c * m[0][2] - e * m[1][2]],
        ]))
    }

    /// Scale factor of a similarity map.
    pub fn similarity_scale(&self) -> f64 {
        (self.0[0][0] * self.0[1][1] - self.0[0][1] * self.0[1][0])
            .abs()
            .sqrt()
    }
}

/// Least-squares similarity transform (rotation, uniform scale, translation; no reflection)
/// mapping `src` onto `dst`, as scikit-image's `SimilarityTransform.estimate` (Umeyama) finds.
/// In closed form: with centred points, `a = sum(s . d) / sum(|s|^2)` and
/// `b = sum(s x d) / sum(|s|^2)` give the matrix `[[a, -b], [b, a]]`. `None` when the source
/// points coincide.
pub fn estimate_similarity(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Option<Affine> {
    let n = src.len().min(dst.len());
    if n < 2 {
        return None;
    }
    let mean = |p: &[[f64; 2]]| {
        let (sx, sy) = p[..n]
            .iter()
            .fold((0.0, 0.0), |(a, b), q| (a + q[0], b + q[1]));
        [sx / n as f64, sy / n as f64]
    };
    let (ms, md) = (mean(src), mean(dst));
    let (mut dot, mut cross, mut norm) = (0.0, 0.0, 0.0);
    for (s, d) in src[..n].iter().zip(&dst[..n]) {
        let (sx, sy) = (s[0] - ms[0], s[1] - ms[1]);
        let (dx, dy) = (d[0] - md[0], d[1] - md[1]);
        dot += sx * dx + sy * dy;
        cross += sx * dy - sy * dx;
        norm += sx * sx + sy * sy;
    }
    if norm < 1e-12 {
        return None;
    }
    let (a, b) = (dot / norm, cross / norm);
    Some(Affine([
        [a, -b, md[0] - (a * ms[0] - b * ms[1])],
        [b, a, md[1] - (b * ms[0] + a * ms[1])],
    ]))
}

/// The reference truncates landmarks to integers (`astype(int)`, towards zero) before
/// estimating the transform.
pub fn truncate_landmarks(l: &[[f32; 2]; 5]) -> [[f64; 2]; 5] {
    l.map(|[x, y]| [f64::from(x).trunc(), f64::from(y).trunc()])
}

/// The alignment of a face: frame pixels -> 317 x 317 warp pixels.
pub fn sjedd_alignment(landmarks: &[[f32; 2]; 5]) -> Option<Affine> {
    estimate_similarity(&truncate_landmarks(landmarks), &sjedd_template())
}

/// Mean distance, in warp pixels, between the aligned landmarks and the template: how well
/// a detector's landmark convention fits the template.
pub fn alignment_residual(alignment: &Affine, landmarks: &[[f32; 2]; 5]) -> f64 {
    let t = sjedd_template();
    landmarks
        .iter()
        .zip(&t)
        .map(|(l, q)| {
            let p = alignment.apply([f64::from(l[0]), f64::from(l[1])]);
            ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)).sqrt()
        })
        .sum::<f64>()
        / 5.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_arcface_scaled_into_317_with_the_margin() {
        let t = sjedd_template();
        // Hand-computed: (38.2946 * 317 / 112 + 47.55) * 317 / 412.1.
        let x0 = (38.2946 * 317.0 / 112.0 + 47.55) * 317.0 / 412.1;
        assert!((t[0][0] - x0).abs() < 1e-12);
        assert!((t[0][0] - 119.9518).abs() < 1e-4, "{}", t[0][0]);
        // Symmetric about the centre column within the template's own asymmetry.
        assert!(((t[0][0] + t[1][0]) / 2.0 - 158.5).abs() < 1.0);
    }

    #[test]
    fn similarity_matches_a_hand_computed_case() {
        // dst = 2 * R(90 deg) * src + (10, 20): (x, y) -> (-2y + 10, 2x + 20).
        let src = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 2.0]];
        let dst = src.map(|[x, y]| [-2.0 * y + 10.0, 2.0 * x + 20.0]);
        let m = estimate_similarity(&src, &dst).unwrap();
        let want = [[0.0, -2.0, 10.0], [2.0, 0.0, 20.0]];
        for (got, want) in m.0.iter().flatten().zip(want.iter().flatten()) {
            assert!((got - want).abs() < 1e-12, "{m:?}");
        }
        assert!((m.similarity_scale() - 2.0).abs() < 1e-12);
        // Noisy points: the residual of the fit is below the residual of a perturbed fit.
        let noisy = [[10.3, 20.1], [9.8, 22.2], [8.1, 19.7], [5.9, 26.2]];
        let fit = estimate_similarity(&src, &noisy).unwrap();
        let cost = |m: &Affine| {
            src.iter()
                .zip(&noisy)
                .map(|(s, d)| {
                    let p = m.apply(*s);
                    (p[0] - d[0]).powi(2) + (p[1] - d[1]).powi(2)
                })
                .sum::<f64>()
        };
        let mut worse = fit;
        worse.0[0][2] += 0.01;
        assert!(cost(&fit) < cost(&worse));
    }

    #[test]
    fn composition_and_inverse_agree() {
        let a = Affine([[0.8, -0.3, 5.0], [0.3, 0.8, -2.0]]);
        let b = Affine([[1.5, 0.0, 1.0], [0.0, 1.5, 3.0]]);
        let p = [7.0, -4.0];
        let ab = a.after(&b).apply(p);
        let seq = a.apply(b.apply(p));
        assert!((ab[0] - seq[0]).abs() < 1e-12 && (ab[1] - seq[1]).abs() < 1e-12);
        let back = a.inverse().unwrap().apply(a.apply(p));
        assert!((back[0] - p[0]).abs() < 1e-12 && (back[1] - p[1]).abs() < 1e-12);
        assert!(Affine([[0.0; 3], [0.0; 3]]).inverse().is_none());
        assert!(estimate_similarity(&[[1.0, 1.0]; 5], &sjedd_template()).is_none());
    }
}
