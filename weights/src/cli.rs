//! What every binary of the toolkit does around its work: interrupt safety
//! ([`atomic::on_interrupt`](crate::atomic::on_interrupt)) and one error style
//! — `error: …` with the cause chain on one line, each cause once, never a
//! backtrace for a user's mistake whatever `RUST_BACKTRACE` says, exit
//! status 1 (clap's usage errors keep their status 2).

use std::process::ExitCode;

use crate::atomic::{OnInterrupt, on_interrupt};

/// Runs a binary's work under `policy` and reports its error, if any.
pub fn main(policy: OnInterrupt, work: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    on_interrupt(policy);
    match work() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// `error: outer: cause: …`, leaving out a cause whose text the message
/// before it already contains (errors that print their source, as
/// `WeightsError::Io` does, would otherwise say it twice).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::from("error: ");
    let mut last = String::new();
    for (i, cause) in e.chain().enumerate() {
        let text = cause.to_string();
        if i > 0 {
            if last.contains(&text) {
                continue;
            }
            line.push_str(": ");
        }
        line.push_str(&text);
        last = text;
    }
    line
}

/// A progress bar on stderr fed by `(done, total)` callbacks (such as
/// `merge::run::RunOptions::progress`), cleared once `done == total`.
pub fn progress_bar(unit: &str) -> impl Fn(usize, usize) + Send + Sync + 'static {
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{bar:40}} {{pos}}/{{len}} {unit} {{elapsed_precise}}"
    )) {
        bar.set_style(style);
    }
    move |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if done >= total {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn each_cause_is_said_once() {
        let io = crate::WeightsError::io(
            "/nonexistent",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        let once = io.to_string();
        let e = Err::<(), _>(io).context("reading the model").unwrap_err();
        let line = error_line(&e);
        assert_eq!(line, format!("error: reading the model: {once}"));
        assert_eq!(line.matches("not found").count(), 1, "{line}");
    }

    #[test]
    fn distinct_causes_are_all_kept() {
        let e = anyhow::anyhow!("no such method 'tie'")
            .context("models[1]")
            .context("config.yml");
        assert_eq!(
            error_line(&e),
            "error: config.yml: models[1]: no such method 'tie'"
        );
    }
}
