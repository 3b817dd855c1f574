//! Every malformed safetensors / sharded input gets its own typed error, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{array, safetensors_bytes};
use weights::{Checkpoint, DType, ShardedCheckpoint, StateDict, Tensor, WeightsError};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn open_err(bytes: &[u8]) -> WeightsError {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.safetensors", bytes);
    let err = Checkpoint::open(&p).unwrap_err();
    // Every message names the file.
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
    err
}

#[test]
fn truncated_file() {
    assert!(matches!(
        open_err(&[1, 0, 0]),
        WeightsError::Truncated { .. }
    ));
    assert!(matches!(open_err(&[]), WeightsError::Truncated { .. }));
}

#[test]
fn header_length_beyond_file() {
    let mut b = safetensors_bytes(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    b[..8].copy_from_slice(&1_000_000u64.to_le_bytes());
    assert!(matches!(
        open_err(&b),
        WeightsError::HeaderTooLong {
            header_len: 1_000_000,
            ..
        }
    ));
}

#[test]
fn invalid_json_header() {
    let e = open_err(&safetensors_bytes(r#"{"a":{"dtype":"F32","#, &[]));
    assert!(matches!(e, WeightsError::InvalidHeader { .. }), "{e}");
    let e = open_err(&safetensors_bytes(
        r#"{"a":{"dtype":"F32","shape":"x","data_offsets":[0,4]}}"#,
        &[0; 4],
    ));
    assert!(
        matches!(e, WeightsError::InvalidHeader { ref msg, .. } if msg.contains("'a'")),
        "{e}"
    );
    let e = open_err(&safetensors_bytes(r#"[1,2]"#, &[]));
    assert!(matches!(e, WeightsError::InvalidHeader { .. }), "{e}");
}

#[test]
fn overlapping_offsets() {
    let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let e = open_err(&safetensors_bytes(h, &[0; 12]));
    assert!(
        matches!(e, WeightsError::OverlappingTensors { ref first, ref second, .. } if first == "a" && second == "b"),
        "{e}"
    );
}

#[test]
fn out_of_range_offsets() {
    let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let e = open_err(&safetensors_bytes(h, &[0; 8]));
    assert!(
        matches!(e, WeightsError::OffsetOutOfRange { ref name, end: 16, len: 8, .. } if name == "a"),
        "{e}"
    );
    let h = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}}"#;
    assert!(matches!(
        open_err(&safetensors_bytes(h, &[0; 8])),
        WeightsError::OffsetOutOfRange { .. }
    ));
}

#[test]
fn dtype_shape_byte_count_mismatch() {
    let h = r#"{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}"#;
    let e = open_err(&safetensors_bytes(h, &[0; 8]));
    assert!(
        matches!(e, WeightsError::ByteCountMismatch { expected: 6, actual: 8, ref name, .. } if name == "a"),
        "{e}"
    );
    // A shape whose element count overflows is a mismatch too, not a panic.
    let h = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,18446744073709551615,4],"data_offsets":[0,8]}}"#;
    assert!(matches!(
        open_err(&safetensors_bytes(h, &[0; 8])),
        WeightsError::ByteCountMismatch { .. }
    ));
}

#[test]
fn unknown_dtype() {
    let h = r#"{"a":{"dtype":"F12","shape":[1],"data_offsets":[0,2]}}"#;
    let e = open_err(&safetensors_bytes(h, &[0; 2]));
    assert!(
        matches!(e, WeightsError::UnknownDtype { ref dtype, ref name, .. } if dtype == "F12" && name == "a"),
        "{e}"
    );
}

#[test]
fn duplicate_names() {
    let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let e = open_err(&safetensors_bytes(h, &[0; 8]));
    assert!(
        matches!(e, WeightsError::DuplicateTensor { ref name, .. } if name == "a"),
        "{e}"
    );
}

#[test]
fn holes_and_trailing_bytes() {
    let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    assert!(matches!(
        open_err(&safetensors_bytes(h, &[0; 8])),
        WeightsError::NonContiguous { .. }
    ));
    let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    assert!(matches!(
        open_err(&safetensors_bytes(h, &[0; 9])),
        WeightsError::NonContiguous { .. }
    ));
}

#[test]
fn integers_beyond_f32_precision_are_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let big = ((1i64 << 24) + 1).to_le_bytes();
    let p = write(
        dir.path(),
        "ids.safetensors",
        &safetensors_bytes(
            r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
            &big,
        ),
    );
    let err = StateDict::load(&p).unwrap_err();
    assert!(
        matches!(err, WeightsError::InexactConversion { ref name, .. } if name == "ids"),
        "{err}"
    );
}

#[test]
fn missing_input_is_an_io_error_naming_the_path() {
    let err = Checkpoint::open("/nonexistent/model.safetensors").unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/model.safetensors"));
}

fn sharded_fixture(dir: &Path) {
    let mut sd = StateDict::new();
    sd.insert("a", Tensor::f32(array(&[4], 1)));
    sd.insert("b", Tensor::f32(array(&[4], 2)));
    sd.save_sharded(dir, 16).unwrap();
}

#[test]
fn shard_named_in_index_but_missing() {
    let dir = tempfile::tempdir().unwrap();
    sharded_fixture(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = ShardedCheckpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, WeightsError::MissingShard { ref shard, ref tensor, .. } if shard == "model-00002-of-00002.safetensors" && tensor == "b"),
        "{err}"
    );
}

#[test]
fn index_naming_a_tensor_twice_or_absent_from_its_shard() {
    let dir = tempfile::tempdir().unwrap();
    sharded_fixture(dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata":{},"weight_map":{"a":"model-00001-of-00002.safetensors","a":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = ShardedCheckpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, WeightsError::DuplicateTensor { ref name, .. } if name == "a"),
        "{err}"
    );
    std::fs::write(
        &index,
        r#"{"weight_map":{"b":"model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = ShardedCheckpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, WeightsError::TensorNotFound { ref name, .. } if name == "b"),
        "{err}"
    );
    std::fs::write(&index, r#"{"weight_map":{"b":"../elsewhere.safetensors"}}"#).unwrap();
    assert!(matches!(
        ShardedCheckpoint::open(dir.path()).unwrap_err(),
        WeightsError::InvalidHeader { .. }
    ));
    std::fs::write(&index, r#"{"metadata":{}}"#).unwrap();
    assert!(matches!(
        ShardedCheckpoint::open(dir.path()).unwrap_err(),
        WeightsError::InvalidHeader { .. }
    ));
}

#[test]
fn writing_quantised_dtype_to_safetensors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plan = vec![weights::TensorInfo {
        name: "q".into(),
        dtype: DType::Q4_0,
        shape: vec![32],
    }];
    let err = weights::SafetensorsWriter::create(
        dir.path().join("q.safetensors"),
        &plan,
        &Default::default(),
    )
    .err()
    .unwrap();
    assert!(
        matches!(err, WeightsError::UnsupportedDtype { .. }),
        "{err}"
    );
}
