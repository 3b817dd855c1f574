//! Character-level tasks for the LLaMA-style studies (`s2ft`, `merge`):
//! language modelling on a vendored corpus (task A, what pretraining
//! teaches and fine-tuning may forget) and small string-transduction tasks
//! (`prompt SEP answer\n`) whose answers are scored token by token.
//!
//! Tokens are ASCII bytes (vocabulary 128; other bytes become `?`). Every
//! batch is drawn from a seeded generator, so runs are reproducible and all
//! methods are evaluated on the same held-out sequences.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::activation::log_softmax;
use s2ft_core::Llama;
use s2ft_core::train::Batch;
use weights::rng::Rng;

/// Vocabulary size: ASCII.
pub const VOCAB: usize = 128;

/// ASCII bytes of `text` (`\r` dropped, any other byte above 127 becomes `?`).
pub fn ascii(text: &[u8]) -> Vec<u8> {
    text.iter()
        .filter(|&&b| b != b'\r')
        .map(|&b| if b < 128 { b } else { b'?' })
        .collect()
}

/// The vendored text folder (relative to the workspace root or this crate).
pub fn default_text_dir() -> PathBuf {
    if Path::new("data/text").is_dir() {
        "data/text".into()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/text")
    }
}

/// A held-out split of a corpus: the first 90 % trains, the rest tests.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Training text.
    pub train: Vec<u8>,
    /// Held-out text.
    pub test: Vec<u8>,
}

/// Reads `moby-dick.txt(.gz)` from `dir` as ASCII and splits it 90/10.
pub fn moby_dick(dir: &Path) -> anyhow::Result<Corpus> {
    let (plain, gz) = (dir.join("moby-dick.txt"), dir.join("moby-dick.txt.gz"));
    let raw = if plain.is_file() {
        std::fs::read(&plain).with_context(|| format!("reading {}", plain.display()))?
    } else if gz.is_file() {
        let bytes = std::fs::read(&gz).with_context(|| format!("reading {}", gz.display()))?;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: not a gzip file", gz.display()))?;
        out
    } else {
        bail!(
            "{}: neither moby-dick.txt nor moby-dick.txt.gz found (pass --data-dir)",
            dir.display()
        );
    };
    let text = ascii(&raw);
    ensure!(
        text.len() >= 10_000,
        "{}: the corpus has {} characters, too few to train on",
        dir.display(),
        text.len()
    );
    let cut = text.len() * 9 / 10;
    Ok(Corpus {
        train: text[..cut].to_vec(),
        test: text[cut..].to_vec(),
    })
}

/// A letter-transduction task: a stream of `x SEP y` items separated by
/// spaces (`a>A q>Q `), `x` a random lowercase letter and `y` its image; only
/// the `y`s are scored. Each task has its own separator, so a model holding
/// several tasks (after merging or adapter fusion) can tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Task {
    /// `a>A`: upper case.
    Upper,
    /// `a=b`: the next letter (`z=a`).
    Shift,
    /// `a<z`: the mirrored letter (`b<y`).
    Mirror,
}

impl Task {
    /// All tasks.
    pub const ALL: [Task; 3] = [Task::Upper, Task::Shift, Task::Mirror];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Task::Upper => "upper",
            Task::Shift => "shift",
            Task::Mirror => "mirror",
        }
    }

    /// The separator between a letter and its image.
    pub fn sep(self) -> u8 {
        match self {
            Task::Upper => b'>',
            Task::Shift => b'=',
            Task::Mirror => b'<',
        }
    }

    /// The image of lowercase letter `x`.
    pub fn answer(self, x: u8) -> u8 {
        match self {
            Task::Upper => x.to_ascii_uppercase(),
            Task::Shift => b'a' + (x - b'a' + 1) % 26,
            Task::Mirror => b'z' - (x - b'a'),
        }
    }

    /// One item (`x SEP y ` ) and, per byte, whether it is scored.
    pub fn example(self, rng: &mut Rng) -> ([u8; 4], [bool; 4]) {
        let x = b'a' + rng.below(26) as u8;
        (
            [x, self.sep(), self.answer(x), b' '],
            [false, false, true, false],
        )
    }
}

