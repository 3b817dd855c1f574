//! KV-cached decoding against the plain forward: logits of a sequence fed in
//! pieces equal those of one full pass; batched greedy decoding (length
//! buckets, shared-prefix cache) equals naive greedy decoding that reruns the
//! whole sequence for every token; bad prompts get named errors.

use burn::prelude::*;
use burn::tensor::TensorData;
use s2ft_core::generate::{Generated, GenerationConfig, greedy};
use s2ft_core::{Cpu, KvCache, Llama, LlamaConfig};

fn model() -> Llama<Cpu> {
    // GQA (4 query heads over 2 KV heads), untied head.
    let c = LlamaConfig::tiny(50, 32, 2, 4, 2, 64);
    Llama::<Cpu>::random(&c, 11, &Default::default()).unwrap()
}

fn ids(v: &[u32]) -> Tensor<Cpu, 2, Int> {
    Tensor::from_data(
        TensorData::new(
            v.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [1, v.len()],
        ),
        &Default::default(),
    )
}

fn to_vec(t: Tensor<Cpu, 1>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

#[test]
fn cached_pieces_equal_one_full_pass() {
    let m = model();
    let seq: Vec<u32> = vec![3, 17, 5, 42, 8, 1, 29, 33, 12];
    let full = m.forward(ids(&seq)); // [1, t, vocab]
    let mut cache = KvCache::new(m.layers.len());
    // A 4-token prefill, then a 2-token chunk, then one token at a time.
    let mut at = 0;
    for piece in [4usize, 2, 1, 1, 1] {
        let logits = m.forward_cached(ids(&seq[at..at + piece]), &mut cache);
        at += piece;
        assert_eq!(cache.len(), at);
        let want = to_vec(full.clone().narrow(1, at - 1, 1).reshape([50]));
        let got = to_vec(logits.reshape([50]));
        let err = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-5, "position {at}: max |Δ| = {err}");
    }
}

/// Greedy decoding the slow way: the whole sequence again for every token.
fn naive(m: &Llama<Cpu>, prompt: &[u32], max_new: usize, stops: &[u32]) -> Generated {
    let mut seq = prompt.to_vec();
    let mut out = Generated {
        ids: vec![],
        stopped: false,
    };
    for _ in 0..max_new {
        let t = seq.len();
        let logits = m.forward(ids(&seq)).narrow(1, t - 1, 1).reshape([50]);
        let next = logits.argmax(0).into_scalar().elem::<i64>() as u32;
        if stops.contains(&next) {
            out.stopped = true;
            break;
        }
        out.ids.push(next);
        seq.push(next);
    }
    out
}

#[test]
fn batched_greedy_equals_naive_greedy() {
    let m = model();
    // A shared prefix, several lengths, two prompts of equal length (one batch).
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 2, 3, 9, 14],
        vec![1, 2, 3, 7],
        vec![1, 2, 3, 9, 40, 22, 6],
        vec![1, 2, 3, 30, 11],
        vec![1, 2, 3, 5, 5, 5, 5, 5, 5, 2],
    ];
    // Stop on a token this random model emits sometimes, so both endings occur.
    let free: Vec<Generated> = prompts.iter().map(|p| naive(&m, p, 8, &[])).collect();
    let stop = free[0].ids[3];
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        stop_ids: vec![stop],
        batch_size: 4,
        max_positions: 64,
    };
    let got = greedy(&m, &prompts, &cfg).unwrap();
    let want: Vec<Generated> = prompts.iter().map(|p| naive(&m, p, 8, &[stop])).collect();
    assert_eq!(got, want);
    assert!(got.iter().any(|g| g.stopped) && got.iter().any(|g| !g.stopped));
    // Batch size 1 (no batching, no bucket sharing) gives the same.
    let one = greedy(
        &m,
        &prompts,
        &GenerationConfig {
            batch_size: 1,
            ..cfg.clone()
        },
    )
    .unwrap();
    assert_eq!(one, want);
    // One prompt alone (no shared-prefix cache).
    let alone = greedy(&m, &prompts[2..3], &cfg).unwrap();
    assert_eq!(alone[0], want[2]);
}

