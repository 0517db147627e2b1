use super::*;

fn ffpp_scorer_with_logits() -> (LabelGraph, impl Fn(&[f64]) -> FaceScore) {
    let g = LabelGraph::ffpp();
    let n = g.len();
    // Identity text embeddings (dim = n) make f_j = e_j / 10, so logits are set directly.
    let mut text = vec![0.0f32; n * n];
    for j in 0..n {
        text[j * n + j] = 1.0;
    }
    let s = Scorer::new(g.clone(), &text, n).unwrap();
    (g, move |f: &[f64]| {
        let e: Vec<f32> = f.iter().map(|v| (*v * 10.0) as f32).collect();
        s.score(&e).unwrap()
    })
}

fn assert_close(a: &FaceScore, b: &FaceScore, tol: f64) {
    let pairs = [(a.log_z, b.log_z), (a.logit_q0, b.logit_q0), (a.q0, b.q0)];
    for (x, y) in pairs {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{x} vs {y}\n{a:?}\n{b:?}"
        );
    }
    for (x, y) in a.marginals.iter().zip(&b.marginals) {
        assert!((x - y).abs() <= tol, "marginal {x} vs {y}");
    }
}

#[test]
fn a_one_node_graph_gives_the_sigmoid() {
    let g = LabelGraph::new(
        vec![LabelNode {
            name: "fake".into(),
            level: Level::Root,
        }],
        vec![],
    )
    .unwrap();
    assert_eq!(g.states(), &[0, 1]);
    let s = Scorer::new(g, &[1.0], 1).unwrap();
    for f in [-30.0f64, -2.5, 0.0, 0.7, 12.0] {
        let r = s.score(&[(f * 10.0) as f32]).unwrap();
        let sig = 1.0 / (1.0 + (-f).exp());
        assert!((r.q0 - sig).abs() < 1e-12);
        assert!((r.logit_q0 - f).abs() < 1e-12);
        assert!((r.log_z - (1.0 + f.exp()).ln()).abs() < 1e-12);
    }
}

#[test]
fn zero_logits_give_q0_of_one_minus_one_over_the_state_count() {
    for g in [LabelGraph::ffpp(), LabelGraph::ffsc()] {
        let n = g.len();
        let s = Scorer::new(g.clone(), &vec![0.5; n * 4], 4).unwrap();
        let r = s.score_logits(vec![0.0; n]);
        let states = g.states().len() as f64;
        assert!((r.q0 - (1.0 - 1.0 / states)).abs() < 1e-14, "{}", r.q0);
        assert!((r.log_z - states.ln()).abs() < 1e-12);
        assert!((r.logit_q0 - (states - 1.0).ln()).abs() < 1e-12);
    }
    let (_, score) = ffpp_scorer_with_logits();
    assert!((score(&[0.0; 10]).q0 - 250.0 / 251.0).abs() < 1e-14);
}

#[test]
fn matches_brute_force_on_random_logits() {
    let mut x: u64 = 42;
    let mut rnd = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    for g in [LabelGraph::ffpp(), LabelGraph::ffsc()] {
        let n = g.len();
        let s = Scorer::new(g.clone(), &vec![0.0; n], 1).unwrap();
        for scale in [0.1, 1.0, 5.0, 40.0, 300.0] {
            for _ in 0..50 {
                let f: Vec<f64> = (0..n).map(|_| rnd() * scale).collect();
                assert_close(&s.score_logits(f.clone()), &brute_force(&g, &f), 1e-12);
            }
        }
    }
}

#[test]
fn reordering_nodes_permutes_the_marginals() {
    // FF++ with its globals and regions listed in another order (root stays first).
    let g = LabelGraph::ffpp();
    let order = [0usize, 3, 1, 2, 9, 6, 8, 4, 7, 5]; // new position i holds old node order[i]
    let nodes = order.iter().map(|&o| g.nodes()[o].clone()).collect();
    let pos = |old: usize| order.iter().position(|&o| o == old).unwrap();
    let edges = g.edges().iter().map(|&(a, b)| (pos(a), pos(b))).collect();
    let h = LabelGraph::new(nodes, edges).unwrap();
    assert_eq!(h.states().len(), 251);
    let f = [0.3, -1.2, 2.0, 0.1, -0.4, 1.5, 0.0, -2.2, 0.9, 0.35];
    let a = Scorer::new(g.clone(), &[0.0; 10], 1)
        .unwrap()
        .score_logits(f.to_vec());
    let fh: Vec<f64> = order.iter().map(|&o| f[o]).collect();
    let b = Scorer::new(h, &[0.0; 10], 1).unwrap().score_logits(fh);
    assert!((a.log_z - b.log_z).abs() < 1e-12);
    for (i, &o) in order.iter().enumerate() {
        assert!((b.marginals[i] - a.marginals[o]).abs() < 1e-12);
    }
}

