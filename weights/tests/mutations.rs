//! Fuzz-style robustness: thousands of seeded byte mutations and truncations of
//! valid safetensors and GGUF files must each open and load to a value or a
//! typed error, never a panic.

mod common;

use common::{array, fixture};
use weights::{Checkpoint, DType, StateDict, Tensor, TensorSource};

fn mutate_and_open(valid: &[u8], name: &str, rounds: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    for round in 0..rounds {
        let mut b = valid.to_vec();
        // Focus on the header, where the parsers live, but touch data too.
        let span = if round % 4 == 0 {
            b.len()
        } else {
            b.len().min(512)
        };
        for _ in 0..1 + next() % 4 {
            let i = (next() as usize) % span;
            match next() % 3 {
                0 => b[i] = next() as u8,
                1 => b[i] ^= 1 << (next() % 8),
                _ => b[i] = [0u8, 0xFF, b'"', b'{', b'}', b'9'][(next() % 6) as usize],
            }
        }
        if round % 7 == 0 {
            b.truncate((next() as usize) % b.len());
        }
        std::fs::write(&path, &b).unwrap();
        if let Ok(c) = Checkpoint::open(&path) {
            for info in c.infos() {
                let _ = c.load(&info.name);
            }
        }
    }
}

#[test]
fn mutated_safetensors_never_panic() {
    let mut sd = StateDict::new();
    sd.insert("a", Tensor::f32(array(&[3, 4], 1)));
    sd.insert("b", Tensor::new(array(&[5], 2), DType::BF16));
    sd.insert(
        "c",
        Tensor::new(ndarray::ArrayD::zeros(vec![2]), DType::I64),
    );
    sd.metadata.insert("k".into(), "v".into());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.safetensors");
    sd.save_safetensors(&p).unwrap();
    mutate_and_open(&std::fs::read(&p).unwrap(), "m.safetensors", 3000, 7);
    mutate_and_open(
        &std::fs::read(fixture("reference.safetensors")).unwrap(),
        "m.safetensors",
        2000,
        11,
    );
}

#[test]
fn mutated_gguf_never_panics() {
    mutate_and_open(
        &std::fs::read(fixture("tiny_llama.gguf")).unwrap(),
        "m.gguf",
        3000,
        13,
    );
}