#[test]
fn bad_prompts_are_named() {
    let m = model();
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        stop_ids: vec![0],
        batch_size: 4,
        max_positions: 12,
    };
    let e = greedy(&m, &[vec![1, 2], vec![1; 6]], &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("prompt 1") && e.contains("context of 12"), "{e}");
    let e = greedy(&m, &[vec![]], &cfg).unwrap_err().to_string();
    assert!(e.contains("prompt 0 is empty"), "{e}");
    let e = greedy(&m, &[vec![1, 99]], &cfg).unwrap_err().to_string();
    assert!(e.contains("token id 99"), "{e}");
}

#[test]
fn left_padded_rows_compute_what_they_would_alone() {
    let m = model();
    let a: Vec<u32> = vec![4, 8, 15, 16, 23, 42];
    let b: Vec<u32> = vec![7, 9, 2];
    // b padded on the left by 3 tokens (arbitrary ids) next to a.
    let rows: Vec<i64> = a
        .iter()
        .chain([1u32, 1, 1].iter())
        .chain(b.iter())
        .map(|&i| i as i64)
        .collect();
    let tokens =
        Tensor::<Cpu, 2, Int>::from_data(TensorData::new(rows, [2, 6]), &Default::default());
    let mut cache = KvCache::new(m.layers.len());
    let logits = m.forward_cached_padded(tokens, &[0, 3], &mut cache);
    let mut alone = KvCache::new(m.layers.len());
    let want_a = m.forward_cached(ids(&a), &mut alone);
    let mut alone_b = KvCache::new(m.layers.len());
    let want_b = m.forward_cached(ids(&b), &mut alone_b);
    let close = |x: Vec<f32>, y: Vec<f32>| {
        x.iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max)
    };
    let got = logits.clone();
    assert!(
        close(
            to_vec(got.clone().narrow(0, 0, 1).reshape([50])),
            to_vec(want_a.reshape([50]))
        ) < 1e-5
    );
    assert!(
        close(
            to_vec(got.narrow(0, 1, 1).reshape([50])),
            to_vec(want_b.clone().reshape([50]))
        ) < 1e-5
    );
    // One more token each: the padding stays invisible.
    let step = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(vec![5i64, 5], [2, 1]),
        &Default::default(),
    );
    let next = m.forward_cached(step, &mut cache);
    let want_b2 = m.forward_cached(ids(&[5]), &mut alone_b);
    assert!(
        close(
            to_vec(next.narrow(0, 1, 1).reshape([50])),
            to_vec(want_b2.reshape([50]))
        ) < 1e-5
    );
}

