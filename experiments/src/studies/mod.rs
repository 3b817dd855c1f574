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
