//! GGUF: block dequantisation by hand, RoPE un-interleave, gguf-py fixture, malformed files.

mod common;

use common::{GgufBuilder, fixture};
use half::f16;
use weights::gguf::{hf_name, unpermute_rope_rows};
use weights::{Checkpoint, DType, GgufFile, StateDict, TensorSource, WeightsError};

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

/// One Q4_0 block: d = 0.5; low nibbles j, high nibbles 15 − j.
fn q4_0_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = f16_bytes(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut v: Vec<f32> = (0..16).map(|j| 0.5 * (j as f32 - 8.0)).collect();
    v.extend((0..16).map(|j| 0.5 * ((15 - j) as f32 - 8.0)));
    (b, v)
}

/// One Q4_1 block: d = 0.25, m = −1; low nibbles j, high nibbles (j + 1) mod 16.
fn q4_1_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = f16_bytes(0.25).to_vec();
    b.extend(f16_bytes(-1.0));
    b.extend((0..16u8).map(|j| j | (((j + 1) % 16) << 4)));
    let mut v: Vec<f32> = (0..16).map(|j| 0.25 * j as f32 - 1.0).collect();
    v.extend((0..16).map(|j| 0.25 * ((j + 1) % 16) as f32 - 1.0));
    (b, v)
}

/// One Q8_0 block: d = 2; q = −128, 127, then j − 16.
fn q8_0_block() -> (Vec<u8>, Vec<f32>) {
    let mut b = f16_bytes(2.0).to_vec();
    let qs: Vec<i8> = (0..32)
        .map(|j| {
            if j == 0 {
                -128
            } else if j == 1 {
                127
            } else {
                j as i8 - 16
            }
        })
        .collect();
    b.extend(qs.iter().map(|&q| q as u8));
    (b, qs.iter().map(|&q| 2.0 * q as f32).collect())
}

#[test]
fn quantised_blocks_dequantise_to_hand_computed_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = GgufBuilder::new();
    g.kv_str("general.architecture", "test");
    for (name, ty, (bytes, _)) in [
        ("q40", 2u32, q4_0_block()),
        ("q41", 3, q4_1_block()),
        ("q80", 8, q8_0_block()),
    ] {
        // Two rows: the block, then the block again; GGUF dims are [32, 2].
        g.tensor(name, &[32, 2], ty, bytes.repeat(2));
    }
    let path = dir.path().join("q.gguf");
    g.write(&path);
    let f = GgufFile::open(&path).unwrap();
    for (name, dtype, (_, want)) in [
        ("q40", DType::Q4_0, q4_0_block()),
        ("q41", DType::Q4_1, q4_1_block()),
        ("q80", DType::Q8_0, q8_0_block()),
    ] {
        let t = f.load(name).unwrap();
        assert_eq!(t.dtype, dtype);
        assert_eq!(t.shape(), &[2, 32], "outermost first");
        let got: Vec<f32> = t.data.iter().copied().collect();
        let mut both = want.clone();
        both.extend(&want);
        assert_eq!(got, both, "{name}");
    }
    // Non-llama architectures keep their names.
    assert!(f.info("q40").is_some());
}

