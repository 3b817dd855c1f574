//! Sharded Hugging Face checkpoints: write, read back, index contents.

mod common;

use std::collections::HashMap;

use common::array;
use weights::{Checkpoint, DType, ShardedCheckpoint, StateDict, Tensor, TensorSource};

fn model() -> StateDict {
    let mut sd = StateDict::new();
    for i in 0..5 {
        sd.insert(
            format!("layers.{i}.weight"),
            Tensor::f32(array(&[16, 8], i)),
        );
        sd.insert(
            format!("layers.{i}.bias"),
            Tensor::new(array(&[16], 100 + i), DType::BF16),
        );
    }
    sd.metadata.insert("format".into(), "pt".into());
    sd
}

#[test]
fn sharded_write_then_read_equals_original() {
    let dir = tempfile::tempdir().unwrap();
    let sd = model();
    // 16*8*4 = 512 bytes per weight: a 1200-byte limit gives several shards.
    sd.save_sharded(dir.path(), 1200).unwrap();
    let ckpt = ShardedCheckpoint::open(dir.path()).unwrap();
    assert!(ckpt.shards().len() > 1);
    for s in ckpt.shards() {
        let bytes = std::fs::metadata(s.path()).unwrap().len();
        let data: u64 = s
            .infos()
            .iter()
            .map(|i| i.dtype.bytes_for(i.numel() as u128).unwrap() as u64)
            .sum();
        assert!(data <= 1200, "{} holds {data} bytes", s.path().display());
        assert!(bytes > data);
    }
    let back = ckpt.load_all().unwrap();
    assert_eq!(back.len(), sd.len());
    for (name, t) in sd.iter() {
        let b = back.get(name).unwrap();
        assert_eq!(b.dtype, t.dtype);
        if t.dtype == DType::F32 {
            assert_eq!(b.data, t.data, "{name}");
        } else {
            let want = t.data.mapv(|v| half::bf16::from_f32(v).to_f32());
            assert_eq!(b.data, want, "{name}");
        }
    }
    // Checkpoint::open recognises the folder and the index file alike.
    assert_eq!(Checkpoint::open(dir.path()).unwrap().format(), "sharded");
    assert_eq!(
        Checkpoint::open(dir.path().join("model.safetensors.index.json"))
            .unwrap()
            .format(),
        "sharded"
    );
}

#[test]
fn index_lists_every_tensor_once_with_total_size() {
    let dir = tempfile::tempdir().unwrap();
    let sd = model();
    sd.save_sharded(dir.path(), 1200).unwrap();
    let text = std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap();
    let index: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), sd.len());
    let mut per_file: HashMap<String, Vec<String>> = HashMap::new();
    for (name, file) in map {
        assert!(sd.contains(name));
        per_file
            .entry(file.as_str().unwrap().to_string())
            .or_default()
            .push(name.clone());
    }
    let n = per_file.len();
    for (file, names) in &per_file {
        assert!(file.ends_with(&format!("-of-{n:05}.safetensors")), "{file}");
        let shard = weights::SafetensorsFile::open(dir.path().join(file)).unwrap();
        let mut in_shard = shard.names();
        in_shard.sort();
        let mut listed = names.clone();
        listed.sort();
        assert_eq!(in_shard, listed, "{file}");
    }
    let total: u64 = sd
        .iter()
        .map(|(_, t)| t.data.len() as u64 * if t.dtype == DType::F32 { 4 } else { 2 })
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
}

#[test]
fn single_folder_without_index_and_oversized_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StateDict::new();
    sd.insert("big", Tensor::f32(array(&[100], 1)));
    sd.insert("small", Tensor::f32(array(&[2], 2)));
    // A tensor bigger than the limit gets a shard of its own.
    sd.save_sharded(dir.path().join("s"), 10).unwrap();
    assert_eq!(
        ShardedCheckpoint::open(dir.path().join("s"))
            .unwrap()
            .shards()
            .len(),
        2
    );
    // A folder holding just model.safetensors opens as one file.
    sd.save_safetensors(dir.path().join("model.safetensors"))
        .unwrap();
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.format(), "safetensors");
    assert_eq!(c.load("big").unwrap().data, array(&[100], 1));
}
