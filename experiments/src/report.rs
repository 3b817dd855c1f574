//! A study's report folder: `results/<study>/<run-id>/` with `report.md`,
//! `metrics.json` (the study's numbers plus a `run` record: command line, git
//! commit, backend, crate versions, wall time of each phase), CSV tables and
//! plots. Every file is written atomically, so an interrupted run leaves only
//! complete files.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::device::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The options every training study takes: the device, the report folder
/// and progress output (flattened into each study's arguments).
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// `cpu`, or `cuda` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Report folder (default: `results/<study>/<timestamp>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Continue the interrupted run in `--out` (its `metrics.partial.json`):
    /// what it finished is kept, the rest runs. Studies that cannot resume
    /// refuse it.
    #[arg(long)]
    pub resume: bool,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            device: "cpu".into(),
            out: None,
            quiet: false,
            resume: false,
        }
    }
}

impl RunArgs {
    /// The defaults, writing quietly to `out` (what tests and scripts want).
    pub fn quiet_to(out: impl Into<PathBuf>) -> Self {
        RunArgs {
            out: Some(out.into()),
            quiet: true,
            ..Default::default()
        }
    }

    /// Parses `--device` (naming `study` in the rebuild hint) and opens the
    /// report folder; refuses `--resume` (for studies that cannot resume).
    pub fn open(&self, study: &str) -> anyhow::Result<Run> {
        if self.resume {
            anyhow::bail!(
                "--resume: the `{study}` study cannot resume an interrupted run (`s2ft --model` and `merge --model` can)"
            );
        }
        let device = Device::parse(&self.device, study)?;
        Run::create(study, self.out.as_deref(), device, self.quiet)
    }

    /// [`RunArgs::open`] for a study that can resume: with `--resume`, the
    /// folder of `--out` reopened with its phases and wall time so far, and
    /// the `metrics.partial.json` it left (the study checks and reuses it).
    pub fn open_resumable(&self, study: &str) -> anyhow::Result<(Run, Option<Value>)> {
        if !self.resume {
            return Ok((self.open(study)?, None));
        }
        let device = Device::parse(&self.device, study)?;
        let Some(dir) = self.out.as_deref() else {
            anyhow::bail!("--resume needs --out DIR, the folder of the run to continue");
        };
        if dir.join("metrics.json").is_file() {
            anyhow::bail!(
                "--resume: {} holds a finished run (metrics.json); nothing to resume",
                dir.display()
            );
        }
        let p = dir.join("metrics.partial.json");
        let text = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "--resume: reading {} (the interrupted run's state)",
                p.display()
            )
        })?;
        let partial: Value =
            serde_json::from_str(&text).with_context(|| format!("reading {}", p.display()))?;
        let record: RunRecord = serde_json::from_value(partial["run"].clone())
            .with_context(|| format!("reading the run record of {}", p.display()))?;
        if record.study != study {
            anyhow::bail!(
                "--resume: {} holds a `{}` run, not `{study}`",
                dir.display(),
                record.study
            );
        }
        // Another backend, or the CPU's other matmul kernels, computes other
        // bits: a resumed run's kept rows and its new ones would not be one run's.
        if record.backend != device.label() {
            anyhow::bail!(
                "--resume: the interrupted run ran on {}, this one would on {}: {}",
                record.backend,
                device.label(),
                crate::device::resume_hint(&record.backend, device.label())
            );
        }
        let mut run = Run::create(study, Some(dir), device, self.quiet)?;
        run.earlier_seconds = record.wall_seconds;
        run.resumes = record.resumes + 1;
        run.phases = record
            .phases_seconds
            .into_iter()
            .map(|p| (p.phase, p.seconds))
            .collect();
        Ok((run, Some(partial)))
    }
}

/// A file a run reads, as a resumed run checks it was not replaced: its
/// size and modification time (a content hash would read every checkpoint
/// again, gigabytes for a real model's fine-tunes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The path, as the run was given it (a folder's files below it).
    pub path: PathBuf,
    /// Size in bytes.
    pub bytes: u64,
    /// Modification time, nanoseconds since 1970.
    pub modified_ns: u64,
}