#[test]
fn extreme_logits_stay_finite_and_correct() {
    let (g, score) = ffpp_scorer_with_logits();
    // Everything strongly fake: the all-on state dominates.
    let r = score(&[1e4; 10]);
    assert!(
        (r.log_z - 1e5).abs() < 1e-6 && (r.logit_q0 - 1e5).abs() < 1e-6,
        "{r:?}"
    );
    assert_eq!(r.q0, 1.0);
    assert!(r.marginals.iter().all(|&q| (q - 1.0).abs() < 1e-12));
    // Everything strongly real: Z = 1 + tiny, logit(q0) = best non-zero state's score.
    let r = score(&[-1e4; 10]);
    assert!(r.log_z.abs() < 1e-300);
    // The best non-zero state is the root alone (legal: globals may all be off): -1e4.
    assert!((r.logit_q0 + 1e4).abs() < 1e-6, "{r:?}");
    assert!(
        r.marginals
            .iter()
            .all(|q| q.is_finite() && *q >= 0.0 && *q < 1e-300)
    );
    // Mixed: fake root, one strong global/region pair.
    let mut f = [-1e4; 10];
    f[0] = 1e4;
    f[2] = 1e4; // identity
    f[7] = 1e4; // mouth
    let r = score(&f);
    let b = brute_force(&g, &f);
    assert!((r.logit_q0 - 3e4).abs() < 1e-6);
    assert_close(&r, &b, 1e-9);
    assert!((r.marginals[2] - 1.0).abs() < 1e-12 && r.marginals[4] < 1e-300);
    // q0 saturates to 1.0 once log Z passes ~37, but the logit keeps the evidence.
    let r = score(&[4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]);
    assert_eq!(r.q0, 1.0);
    assert!(r.logit_q0 > 37.0 && r.logit_q0.is_finite());
}

#[test]
fn shape_and_value_errors_are_reported() {
    let g = LabelGraph::ffpp();
    assert!(matches!(
        Scorer::new(g.clone(), &[0.0; 9], 1),
        Err(ScoreError::TextShape { .. })
    ));
    let mut t = vec![0.0f32; 20];
    t[13] = f32::NAN;
    assert_eq!(
        Scorer::new(g.clone(), &t, 2).unwrap_err(),
        ScoreError::TextNotFinite { node: 6, dim: 1 }
    );
    let s = Scorer::new(g, &[0.0; 20], 2).unwrap();
    assert!(matches!(
        s.score(&[0.0; 3]),
        Err(ScoreError::EmbeddingDim { got: 3, want: 2 })
    ));
    assert_eq!(
        s.score(&[0.0, f32::INFINITY]),
        Err(ScoreError::EmbeddingNotFinite(1))
    );
}

#[test]
fn explanation_names_the_attribute_and_regions_in_plain_words() {
    let (g, score) = ffpp_scorer_with_logits();
    let s = Scorer::new(g, &[0.0; 10], 1).unwrap();
    let mut f = [-3.0; 10];
    f[0] = 4.0;
    f[2] = 3.0; // identity
    f[7] = 3.5; // mouth
    f[6] = 2.0; // lip
    let r = score(&f);
    let e = s.explain(&r);
    assert!(
        e.sentence.starts_with("face likely manipulated"),
        "{}",
        e.sentence
    );
    assert!(
        e.sentence.contains("identity likely altered"),
        "{}",
        e.sentence
    );
    assert!(
        e.sentence.contains("strongest regions: mouth"),
        "{}",
        e.sentence
    );
    assert_eq!(e.attributes[0].name, "identity");
    assert_eq!(e.regions[0].name, "mouth");
    assert_eq!(e.attributes.len(), 3);
    assert_eq!(e.regions.len(), 6);
    let calm = score(&[-6.0; 10]);
    assert!(
        s.explain(&calm)
            .sentence
            .starts_with("no sign of manipulation")
    );
}
