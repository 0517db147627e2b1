//! `dfwatch bench score`: label-graph scoring speed on one core, FFSC graph (1544 legal
//! states), `E T^T` product included, beside the brute-force reference in the same run, with
//! an equality check over every face.

use std::hint::black_box;
use std::time::Instant;

use anyhow::bail;

use dfwatch::score::{LabelGraph, Scorer, brute_force};

const DIM: usize = 512;

fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// `dfwatch bench score`: label-graph scoring on the FFSC graph beside brute force.
#[derive(clap::Parser)]
struct Args {
    /// Faces scored.
    #[arg(long, default_value_t = 200_000)]
    faces: usize,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Args { faces } = super::parse_args("score", args);
    let graph = LabelGraph::ffsc();
    let n = graph.len();
    let mut seed = 7u64;
    // Text rows of CLIP-like norm (~10) and image embeddings of norm ~10: logits of order 1-10.
    let text: Vec<f32> = (0..n * DIM).map(|_| lcg(&mut seed) * 0.77).collect();
    let scorer = Scorer::new(graph.clone(), &text, DIM)?;
    let pool = 1024;
    let embeddings: Vec<Vec<f32>> = (0..pool)
        .map(|_| (0..DIM).map(|_| lcg(&mut seed) * 0.77).collect())
        .collect();

    // Equality with brute force on every embedding of the pool.
    let mut worst: f64 = 0.0;
    for e in &embeddings {
        let fast = scorer.score(e)?;
        let slow = brute_force(&graph, &fast.logits);
        let rel = |a: f64, b: f64| (a - b).abs() / (1.0 + b.abs());
        worst = worst
            .max(rel(fast.log_z, slow.log_z))
            .max(rel(fast.logit_q0, slow.logit_q0));
        for (a, b) in fast.marginals.iter().zip(&slow.marginals) {
            worst = worst.max((a - b).abs());
        }
    }

    let t0 = Instant::now();
    for i in 0..faces {
        black_box(scorer.score(black_box(&embeddings[i % pool]))?);
    }
    let fast_s = t0.elapsed().as_secs_f64();
    let t2 = Instant::now();
    for i in 0..faces {
        black_box(scorer.logits(black_box(&embeddings[i % pool]))?);
    }
    let logits_s = t2.elapsed().as_secs_f64();
    let brute_faces = (faces / 20).max(100);
    let t1 = Instant::now();
    for i in 0..brute_faces {
        let logits = scorer.logits(&embeddings[i % pool])?;
        black_box(brute_force(&graph, black_box(&logits)));
    }
    let brute_s = t1.elapsed().as_secs_f64();
    let fast_rate = faces as f64 / fast_s;
    let brute_rate = brute_faces as f64 / brute_s;
    println!(
        "bench score: FFSC graph ({} legal states), {DIM}-d embeddings, one thread",
        graph.states().len()
    );
    println!("{:<34} {:>14} {:>14}", "variant", "faces/s", "us/face");
    println!(
        "{:<34} {:>14.0} {:>14.2}",
        "brute force (std exp, per node)",
        brute_rate,
        1e6 / brute_rate
    );
    println!(
        "{:<34} {:>14.0} {:>14.2}",
        "  of which E T^T (logits) alone",
        faces as f64 / logits_s,
        1e6 * logits_s / faces as f64
    );
    println!(
        "{:<34} {:>14.0} {:>14.2}",
        "dfwatch scorer (E T^T included)",
        fast_rate,
        1e6 / fast_rate
    );
    println!(
        "largest difference from brute force over {pool} faces: {worst:.2e} (log Z and \
         logit relative, marginals absolute)"
    );
    println!(
        "target >= 200,000 faces/s: {}",
        if fast_rate >= 200_000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    if worst > 1e-9 {
        bail!("scorer differs from brute force by {worst:e}");
    }
    Ok(())
}