/// Every file under `paths` (a file itself, a folder's files recursively,
/// hidden entries such as `.git` or `.cache` left out, each folder once
/// however many links lead to it), in path order. Links to files count
/// with their target's size and time (a Hugging Face cache's snapshot
/// links to its blobs).
pub fn input_files(paths: &[&Path]) -> anyhow::Result<Vec<InputFile>> {
    fn walk(
        path: &Path,
        seen: &mut std::collections::HashSet<PathBuf>,
        out: &mut Vec<InputFile>,
    ) -> anyhow::Result<()> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if meta.is_dir() {
            let real = std::fs::canonicalize(path)
                .with_context(|| format!("resolving {}", path.display()))?;
            if !seen.insert(real) {
                return Ok(());
            }
            let mut entries = std::fs::read_dir(path)
                .and_then(|d| {
                    d.map(|e| e.map(|e| e.path()))
                        .collect::<Result<Vec<_>, _>>()
                })
                .with_context(|| format!("listing {}", path.display()))?;
            entries.retain(|e| {
                !e.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            });
            entries.sort();
            for e in entries {
                walk(&e, seen, out)?;
            }
        } else {
            let modified = meta
                .modified()
                .with_context(|| format!("the modification time of {}", path.display()))?;
            out.push(InputFile {
                path: path.to_path_buf(),
                bytes: meta.len(),
                modified_ns: modified
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
            });
        }
        Ok(())
    }
    let (mut seen, mut out) = (std::collections::HashSet::new(), Vec::new());
    for p in paths {
        walk(p, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// Checks that `partial` (a `metrics.partial.json` read by
/// [`RunArgs::open_resumable`]) is this run's to continue: the same plan
/// ([`same_plan`]) and the same input files ([`same_inputs`]).
pub fn same_run(
    partial: &Value,
    plan: &impl Serialize,
    inputs: &[InputFile],
) -> anyhow::Result<()> {
    same_plan(&partial["plan"], &serde_json::to_value(plan)?)?;
    same_inputs(&partial["inputs"], inputs)
}

/// Checks that a resumed run reads the files the interrupted one read
/// (`saved`: its partial's `inputs`; absent in runs recorded before this
/// check, which are not checked), naming the first that differs.
pub fn same_inputs(saved: &Value, now: &[InputFile]) -> anyhow::Result<()> {
    let Some(saved) =
        saved_inputs(saved).context("--resume: reading `inputs` of metrics.partial.json")?
    else {
        return Ok(());
    };
    if let Some((path, then, now)) = changed_input(&saved, now) {
        anyhow::bail!(
            "--resume: {} changed since the interrupted run read it ({then} then, {now} now); \
             its results would mix two inputs: start a new --out",
            path.display()
        );
    }
    Ok(())
}

/// The `inputs` a report recorded (`None` in runs recorded before they were).
pub fn saved_inputs(saved: &Value) -> anyhow::Result<Option<Vec<InputFile>>> {
    if saved.is_null() {
        return Ok(None);
    }
    Ok(Some(serde_path_to_error::deserialize(saved.clone())?))
}

/// The first input file that differs between `a` and `b` (the inputs two
/// runs recorded): its path and how each side saw it (`N bytes, modified at
/// T ns`, or `absent`); `None` when they agree.
pub fn changed_input(a: &[InputFile], b: &[InputFile]) -> Option<(PathBuf, String, String)> {
    first_difference(
        a,
        b,
        |x, y| x == y,
        |f| format!("{} bytes, modified at {} ns", f.bytes, f.modified_ns),
    )
}

/// [`changed_input`] by size alone: for inputs read in another session or
/// on another machine, where a model fetched again (the same pinned bytes)
/// has a new modification time. The path and each side's size (`N bytes`
/// or `absent`).
pub fn resized_input(a: &[InputFile], b: &[InputFile]) -> Option<(PathBuf, String, String)> {
    first_difference(
        a,
        b,
        |x, y| x.bytes == y.bytes,
        |f| format!("{} bytes", f.bytes),
    )
}

/// The first path (in order) on which `a` and `b` differ: present on one
/// side only, or not `same`; with each side as `describe` shows it.
fn first_difference(
    a: &[InputFile],
    b: &[InputFile],
    same: impl Fn(&InputFile, &InputFile) -> bool,
    describe: impl Fn(&InputFile) -> String,
) -> Option<(PathBuf, String, String)> {
    let show = |f: Option<&InputFile>| f.map_or("absent".to_string(), &describe);
    let mut paths: Vec<&PathBuf> = a.iter().chain(b).map(|f| &f.path).collect();
    paths.sort();
    paths.dedup();
    paths.into_iter().find_map(|p| {
        let (x, y) = (
            a.iter().find(|f| &f.path == p),
            b.iter().find(|f| &f.path == p),
        );
        let agree = matches!((x, y), (Some(x), Some(y)) if same(x, y));
        (!agree).then(|| (p.clone(), show(x), show(y)))
    })
}

/// Field `name` of the `metrics.partial.json` that
/// [`RunArgs::open_resumable`] read from `dir`, typed; an error names the
/// field and the file.
pub fn partial_field<T: serde::de::DeserializeOwned>(
    partial: &Value,
    name: &str,
    dir: &Path,
) -> anyhow::Result<T> {
    serde_path_to_error::deserialize(partial[name].clone()).with_context(|| {
        format!(
            "--resume: reading `{name}` of {}",
            dir.join("metrics.partial.json").display()
        )
    })
}

/// Checks that a resumed run's plan (`now`, as JSON) is the one the
/// interrupted run saved (`saved`), naming every option that differs.
pub fn same_plan(saved: &Value, now: &Value) -> anyhow::Result<()> {
    let differ = plan_differences(saved, now, ("then", "now")).context("--resume")?;
    if !differ.is_empty() {
        anyhow::bail!(
            "--resume: the interrupted run had other options ({}); rerun with its options or start a new --out",
            differ.join("; ")
        );
    }
    Ok(())
}

/// Every option two plans (as JSON objects) set differently, as
/// `key: A's value NAME_A, B's value NAME_B` (`absent` where one leaves it out).
pub fn plan_differences(a: &Value, b: &Value, names: (&str, &str)) -> anyhow::Result<Vec<String>> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        anyhow::bail!("the saved plan is not an object");
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| v.map_or("absent".into(), Value::to_string);
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: {} {}, {} {}",
                show(a.get(k)),
                names.0,
                show(b.get(k)),
                names.1
            )
        })
        .collect())
}

