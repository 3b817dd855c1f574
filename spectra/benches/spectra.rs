//! `cargo bench -p spectra`: singular values at typical layer sizes, the
//! ridge least-squares solve of the `pleas` study, and the full report of
//! all-MiniLM-L6-v2 (when `scripts/fetch-models.sh` has run).
//! `python3 spectra/benches/reference.py` times numpy/LAPACK and
//! WeightWatcher's fit on the same inputs.

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::Array2;
use spectra::linalg::{ridge_least_squares, singular_values};
use spectra::report::{ReportOptions, analyze_source};
use weights::rng::Rng;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("singular_values_f32");
    g.sample_size(10);
    for &(m, n) in &[(768usize, 768usize), (768, 3072), (2048, 2048)] {
        let mut rng = Rng::new(1);
        let a = rng.normal_array((m, n));
        g.bench_function(format!("{m}x{n}"), |b| {
            b.iter(|| singular_values(a.view(), "a").unwrap())
        });
    }
    g.finish();

    // PLeaS's per-layer solve at the `pleas` study's default size: 2,000
    // samples, 512·2 + 1 inputs, 1,024 targets.
    let mut g = c.benchmark_group("ridge_least_squares_f64");
    g.sample_size(10);
    let mut rng = Rng::new(2);
    let x = Array2::from_shape_fn((2000, 1025), |_| rng.normal());
    let y = Array2::from_shape_fn((2000, 1024), |_| rng.normal());
    g.bench_function("2000x1025_to_1024", |b| {
        b.iter(|| ridge_least_squares(x.view(), y.view(), 1.0, "x").unwrap())
    });
    g.finish();

    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2/model.safetensors");
    if path.is_file() {
        let ckpt = weights::Checkpoint::open(&path).unwrap();
        let mut g = c.benchmark_group("report");
        g.sample_size(10);
        g.bench_function("all-MiniLM-L6-v2", |b| {
            b.iter(|| analyze_source(&ckpt, &ReportOptions::default(), &|_, _, _| {}).unwrap())
        });
        let farms = ReportOptions {
            farms: Some(Default::default()),
            ..Default::default()
        };
        g.bench_function("all-MiniLM-L6-v2+farms", |b| {
            b.iter(|| analyze_source(&ckpt, &farms, &|_, _, _| {}).unwrap())
        });
        g.finish();
    } else {
        eprintln!("skipping the MiniLM report: {} not found", path.display());
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