/// `b` sequences of `t + 1` tokens and the `[b, t]` mask of the predicted
/// positions that count (1.0) or not (0.0).
#[derive(Clone, Debug)]
pub struct Sample {
    /// Row-major `[b, t + 1]` token ids.
    pub tokens: Vec<i64>,
    /// Row-major `[b, t]` mask: position `j` predicts token `j + 1`.
    pub mask: Vec<f32>,
    /// Rows.
    pub b: usize,
    /// Predicted positions per row.
    pub t: usize,
}

impl Sample {
    /// Random windows of `text`, every position counted.
    pub fn text(text: &[u8], b: usize, t: usize, rng: &mut Rng) -> Sample {
        let mut tokens = Vec::with_capacity(b * (t + 1));
        for _ in 0..b {
            let start = rng.below(text.len() - t - 1);
            tokens.extend(text[start..start + t + 1].iter().map(|&c| c as i64));
        }
        Sample {
            tokens,
            mask: vec![1.0; b * t],
            b,
            t,
        }
    }

    /// Rows of back-to-back items of `task`, only answer tokens counted.
    pub fn task(task: Task, b: usize, t: usize, rng: &mut Rng) -> Sample {
        Sample::tasks(&[task], b, t, rng)
    }

    /// Rows of back-to-back items, row `i` of task `tasks[i % n]` (a
    /// multi-task batch; one task gives [`Sample::task`]'s rows).
    pub fn tasks(tasks: &[Task], b: usize, t: usize, rng: &mut Rng) -> Sample {
        assert!(!tasks.is_empty(), "Sample::tasks needs a task");
        let mut tokens = Vec::with_capacity(b * (t + 1));
        let mut mask = Vec::with_capacity(b * t);
        for i in 0..b {
            let task = tasks[i % tasks.len()];
            let (mut row, mut scored) = (Vec::new(), Vec::new());
            while row.len() < t + 1 {
                let (x, s) = task.example(rng);
                row.extend(x);
                scored.extend(s);
            }
            tokens.extend(row[..t + 1].iter().map(|&c| c as i64));
            mask.extend(scored[1..t + 1].iter().map(|&s| if s { 1.0 } else { 0.0 }));
        }
        Sample { tokens, mask, b, t }
    }

    /// As a training batch on `device`.
    pub fn to_batch<B: Backend>(&self, device: &B::Device) -> Batch<B> {
        Batch {
            tokens: Tensor::from_data(
                TensorData::new(self.tokens.clone(), [self.b, self.t + 1]),
                device,
            ),
            mask: Some(Tensor::from_data(
                TensorData::new(self.mask.clone(), [self.b, self.t]),
                device,
            )),
        }
    }
}

/// Loss and accuracy on the counted positions.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Eval {
    /// Mean cross-entropy (nats per token).
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub loss: f64,
    /// Share of counted positions whose argmax is the target.
    #[serde(deserialize_with = "crate::report::nan_if_null")]
    pub acc: f64,
}

/// [`Eval`] of `model` over `samples` (teacher forcing).
pub fn evaluate<B: Backend>(model: &Llama<B>, samples: &[Sample]) -> Eval {
    let device = model.embed_tokens.val().device();
    let (mut nll, mut hits, mut n) = (0f64, 0f64, 0f64);
    for s in samples {
        let tokens: Tensor<B, 2, Int> =
            Tensor::from_data(TensorData::new(s.tokens.clone(), [s.b, s.t + 1]), &device);
        let logits = model.forward(tokens.clone().narrow(1, 0, s.t));
        let logp = log_softmax(logits, 2);
        let target = tokens.narrow(1, 1, s.t).reshape([s.b, s.t, 1]);
        let lp: Vec<f32> = logp
            .clone()
            .gather(2, target.clone())
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32");
        let pred: Vec<i64> = logp
            .argmax(2)
            .equal(target)
            .int()
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int");
        for ((l, p), m) in lp.iter().zip(&pred).zip(&s.mask) {
            if *m > 0.0 {
                nll -= *l as f64;
                hits += *p as f64;
                n += 1.0;
            }
        }
    }
    let n = n.max(1.0);
    Eval {
        loss: nll / n,
        acc: hits / n,
    }
}

/// Fixed held-out samples: `count` batches drawn with `seed`.
pub fn held_out(count: usize, seed: u64, mut draw: impl FnMut(&mut Rng) -> Sample) -> Vec<Sample> {
    let mut rng = Rng::new(seed);
    (0..count).map(|_| draw(&mut rng)).collect()
}