/// A path to `target` from the folder `from`, both made absolute.
pub fn relative_path(target: &Path, from: &Path) -> PathBuf {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (t, f) = (abs(target), abs(from));
    let tc: Vec<_> = t.components().collect();
    let fc: Vec<_> = f.components().collect();
    let common = tc.iter().zip(&fc).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..fc.len() {
        out.push("..");
    }
    for c in &tc[common..] {
        out.push(c);
    }
    out
}

/// What a combined report (`--combine`) reads of a part's `metrics.json`:
/// its plan (compared as JSON), its input files and the study's rows `R`.
#[derive(Deserialize)]
pub struct PartMetrics<R> {
    /// The part's plan.
    pub plan: Value,
    /// The files it read (null in runs recorded before inputs were).
    #[serde(default)]
    pub inputs: Value,
    /// Its results.
    #[serde(flatten)]
    pub rows: R,
}

/// Reads the part of a combined report in `dir`: a finished run of
/// `study --model` (an unfinished one, a report of another study or one
/// that does not read as `R` is refused by name).
pub fn read_part<R: serde::de::DeserializeOwned>(
    dir: &Path,
    study: &str,
) -> anyhow::Result<Recorded<PartMetrics<R>>> {
    if !dir.join("metrics.json").is_file() && dir.join("metrics.partial.json").is_file() {
        anyhow::bail!(
            "--combine: {} is an unfinished run (metrics.partial.json only): finish it with --resume first",
            dir.display()
        );
    }
    let recorded = read_metrics::<PartMetrics<R>>(dir).with_context(|| {
        format!(
            "--combine: {} is not a finished {study} --model run",
            dir.display()
        )
    })?;
    anyhow::ensure!(
        recorded.run.study == study,
        "--combine: {} is a report of the `{}` study, not of {study} --model",
        dir.display(),
        recorded.run.study
    );
    Ok(recorded)
}