#[test]
fn a_saved_hf_folder_reloads_with_identical_logits_and_tokenizer() {
    use s2ft_core::tokenizer::{ChatMessage, Tokenizer};
    let tok = Tokenizer::byte_level_chatml().unwrap();
    assert_eq!(tok.vocab_size(), 259);
    let mut c = LlamaConfig::tiny(259, 32, 2, 4, 2, 64);
    c.max_position_embeddings = Some(256);
    let m = Llama::<Cpu>::random(&c, 5, &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    // Small shards, so the index file is written and read back.
    let mut sd = m.to_state_dict();
    s2ft_core::pretrained::save_hf_folder(&out, &c, &mut sd, &tok, 20_000).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // A second save into the same folder is refused; nothing temporary is left.
    assert!(s2ft_core::pretrained::save_hf_folder(&out, &c, &mut sd, &tok, 20_000).is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only the model folder");
    let back = s2ft_core::Pretrained::load(&out).unwrap();
    assert_eq!(back.config.max_position_embeddings, Some(256));
    let m2 = Llama::<Cpu>::from_state_dict(&back.config, &back.weights, false, &Default::default())
        .unwrap();
    let text = back
        .tokenizer
        .chat_prompt(&[ChatMessage::user("Reverse: a, b")])
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>user\nReverse: a, b<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids_ = back.tokenizer.encode(&text).unwrap();
    assert_eq!(ids_, tok.encode(&text).unwrap());
    // Specials are single ids; the rest is one id per byte.
    assert_eq!(ids_[0], 1);
    assert_eq!(
        ids_.len(),
        3 + text.len() - "<|im_start|><|im_end|><|im_start|>".len()
    );
    assert_eq!(back.tokenizer.decode(&ids_, false).unwrap(), text);
    assert_eq!(back.tokenizer.stop_ids()[0], 2);
    let a = to_vec(m.forward(ids(&ids_)).reshape([ids_.len() * 259]));
    let b = to_vec(m2.forward(ids(&ids_)).reshape([ids_.len() * 259]));
    assert_eq!(a, b, "bit-identical logits after save and load");
}

#[test]
fn a_checkpoint_that_is_not_a_llama_decoder_or_lacks_a_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    std::fs::create_dir(&bert).unwrap();
    std::fs::write(
        bert.join("config.json"),
        r#"{"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32}"#,
    )
    .unwrap();
    let e = s2ft_core::Pretrained::load(&bert).unwrap_err().to_string();
    assert!(
        e.contains("not a LLaMA-family decoder") && e.contains("BertModel"),
        "{e}"
    );
    // A LLaMA folder without tokenizer.json.
    let tok = s2ft_core::tokenizer::Tokenizer::byte_level_chatml().unwrap();
    let c = LlamaConfig::tiny(259, 16, 1, 2, 1, 32);
    let mut sd = Llama::<Cpu>::random(&c, 1, &Default::default())
        .unwrap()
        .to_state_dict();
    let good = dir.path().join("llama");
    s2ft_core::pretrained::save_hf_folder(&good, &c, &mut sd, &tok, u64::MAX).unwrap();
    std::fs::remove_file(good.join("tokenizer.json")).unwrap();
    let e = s2ft_core::Pretrained::load(&good).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("no tokenizer"),
        "{e}"
    );
    std::fs::write(good.join("tokenizer.json"), "{not json").unwrap();
    let e = s2ft_core::Pretrained::load(&good).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("not JSON"),
        "{e}"
    );
    let e = s2ft_core::Pretrained::load(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent"), "{e}");
}

#[test]
fn reference_scores_on_the_prompt_cache_equal_a_full_forward() {
    use burn::tensor::activation::log_softmax;
    let m = model();
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 2, 3, 9, 14],
        vec![1, 2, 3, 7],
        vec![1, 2, 3, 9, 40, 22, 6],
    ];
    // References of different lengths (one a single token).
    let refs: Vec<Vec<u32>> = vec![vec![5, 6, 7], vec![8], vec![10, 11, 12, 13, 14]];
    let cfg = GenerationConfig {
        max_new_tokens: 5,
        stop_ids: vec![],
        batch_size: 2,
        max_positions: 64,
    };
    let scored = s2ft_core::generate::greedy_scored(&m, &prompts, &refs, &cfg).unwrap();
    let plain = greedy(&m, &prompts, &cfg).unwrap();
    for ((s, g), (p, r)) in scored.iter().zip(&plain).zip(prompts.iter().zip(&refs)) {
        assert_eq!(&s.generated, g);
        assert_eq!(s.reference_tokens, r.len());
        // −Σ log p(r_j | p, r_<j) from one forward over p ++ r.
        let seq: Vec<u32> = p.iter().chain(r).copied().collect();
        let lp = log_softmax(m.forward(ids(&seq)), 2);
        let lp: Vec<f32> = lp.into_data().convert::<f32>().into_vec().unwrap();
        let want: f64 = r
            .iter()
            .enumerate()
            .map(|(j, &tok)| -(lp[(p.len() - 1 + j) * 50 + tok as usize] as f64))
            .sum();
        assert!(
            (s.reference_nll - want).abs() < 1e-4,
            "{} vs {want}",
            s.reference_nll
        );
    }
    let e = s2ft_core::generate::greedy_scored(&m, &prompts, &refs[..2], &cfg).unwrap_err();
    assert!(e.to_string().contains("2 references for 3 prompts"), "{e}");
    let e = s2ft_core::generate::greedy_scored(&m, &prompts, &[vec![1], vec![], vec![2]], &cfg)
        .unwrap_err();
    assert!(e.to_string().contains("reference 1 is empty"), "{e}");
}
