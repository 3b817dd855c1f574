//! SmolLM2-135M-Instruct, loaded from its GGUF (Q4_1, dequantised by
//! `weights`), with its own byte-level BPE from the GGUF metadata, predicts a
//! sensible next token. `#[ignore]`d (see `weights::testing`): run with
//! `cargo test -- --ignored` after scripts/fetch-models.sh, as CI does.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::tokenizer::{ChatMessage, Tokenizer};
use s2ft_core::{Cpu, Llama, LlamaConfig};
use weights::{GgufFile, TensorSource};

fn model_path() -> std::path::PathBuf {
    weights::testing::fetched_model("SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn smollm2_predicts_paris() {
    let path = model_path();
    let g = GgufFile::open(&path).unwrap();
    let cfg = LlamaConfig::from_gguf(&g).unwrap();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (30, 576, 9, 3)
    );
    assert!(cfg.tie_word_embeddings);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    // Token ids from Hugging Face transformers' tokenizer built from the same
    // GGUF: prompts 1 and 2 of `tests/fixtures/smollm2_reference.py`, whose
    // JSON `smollm2_logits_match_transformers` reads.
    assert_eq!(
        tok.encode("The capital of France is").unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    let tricky = "It's 2024: résumé   naïve!!";
    assert_eq!(
        tok.encode(tricky).unwrap(),
        vec![
            1589, 506, 216, 34, 32, 34, 36, 42, 412, 2756, 5422, 2756, 256, 15486, 46494, 10095
        ]
    );
    assert_eq!(
        tok.decode(&tok.encode(tricky).unwrap(), false).unwrap(),
        tricky
    );
    let sd = g.load_all().unwrap();
    let device = Default::default();
    let model = Llama::<Cpu>::from_state_dict(&cfg, &sd, false, &device).unwrap();
    let prompt = "The capital of France is";
    let ids = tok.encode(prompt).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
    let n = ids.len();
    let tokens = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
        &device,
    );
    let logits = model
        .forward(tokens)
        .narrow(1, n - 1, 1)
        .reshape([cfg.vocab_size]);
    let next = logits.argmax(0).into_scalar().elem::<i64>() as u32;
    let word = tok.decode(&[next], false).unwrap();
    eprintln!("prompt {ids:?} -> {next} {word:?}");
    assert_eq!(word.trim(), "Paris", "predicted {word:?}");
}

#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn smollm2_chat_template_is_chatml() {
    let path = model_path();
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let prompt = tok.chat_prompt(&[ChatMessage::user("Hi")]).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.end_of_turn().unwrap(), "<|im_end|>\n");
    // Special tokens in the text become their ids.
    let ids = tok.encode("<|im_start|>user").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.stop_ids()[0], 2, "EOS is <|im_end|>");
    assert!(tok.stop_ids().contains(&0), "<|endoftext|> also stops");
}

/// The tokenizer files `weights convert` writes from the GGUF, read back by
/// the `tokenizers` crate from disk, encode a set of strings (ASCII,
/// Unicode, whitespace, special tokens, a chat turn) to the ids that
/// transformers' own GGUF tokenizer gives, and render the chat template the
/// same (fixture from `weights/tests/fixtures/gguf_tokenizer.py`, which also
/// checks that `transformers.AutoTokenizer` loads the converted folder).
#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn tokenizer_files_written_from_the_gguf_encode_as_transformers_does() {
    let path = model_path();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../weights/tests/fixtures/gguf_tokenizer.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    weights::HfTokenizerFiles::from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap()
        .save(dir.path())
        .unwrap();
    let tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    let ids = fixture["ids"].as_object().unwrap();
    assert!(ids.len() >= 8);
    for (text, want) in ids {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
    }
    let chat = tok
        .chat_prompt(&[ChatMessage::user(
            "Reverse the order of these words: south, fin, join.",
        )])
        .unwrap();
    assert_eq!(chat, fixture["chat"].as_str().unwrap());
}

/// The LLaMA forward against transformers on SmolLM2's own GGUF, beyond one
/// next token: for four prompts (plain, Unicode, code, a ChatML turn) the token
/// ids, the argmax at every position, and the last position's logits (the first
/// 512 ids and the top 20) agree to 1e-3 (fixture from
/// `tests/fixtures/smollm2_reference.py`).
#[test]
#[ignore = "needs models/ from scripts/fetch-models.sh; run with --ignored"]
fn smollm2_logits_match_transformers() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let g = GgufFile::open(model_path()).unwrap();
    let cfg = LlamaConfig::from_gguf(&g).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let device = Default::default();
    let model =
        Llama::<Cpu>::from_state_dict(&cfg, &g.load_all().unwrap(), false, &device).unwrap();
    let mut worst = 0f32;
    for case in fixture["prompts"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(prompt).unwrap(), want, "{prompt:?}: token ids");
        let n = want.len();
        let tokens = Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(want.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
            &device,
        );
        let logits = model.forward(tokens).reshape([n, cfg.vocab_size]);
        let argmax: Vec<i64> = logits
            .clone()
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .unwrap();
        let want_argmax: Vec<i64> = case["argmax"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(argmax, want_argmax, "{prompt:?}: argmax per position");
        let last: Vec<f32> = logits
            .narrow(0, n - 1, 1)
            .reshape([cfg.vocab_size])
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        for (i, v) in case["last_first_512"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            worst = worst.max((last[i] - v.as_f64().unwrap() as f32).abs());
        }
        for pair in case["last_top20"].as_array().unwrap() {
            let (i, v) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap() as f32,
            );
            worst = worst.max((last[i] - v).abs());
        }
    }
    eprintln!("largest logit deviation from transformers: {worst:e}");
    assert!(worst < 1e-3, "logits deviate by {worst}");
}