/// Errors unless two parts' accuracies `p` and `q` of the base model on
/// `task`'s `split` of `n` examples differ by at most one example (the same
/// model scored by two builds or machines: a greedy answer that rounding
/// flipped).
pub fn within_one_example(task: &str, split: &str, p: f64, q: f64, n: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (p - q).abs() * n as f64 <= 1.0 + 1e-9,
        "{task} {split} accuracy {p} vs {q} (more than one example of {n})"
    );
    Ok(())
}

/// Whether two paths name one folder (the same path, or the same folder
/// once both exist).
pub fn same_folder(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// A combined report's table of its parts: each part's folder, what it
/// ran (`what`: the column's name), backend, threads, commit and wall time,
/// then the parts' wall time in all (the combined run's own is its
/// footer's: seconds of reading and writing).
pub fn parts_table<'a>(
    md: &mut String,
    what: &str,
    parts: impl IntoIterator<Item = (&'a Path, String, &'a RunRecord)>,
) {
    md.push_str(&format!(
        "| part | {what} | backend | threads | commit | wall time |\n|---|---|---|---|---|---|\n"
    ));
    let wall = |seconds: f64, resumes: usize| {
        format!(
            "{seconds:.0} s = {:.1} h ({resumes} resumes)",
            seconds / 3600.0
        )
    };
    let (mut seconds, mut resumes) = (0.0, 0);
    for (dir, ran, run) in parts {
        md.push_str(&format!(
            "| `{}` | {ran} | {} | {} | {} | {} |\n",
            dir.display(),
            run.backend,
            run.threads,
            run.git_commit,
            wall(run.wall_seconds, run.resumes)
        ));
        seconds += run.wall_seconds;
        resumes += run.resumes;
    }
    md.push_str(&format!(
        "| all parts | | | | | {} |\n",
        wall(seconds, resumes)
    ));
}

/// An open report folder.
pub struct Run {
    /// The study's name.
    pub study: String,
    /// The folder.
    pub dir: PathBuf,
    /// The device the study trains on (its label is the report's backend).
    pub device: Device,
    start: Instant,
    phases: Vec<(String, f64)>,
    /// Wall time of the interrupted runs this one continues.
    earlier_seconds: f64,
    /// How many times the run was resumed.
    resumes: usize,
    /// Suppresses progress output.
    pub quiet: bool,
}

/// `YYYYMMDD-HHMMSS` in UTC, from the system clock (no date crate needed).
pub fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The commit the binary was built from (`experiments/build.rs`).
fn git_commit() -> String {
    env!("EXPERIMENTS_GIT_COMMIT").into()
}

impl Run {
    /// Creates `out` (or `results/<study>/<timestamp>`).
    pub fn create(
        study: &str,
        out: Option<&Path>,
        device: Device,
        quiet: bool,
    ) -> anyhow::Result<Run> {
        let dir = match out {
            Some(p) => p.to_path_buf(),
            None => PathBuf::from("results").join(study).join(timestamp()),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Run {
            study: study.into(),
            dir,
            device,
            start: Instant::now(),
            phases: Vec::new(),
            earlier_seconds: 0.0,
            resumes: 0,
            quiet,
        })
    }

