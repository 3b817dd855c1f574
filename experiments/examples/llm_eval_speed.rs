//! Where the time of the real-model `s2ft` study goes: greedy decoding of a
//! task's test prompts (KV cache, batched), the teacher-forced answer loss,
//! the held-out text loss, and one supervised fine-tuning step per method.
//!
//! `cargo run -p experiments --release --example llm_eval_speed -- MODEL [N] [BATCH]`
//!
//! MODEL is a Hugging Face folder or GGUF (SmolLM2-135M-Instruct's GGUF);
//! N test prompts of the `date` task (default 24), BATCH sequences per
//! training step (default 4).
use std::time::Instant;

use experiments::llm::{Prompter, score_set, sft_batch, text_loss, text_windows};
use experiments::tasks::{InstructTask, Split, Stream, Words, examples};
use s2ft_core::s2ft::{
    S2ftConfig, apply_lora, apply_s2ft, lora_param_count, ratios_for_budget, select,
};
use s2ft_core::train::{TrainConfig, train};
use s2ft_core::{Cpu, CpuTrain, Llama, Pretrained};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().expect("MODEL path");
    let n: usize = args.get(1).map_or(24, |s| s.parse().expect("N"));
    let batch: usize = args.get(2).map_or(4, |s| s.parse().expect("BATCH"));
    let t = Instant::now();
    let p = Pretrained::load(path.as_ref())?;
    println!("load {:.2} s", t.elapsed().as_secs_f64());
    let words = Words::load(&experiments::lm::default_text_dir())?;
    let prompter = Prompter::new(&p.tokenizer)?;
    let set = prompter.encode(examples(InstructTask::Date, Split::Test, n, &words, 1)?)?;
    let device = Default::default();
    let m = Llama::<Cpu>::from_state_dict(&p.config, &p.weights, false, &device)?;
    for eval_batch in if n > 0 { vec![8, 16, 32] } else { vec![] } {
        let cfg = experiments::llm::generation_config(&set, &p.tokenizer, &p.config, eval_batch);
        let t = Instant::now();
        s2ft_core::generate::greedy(&m, &set.prompts, &cfg)?;
        println!(
            "greedy {n} prompts, batch {eval_batch}, {} new tokens at most: {:.2} s",
            cfg.max_new_tokens,
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let s = score_set(&m, &set, &prompter, eval_batch)?;
        println!(
            "score {n} prompts (greedy + answer loss), batch {eval_batch}: {:.2} s (acc {:.2})",
            t.elapsed().as_secs_f64(),
            s.acc
        );
    }
    let corpus = experiments::lm::moby_dick(&experiments::lm::default_text_dir())?;
    let text = String::from_utf8_lossy(&corpus.test[..100_000]).into_owned();
    let t = Instant::now();
    let windows = text_windows(&p.tokenizer, &text, 4, 128, "moby")?;
    println!("tokenize 100 kB: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    text_loss(&m, &windows, 16);
    println!("text loss 4 x 128: {:.2} s", t.elapsed().as_secs_f64());
    let c = &p.config;
    let targets = s2ft_core::s2ft::LORA_TARGETS_ALL;
    let mut stream = Stream::new(InstructTask::Date, Split::Train, &words, 0);
    let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..batch)
        .map(|_| {
            let ex = stream.next().expect("endless");
            (
                prompter.prompt(&ex).unwrap(),
                prompter.completion(&ex).unwrap(),
            )
        })
        .collect();
    let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|(a, b)| (&a[..], &b[..])).collect();
    println!(
        "training batch: {batch} x {} tokens",
        rows.iter().map(|(a, b)| a.len() + b.len()).max().unwrap()
    );
    let methods = std::env::var("METHODS").unwrap_or_else(|_| "full,lora,s2ft".into());
    for method in methods.split(',') {
        let base = Llama::<CpuTrain>::from_state_dict(c, &p.weights, method == "full", &device)?;
        let model = match method {
            "full" => base,
            "lora" => apply_lora(base, 8, 16.0, &targets, 0)?,
            _ => {
                let (hr, cr) = ratios_for_budget(c, lora_param_count(c, 8, &targets), 0.5);
                let sc = S2ftConfig {
                    heads_ratio: hr,
                    channels_ratio: cr,
                    ..Default::default()
                };
                apply_s2ft(base, &select(c, &sc, None)?, &sc)?
            }
        };
        let out = train(
            model,
            |_| sft_batch::<CpuTrain>(&pairs, prompter.pad, &device),
            &TrainConfig {
                lr: 1e-5,
                steps: 4,
                weight_decay: 0.0,
                schedule: s2ft_core::train::LrSchedule::Constant,
            },
        );
        println!("{method}: median step {:.0} ms", out.median_step_ms());
    }
    Ok(())
}
