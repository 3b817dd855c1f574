//! Datasets: MNIST-style idx folders (the vendored `data/mnist-10k`, or any
//! standard MNIST / Fashion-MNIST folder via `--data-dir`).

use std::path::Path;

use anyhow::{Context, bail};
use ndarray::{Array2, Axis};

/// Images as `[n, 784]` in [0, 1] and labels.
#[derive(Clone, Debug)]
pub struct Split {
    /// `[n, pixels]`.
    pub x: Array2<f32>,
    /// Class labels.
    pub y: Vec<usize>,
}

impl Split {
    /// The first `n` samples.
    pub fn take(&self, n: usize) -> Split {
        let n = n.min(self.y.len());
        Split {
            x: self.x.slice(ndarray::s![..n, ..]).to_owned(),
            y: self.y[..n].to_vec(),
        }
    }

    /// Rows `idx`.
    pub fn rows(&self, idx: &[usize]) -> Split {
        Split {
            x: self.x.select(Axis(0), idx),
            y: idx.iter().map(|&i| self.y[i]).collect(),
        }
    }
}

fn find(dir: &Path, stems: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    for s in stems {
        for ext in ["", ".gz"] {
            let p = dir.join(format!("{s}{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!("{}: none of {:?} (.gz or not) found", dir.display(), stems)
}

fn load_split(dir: &Path, images: &[&str], labels: &[&str]) -> anyhow::Result<Split> {
    let ip = find(dir, images)?;
    let lp = find(dir, labels)?;
    let img = crate::idx::read_idx(&ip)?
        .into_u8()
        .with_context(|| format!("{}: not u8 images", ip.display()))?;
    let lab = crate::idx::read_idx(&lp)?
        .into_u8()
        .with_context(|| format!("{}: not u8 labels", lp.display()))?;
    let n = img.shape()[0];
    if lab.len() != n {
        bail!(
            "{} has {n} images but {} has {} labels",
            ip.display(),
            lp.display(),
            lab.len()
        );
    }
    let pixels = img.len() / n.max(1);
    let x = Array2::from_shape_vec((n, pixels), img.iter().map(|&v| v as f32 / 255.0).collect())?;
    Ok(Split {
        x,
        y: lab.iter().map(|&v| v as usize).collect(),
    })
}

/// Train and test splits of an idx folder.
pub fn mnist(dir: &Path) -> anyhow::Result<(Split, Split)> {
    Ok((
        load_split(
            dir,
            &["train-images-idx3-ubyte", "train-images.idx3-ubyte"],
            &["train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
        )?,
        load_split(
            dir,
            &["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
            &["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
        )?,
    ))
}

/// The vendored MNIST-10k folder (relative to the workspace root or this crate).
pub fn default_mnist_dir() -> std::path::PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist-10k");
    if Path::new("data/mnist-10k").is_dir() {
        "data/mnist-10k".into()
    } else {
        here
    }
}