    /// A progress bar of `total` steps on stderr, hidden with `--quiet`.
    pub fn progress(&self, total: u64) -> indicatif::ProgressBar {
        if self.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total)
        }
    }

    /// Runs `f` as a named, timed phase.
    pub fn phase<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.phases.push((name.into(), t.elapsed().as_secs_f64()));
        out
    }

    /// Writes `bytes` to `name` inside the folder, atomically.
    pub fn write(&self, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let p = self.dir.join(name);
        weights::atomic::write_atomic(&p, bytes)
            .with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// The `run` record of `metrics.json`.
    pub fn record(&self) -> RunRecord {
        RunRecord {
            study: self.study.clone(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            git_commit: git_commit(),
            backend: self.device.label().into(),
            versions: Versions {
                experiments: env!("CARGO_PKG_VERSION").into(),
                burn: "0.21".into(),
                rustc_target: std::env::consts::ARCH.into(),
            },
            threads: available_threads(),
            phases_seconds: self
                .phases
                .iter()
                .map(|(phase, seconds)| PhaseTime {
                    phase: phase.clone(),
                    seconds: *seconds,
                })
                .collect(),
            wall_seconds: self.wall_seconds(),
            resumes: self.resumes,
        }
    }

    /// Wall time so far, the interrupted runs' included.
    pub fn wall_seconds(&self) -> f64 {
        self.earlier_seconds + self.start.elapsed().as_secs_f64()
    }

    /// Writes what is known so far to `metrics.partial.json` (with the run
    /// record and `"complete": false`), so an interrupted study (Ctrl-C)
    /// leaves its finished phases behind; [`Run::finish`] removes it.
    pub fn partial<T: Serialize + ?Sized>(&self, metrics: &T) -> anyhow::Result<()> {
        let mut m = serde_json::to_value(metrics)?;
        m["run"] = serde_json::to_value(self.record())?;
        m["complete"] = Value::Bool(false);
        self.write(
            "metrics.partial.json",
            serde_json::to_string_pretty(&m)?.as_bytes(),
        )?;
        Ok(())
    }

    /// Writes `metrics.json` (`metrics` plus the run record) and `report.md`,
    /// then removes `metrics.partial.json` (in that order, so a run killed
    /// in between still leaves one of the two).
    pub fn finish<T: Serialize>(&self, metrics: T, report_md: &str) -> anyhow::Result<()> {
        let mut metrics = serde_json::to_value(metrics)?;
        metrics["run"] = serde_json::to_value(self.record())?;
        self.write(
            "metrics.json",
            serde_json::to_string_pretty(&metrics)?.as_bytes(),
        )?;
        let mut md = report_md.to_string();
        md.push_str(&format!(
            "\n---\nCommand: `{}` · commit {} · backend {} · wall time {:.1} s\n",
            std::env::args().collect::<Vec<_>>().join(" "),
            git_commit(),
            self.device.label(),
            self.wall_seconds()
        ));
        self.write("report.md", md.as_bytes())?;
        let _ = std::fs::remove_file(self.dir.join("metrics.partial.json"));
        if !self.quiet {
            eprintln!("report written to {}", self.dir.display());
        }
        Ok(())
    }
}

/// The `run` record every study's `metrics.json` carries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// The study's name.
    pub study: String,
    /// The command line.
    pub command: String,
    /// The commit the binary was built from (`git rev-parse --short=12
    /// HEAD` at build time), with `-dirty` when the crates' sources differed
    /// from it, or `unknown` when built outside a git checkout.
    pub git_commit: String,
    /// The backend's label.
    pub backend: String,
    /// Versions of what ran.
    pub versions: Versions,
    /// Threads available.
    pub threads: usize,
    /// Wall time of each phase, in order.
    pub phases_seconds: Vec<PhaseTime>,
    /// Wall time of the whole run (over every resumed part).
    pub wall_seconds: f64,
    /// How many times an interrupted run was resumed (`--resume`).
    #[serde(default)]
    pub resumes: usize,
}

/// Versions in a [`RunRecord`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Versions {
    /// This crate's version.
    pub experiments: String,
    /// Burn's version.
    pub burn: String,
    /// The target architecture.
    pub rustc_target: String,
}

/// One phase's wall time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseTime {
    /// The phase.
    pub phase: String,
    /// Its seconds.
    pub seconds: f64,
}

/// A `metrics.json` read back: the study's own metrics `T` and the run record.
#[derive(Clone, Debug, Deserialize)]
pub struct Recorded<T> {
    /// The run record.
    pub run: RunRecord,
    /// The study's metrics.
    #[serde(flatten)]
    pub metrics: T,
}