#[test]
fn rope_unpermute_on_known_pattern() {
    // One head of 8 rows: GGUF rows are interleaved pairs (0,4),(1,5),(2,6),(3,7).
    let gguf_rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
    assert_eq!(
        unpermute_rope_rows(&gguf_rows, 8, 1).unwrap(),
        vec![0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]
    );
    // Two heads of 4, two columns: rows move whole, heads stay in place.
    let data: Vec<f32> = (0..16).map(|x| x as f32).collect();
    let out = unpermute_rope_rows(&data, 8, 2).unwrap();
    let rows: Vec<f32> = out.chunks(2).map(|r| r[0] / 2.0).collect();
    assert_eq!(rows, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    assert!(unpermute_rope_rows(&data, 8, 3).is_none());
}

/// llama.cpp's permutation applied to Hugging Face rows, as convert_hf_to_gguf.py does.
fn permute_like_llama_cpp(hf: &[Vec<f32>], n_head: usize) -> Vec<Vec<f32>> {
    let d = hf.len() / n_head;
    let mut out = vec![Vec::new(); hf.len()];
    for (r, row) in hf.iter().enumerate() {
        let (h, within) = (r / d, r % d);
        let (j, i) = (within / (d / 2), within % (d / 2));
        out[h * d + 2 * i + j] = row.clone();
    }
    out
}

#[test]
fn llama_names_are_mapped_and_rope_rows_restored() {
    let dir = tempfile::tempdir().unwrap();
    let (heads, kv_heads, d, cols) = (2usize, 1usize, 4usize, 3usize);
    let hf_q: Vec<Vec<f32>> = (0..heads * d)
        .map(|r| (0..cols).map(|c| (10 * r + c) as f32).collect())
        .collect();
    let hf_k: Vec<Vec<f32>> = (0..kv_heads * d)
        .map(|r| (0..cols).map(|c| (100 + 10 * r + c) as f32).collect())
        .collect();
    let flat = |rows: Vec<Vec<f32>>| rows.concat();
    let mut g = GgufBuilder::new();
    g.kv_str("general.architecture", "llama")
        .kv_u32("llama.attention.head_count", heads as u32)
        .kv_u32("llama.attention.head_count_kv", kv_heads as u32)
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.embedding_length", cols as u32)
        .kv_u32("llama.feed_forward_length", 5)
        .kv_f32("llama.rope.freq_base", 500000.0)
        .kv_str_array("tokenizer.ggml.tokens", &["a", "b", "c"]);
    g.f32_tensor(
        "blk.0.attn_q.weight",
        &[cols as u64, (heads * d) as u64],
        &flat(permute_like_llama_cpp(&hf_q, heads)),
    );
    g.f32_tensor(
        "blk.0.attn_k.weight",
        &[cols as u64, (kv_heads * d) as u64],
        &flat(permute_like_llama_cpp(&hf_k, kv_heads)),
    );
    g.f32_tensor(
        "blk.0.attn_v.weight",
        &[cols as u64, (kv_heads * d) as u64],
        &flat(hf_k.clone()),
    );
    g.f32_tensor("output_norm.weight", &[cols as u64], &[1.0, 2.0, 3.0]);
    let path = dir.path().join("llama.gguf");
    g.write(&path);
    let f = GgufFile::open(&path).unwrap();
    let sd = f.load_all().unwrap();
    assert_eq!(
        sd.get("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .data
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        flat(hf_q)
    );
    assert_eq!(
        sd.get("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .data
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        flat(hf_k.clone())
    );
    // v is not rotated, so it is not permuted.
    assert_eq!(
        sd.get("model.layers.0.self_attn.v_proj.weight")
            .unwrap()
            .data
            .iter()
            .copied()
            .collect::<Vec<_>>(),
        flat(hf_k)
    );
    assert!(sd.contains("model.norm.weight"));
    assert_eq!(f.gguf_name("model.norm.weight"), Some("output_norm.weight"));
    let cfg = f.config();
    assert_eq!(
        (cfg.head_count, cfg.head_count_kv, cfg.vocab_size),
        (Some(2), Some(1), Some(3))
    );
    assert_eq!(cfg.rope_freq_base, Some(500000.0));
    assert!(cfg.tie_word_embeddings);
    let hf = cfg.to_hf_config().unwrap();
    assert_eq!(hf["num_key_value_heads"], 1);
    assert_eq!(hf["rope_theta"], 500000.0);
}

#[test]
fn name_mapping_table() {
    assert_eq!(
        hf_name("token_embd.weight").unwrap(),
        "model.embed_tokens.weight"
    );
    assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
    assert_eq!(
        hf_name("blk.12.attn_output.weight").unwrap(),
        "model.layers.12.self_attn.o_proj.weight"
    );
    assert_eq!(
        hf_name("blk.0.ffn_norm.weight").unwrap(),
        "model.layers.0.post_attention_layernorm.weight"
    );
    assert_eq!(
        hf_name("blk.3.attn_q.bias").unwrap(),
        "model.layers.3.self_attn.q_proj.bias"
    );
    assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    assert_eq!(hf_name("rope_freqs.weight"), None);
}

#[test]
fn gguf_py_fixture_matches_its_reference_dequantisation() {
    let f = GgufFile::open(fixture("tiny_llama.gguf")).unwrap();
    let expected = StateDict::load(fixture("tiny_llama_expected.safetensors")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.infos().len(), expected.len());
    let mut kinds = std::collections::BTreeSet::new();
    for (name, want) in expected.iter() {
        let got = f.load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        kinds.insert(got.dtype);
        assert_eq!(got.shape(), want.shape(), "{name}");
        let max_err = got
            .data
            .iter()
            .zip(want.data.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_err <= 1e-6,
            "{name} ({}): max |diff| {max_err}",
            got.dtype
        );
    }
    assert_eq!(
        kinds.len(),
        5,
        "F32, F16, Q8_0, Q4_0 and Q4_1 all exercised: {kinds:?}"
    );
    let cfg = f.config();
    assert_eq!(
        (
            cfg.block_count,
            cfg.embedding_length,
            cfg.feed_forward_length,
            cfg.head_count,
            cfg.head_count_kv,
            cfg.vocab_size
        ),
        (Some(1), Some(64), Some(96), Some(4), Some(2), Some(10))
    );
    assert_eq!(
        Checkpoint::open(fixture("tiny_llama.gguf"))
            .unwrap()
            .format(),
        "gguf"
    );
}

fn valid_file() -> Vec<u8> {
    let mut g = GgufBuilder::new();
    g.kv_str("general.architecture", "llama")
        .kv_u32("llama.attention.head_count", 1);
    g.f32_tensor("output_norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0]);
    g.tensor("blk.0.ffn_up.weight", &[32, 1], 8, q8_0_block().0);
    g.build()
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, WeightsError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    GgufFile::open(&p)
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let bytes = valid_file();
    assert!(open_bytes(&bytes).is_ok());
    for cut in 0..bytes.len() {
        let r = open_bytes(&bytes[..cut]);
        assert!(r.is_err(), "prefix of {cut} bytes was accepted");
    }
}

#[test]
fn malformed_headers_get_typed_errors() {
    let mut b = valid_file();
    b[0] = b'X';
    assert!(matches!(open_bytes(&b), Err(WeightsError::BadMagic { .. })));
    for v in [1u32, 4] {
        let mut b = valid_file();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        assert!(
            matches!(open_bytes(&b), Err(WeightsError::UnsupportedVersion { version, .. }) if version == v)
        );
    }
    // Version 2 files read as well.
    let mut g = GgufBuilder::new();
    g.version = 2;
    g.f32_tensor("x", &[2], &[1.0, 2.0]);
    assert_eq!(open_bytes(&g.build()).unwrap().version(), 2);
}

#[test]
fn unknown_and_unsupported_tensor_types() {
    let mut g = GgufBuilder::new();
    g.tensor("w", &[32], 99, vec![0; 32]);
    assert!(
        matches!(open_bytes(&g.build()), Err(WeightsError::UnknownGgmlType { ggml_type: 99, ref name, .. }) if name == "w")
    );
    let mut g = GgufBuilder::new();
    g.tensor("w", &[256], 12, vec![0; 144]); // Q4_K
    let e = open_bytes(&g.build()).unwrap_err();
    assert!(
        matches!(e, WeightsError::UnsupportedDtype { ref dtype, .. } if dtype == "Q4_K"),
        "{e}"
    );
}

#[test]
fn duplicate_overlapping_misaligned_and_out_of_range_tensors() {
    let mut g = GgufBuilder::new();
    g.f32_tensor("a", &[2], &[1.0, 2.0])
        .f32_tensor("a", &[2], &[1.0, 2.0]);
    assert!(
        matches!(open_bytes(&g.build()), Err(WeightsError::DuplicateTensor { ref name, .. }) if name == "a")
    );

    let mut g = GgufBuilder::new();
    g.tensor_at("a", &[16], 0, vec![0; 64], 0)
        .tensor_at("b", &[16], 0, vec![0; 64], 32);
    let e = open_bytes(&g.build()).unwrap_err();
    assert!(matches!(e, WeightsError::OverlappingTensors { .. }), "{e}");

    let mut g = GgufBuilder::new();
    g.tensor_at("a", &[1], 0, vec![0; 4], 4);
    assert!(
        matches!(open_bytes(&g.build()), Err(WeightsError::InvalidHeader { ref msg, .. }) if msg.contains("alignment"))
    );

    let mut g = GgufBuilder::new();
    g.f32_tensor("a", &[4], &[0.0; 4]);
    let mut b = g.build();
    b.truncate(b.len() - 4); // the data section ends inside the tensor
    let e = open_bytes(&b).unwrap_err();
    assert!(
        matches!(e, WeightsError::OffsetOutOfRange { ref name, .. } if name == "a"),
        "{e}"
    );

    let mut g = GgufBuilder::new();
    g.tensor("q", &[33], 2, vec![0; 36]); // a row that is not a whole number of blocks
    assert!(matches!(
        open_bytes(&g.build()),
        Err(WeightsError::InvalidHeader { .. })
    ));

    let mut g = GgufBuilder::new();
    g.f32_tensor("a", &[1, 1, 1, 1, 1], &[0.0]);
    assert!(matches!(
        open_bytes(&g.build()),
        Err(WeightsError::InvalidHeader { .. })
    ));
}

#[test]
fn huge_lengths_do_not_allocate_or_panic() {
    // A string length of 2^60 and an array count of 2^60.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    assert!(matches!(
        open_bytes(&b),
        Err(WeightsError::Truncated { .. })
    ));
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.push(b'k');
    b.extend(9u32.to_le_bytes());
    b.extend(4u32.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    assert!(matches!(
        open_bytes(&b),
        Err(WeightsError::Truncated { .. })
    ));
}
