//! One module per study.

pub mod lmc;
pub mod lmc_llama;
pub mod many;
pub mod merge_llm;
pub mod merging;
pub mod moe;
pub mod pleas;
pub mod pleas_cnn;
pub mod pleas_llama;
pub mod rws;
pub mod s2ft;
pub mod s2ft_llm;
pub mod spectra;
pub mod svd_align;

/// Refuses the first option of `given` that was set, as `"{flag} {why}"`
/// (options that belong to another mode of the study).
pub(crate) fn refuse_given(given: &[(&str, bool)], why: &str) -> anyhow::Result<()> {
    match given.iter().find(|(_, set)| *set) {
        Some((flag, _)) => anyhow::bail!("{flag} {why}"),
        None => Ok(()),
    }
}

/// `impl Default` for clap argument structs: the values the command line
/// gives when no option is passed (so tests and library users start from
/// exactly the CLI defaults).
macro_rules! cli_defaults {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                #[derive(clap::Parser)]
                struct Wrap {
                    #[command(flatten)]
                    args: $t,
                }
                <Wrap as clap::Parser>::parse_from(["study"]).args
            }
        }
    )*};
}
pub(crate) use cli_defaults;