/// Reads `dir/metrics.json` as study metrics `T` (the study's own metrics
/// type), naming the file and the field that does not fit.
pub fn read_metrics<T: serde::de::DeserializeOwned>(dir: &Path) -> anyhow::Result<Recorded<T>> {
    let p = dir.join("metrics.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).with_context(|| format!("reading {}", p.display()))
}

/// Reads floats that were NaN or infinite when written (`serde_json`
/// writes those as `null`) back as NaN: an `f64` or `f32`, or a vector or
/// string-keyed map of them (for `#[serde(deserialize_with = ...)]`).
pub fn nan_if_null<'de, D: serde::Deserializer<'de>, T: NullAsNan>(d: D) -> Result<T, D::Error> {
    Ok(T::from_raw(T::Raw::deserialize(d)?))
}

/// A value whose floats may have been written as `null` (see [`nan_if_null`]).
pub trait NullAsNan: Sized {
    /// The same shape with `Option`s for the floats.
    type Raw: serde::de::DeserializeOwned;
    /// NaN for every `None`.
    fn from_raw(raw: Self::Raw) -> Self;
}

impl NullAsNan for f64 {
    type Raw = Option<f64>;
    fn from_raw(raw: Option<f64>) -> f64 {
        raw.unwrap_or(f64::NAN)
    }
}

impl NullAsNan for f32 {
    type Raw = Option<f32>;
    fn from_raw(raw: Option<f32>) -> f32 {
        raw.unwrap_or(f32::NAN)
    }
}

impl<T: NullAsNan> NullAsNan for Vec<T> {
    type Raw = Vec<T::Raw>;
    fn from_raw(raw: Self::Raw) -> Self {
        raw.into_iter().map(T::from_raw).collect()
    }
}

impl<T: NullAsNan> NullAsNan for std::collections::BTreeMap<String, T> {
    type Raw = std::collections::BTreeMap<String, T::Raw>;
    fn from_raw(raw: Self::Raw) -> Self {
        raw.into_iter().map(|(k, v)| (k, T::from_raw(v))).collect()
    }
}

fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The run record names the commit the binary was built from: this
    /// checkout's HEAD (dirty or not) or, outside git, `unknown`.
    #[test]
    fn the_run_record_names_the_commit_built_from() {
        let c = git_commit();
        let head = c.strip_suffix("-dirty").unwrap_or(&c);
        assert!(
            c == "unknown" || (head.len() == 12 && head.bytes().all(|b| b.is_ascii_hexdigit())),
            "{c}"
        );
        let now = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if let Some(now) = now {
            assert_eq!(head, now, "built from {c}, HEAD is {now}");
        }
    }

    /// NaN and ±∞ are written as `null` and read back as NaN, at every depth.
    #[test]
    fn non_finite_floats_survive_a_json_round_trip_as_nan() {
        #[derive(Serialize, Deserialize)]
        struct Row {
            #[serde(deserialize_with = "nan_if_null")]
            x: f64,
            #[serde(deserialize_with = "nan_if_null")]
            losses: Vec<f32>,
            #[serde(deserialize_with = "nan_if_null")]
            by_task: BTreeMap<String, f64>,
            #[serde(deserialize_with = "nan_if_null")]
            matrix: Vec<Vec<f64>>,
        }
        let row = Row {
            x: f64::NAN,
            losses: vec![1.5, f32::INFINITY, f32::NAN],
            by_task: [
                ("a".to_string(), 0.25),
                ("b".to_string(), f64::NEG_INFINITY),
            ]
            .into(),
            matrix: vec![vec![1.0, f64::NAN], vec![f64::NAN, 1.0]],
        };
        let text = serde_json::to_string(&row).unwrap();
        assert_eq!(text.matches("null").count(), 6, "{text}");
        let back: Row = serde_json::from_str(&text).unwrap();
        assert!(back.x.is_nan());
        assert_eq!(back.losses[0], 1.5);
        assert!(back.losses[1].is_nan() && back.losses[2].is_nan());
        assert_eq!(back.by_task["a"], 0.25);
        assert!(back.by_task["b"].is_nan());
        assert_eq!(back.matrix[0][0], 1.0);
        assert!(back.matrix[0][1].is_nan() && back.matrix[1][0].is_nan());
        // Without the attribute the same text is refused: what the attribute is for.
        assert!(serde_json::from_str::<Vec<f32>>(r#"[1.5, null]"#).is_err());
    }

    /// A folder's files are listed recursively in path order; a resumed
    /// run's check passes on the same files and names a file rewritten,
    /// removed or added; a partial from before the check is not checked.
    #[test]
    fn resumed_runs_check_their_input_files() {
        let dir = tempfile::tempdir().unwrap();
        let (ft, model) = (dir.path().join("ft"), dir.path().join("model.gguf"));
        std::fs::create_dir_all(ft.join("sub")).unwrap();
        std::fs::write(ft.join("b.safetensors"), b"bb").unwrap();
        std::fs::write(ft.join("sub/a.json"), b"a").unwrap();
        std::fs::write(&model, b"gguf").unwrap();
        // Hidden folders are left out, and a link back to a folder is not followed twice.
        std::fs::create_dir_all(ft.join(".git")).unwrap();
        std::fs::write(ft.join(".git/index"), b"changes with every git command").unwrap();
        std::os::unix::fs::symlink(&ft, ft.join("sub/loop")).unwrap();
        let files = input_files(&[&model, &ft]).unwrap();
        let listed: Vec<(PathBuf, u64)> = files.iter().map(|f| (f.path.clone(), f.bytes)).collect();
        assert_eq!(
            listed,
            [
                (model.clone(), 4),
                (ft.join("b.safetensors"), 2),
                (ft.join("sub/a.json"), 1)
            ]
        );
        let saved = serde_json::to_value(&files).unwrap();
        same_inputs(&saved, &files).unwrap();
        let refused = || {
            let now = input_files(&[&model, &ft]).unwrap();
            format!("{:#}", same_inputs(&saved, &now).unwrap_err())
        };
        same_inputs(&Value::Null, &files).unwrap();

        // The same size, another modification time: a fine-tune redone in place.
        let day = std::time::Duration::from_secs(86_400);
        std::fs::File::options()
            .write(true)
            .open(ft.join("sub/a.json"))
            .unwrap()
            .set_modified(UNIX_EPOCH + day)
            .unwrap();
        let e = refused();
        assert!(
            e.contains(
                "sub/a.json changed since the interrupted run read it (1 bytes, modified at"
            ) && e.contains("1 bytes, modified at 86400000000000 ns now"),
            "{e}"
        );
        std::fs::remove_file(ft.join("sub/a.json")).unwrap();
        let e = refused();
        assert!(
            e.contains("sub/a.json changed") && e.contains("absent now"),
            "{e}"
        );
        std::fs::write(ft.join("c.json"), b"c").unwrap();
        let e = refused();
        assert!(
            e.contains("c.json changed") && e.contains("(absent then"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            input_files(&[&dir.path().join("gone")]).unwrap_err()
        );
        assert!(e.contains("reading") && e.contains("gone"), "{e}");
    }

    /// Every option that differs is named, one the saved plan has and the
    /// current one leaves out (a default skipped in the JSON) included.
    #[test]
    fn a_resumed_plan_names_every_option_that_differs() {
        let saved = serde_json::json!({"steps": 150, "lr_schedule": "linear", "seed": 0});
        same_plan(&saved, &saved).unwrap();
        let now = serde_json::json!({"steps": 100, "seed": 0, "batch": 8});
        let e = same_plan(&saved, &now).unwrap_err().to_string();
        assert!(
            e.contains(
                "(batch: absent then, 8 now; lr_schedule: \"linear\" then, absent now; \
                 steps: 150 then, 100 now)"
            ),
            "{e}"
        );
    }

    #[test]
    fn relative_paths_climb_to_the_common_folder() {
        // Paths that do not exist are compared as given.
        let (a, b) = (
            Path::new("/nonexistent-x/r/configs"),
            Path::new("/nonexistent-x/s/finetunes/date/full"),
        );
        assert_eq!(
            relative_path(b, a),
            PathBuf::from("../../s/finetunes/date/full")
        );
    }
}
