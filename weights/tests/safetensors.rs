//! Safetensors reading and writing: round trips, reference layout, reference fixture.

mod common;

use common::{array, fixture};
use indexmap::IndexMap;
use ndarray::{ArrayD, IxDyn, arr0};
use weights::{
    DType, SafetensorsFile, SafetensorsWriter, StateDict, Tensor, TensorInfo, TensorSource,
    WeightsError,
};

fn header_json(path: &std::path::Path) -> (u64, serde_json::Value) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    (
        n,
        serde_json::from_slice(&bytes[8..8 + n as usize]).unwrap(),
    )
}

#[test]
fn round_trip_every_writable_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StateDict::new();
    let floats =
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, -2.5, 0.1, 1e-3, 65504.0, -0.0]).unwrap();
    for d in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        sd.insert(format!("float.{d}"), Tensor::new(floats.clone(), d));
    }
    let ints = ArrayD::from_shape_vec(IxDyn(&[4]), vec![0.0, 1.0, 100.0, 127.0]).unwrap();
    for d in [
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U64,
        DType::U32,
        DType::U16,
        DType::U8,
    ] {
        sd.insert(format!("int.{d}"), Tensor::new(ints.clone(), d));
    }
    let signed =
        ArrayD::from_shape_vec(IxDyn(&[3]), vec![-(2f32.powi(40)), -7.0, 16_777_216.0]).unwrap();
    sd.insert("int.I64.signed", Tensor::new(signed.clone(), DType::I64));
    sd.insert(
        "bool",
        Tensor::new(
            ArrayD::from_shape_vec(IxDyn(&[3]), vec![1.0, 0.0, 1.0]).unwrap(),
            DType::Bool,
        ),
    );
    sd.insert("scalar", Tensor::f32(arr0(3.5f32).into_dyn()));
    sd.insert("empty", Tensor::f32(ArrayD::zeros(IxDyn(&[0, 4]))));
    sd.metadata.insert("format".into(), "pt".into());

    let path = dir.path().join("all.safetensors");
    sd.save_safetensors(&path).unwrap();
    let back = StateDict::load(&path).unwrap();
    assert_eq!(back.metadata.get("format").map(String::as_str), Some("pt"));
    assert_eq!(back.len(), sd.len());
    for (name, t) in sd.iter() {
        let b = back.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(b.dtype, t.dtype, "{name}");
        assert_eq!(b.shape(), t.shape(), "{name}");
        let expect: Vec<f32> = match t.dtype {
            // The stored value is the nearest representable one, computed independently.
            DType::F16 => t
                .data
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect(),
            DType::BF16 => t
                .data
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
            _ => t.data.iter().copied().collect(),
        };
        let got: Vec<f32> = b.data.iter().copied().collect();
        assert_eq!(got.len(), expect.len());
        for (g, e) in got.iter().zip(&expect) {
            assert_eq!(g.to_bits(), e.to_bits(), "{name}: {g} vs {e}");
        }
    }
    // Spot checks of rounding: 0.1 in bf16 is 0x3DCD = 0.10009765625, in f16 0x2E66 = 0.0999755859375.
    assert_eq!(back.get("float.BF16").unwrap().data[[0, 2]], 0.100_097_656);
    assert_eq!(back.get("float.F16").unwrap().data[[0, 2]], 0.099_975_586);
}

#[test]
fn written_header_follows_the_reference_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StateDict::new();
    sd.insert("b.half", Tensor::new(array(&[3, 5], 1), DType::F16)); // 30 bytes: would misalign what follows
    sd.insert("a.double", Tensor::new(array(&[7], 2), DType::F64));
    sd.insert("c.float", Tensor::f32(array(&[4, 4], 3)));
    sd.insert("d.byte", Tensor::new(ArrayD::zeros(IxDyn(&[3])), DType::U8));
    let path = dir.path().join("x.safetensors");
    sd.save_safetensors(&path).unwrap();
    let (n, header) = header_json(&path);
    assert_eq!((8 + n) % 8, 0, "data section must start 8-byte aligned");
    let obj = header.as_object().unwrap();
    let mut spans: Vec<(u64, u64, String, usize)> = obj
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let size = match v["dtype"].as_str().unwrap() {
                "F64" => 8,
                "F32" => 4,
                "F16" => 2,
                _ => 1,
            };
            (
                o[0].as_u64().unwrap(),
                o[1].as_u64().unwrap(),
                k.clone(),
                size,
            )
        })
        .collect();
    // JSON order is offset order, offsets are contiguous from 0, every tensor is aligned.
    let json_order: Vec<u64> = spans.iter().map(|s| s.0).collect();
    let mut sorted = json_order.clone();
    sorted.sort();
    assert_eq!(json_order, sorted);
    spans.sort();
    let mut cursor = 0;
    for (start, end, name, size) in &spans {
        assert_eq!(*start, cursor, "{name} not contiguous");
        assert_eq!(start % *size as u64, 0, "{name} misaligned");
        cursor = *end;
    }
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(8 + n + cursor, file_len);

    // The reference parser reads the file and sees the same values.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("c.float").unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32);
    assert_eq!(view.shape(), &[4, 4]);
    let vals: Vec<f32> = view
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        vals,
        sd.get("c.float")
            .unwrap()
            .data
            .iter()
            .copied()
            .collect::<Vec<_>>()
    );
}

#[test]
fn reads_fixture_written_by_python_safetensors_exactly() {
    let f = SafetensorsFile::open(fixture("reference.safetensors")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("reference_values.json")).unwrap())
            .unwrap();
    assert_eq!(
        f.metadata().get("source").map(String::as_str),
        Some("make_fixtures.py")
    );
    let values = expected["values"].as_object().unwrap();
    assert_eq!(f.infos().len(), values.len());
    for (name, vals) in values {
        let t = f.load(name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(expected["shapes"][name].clone()).unwrap();
        assert_eq!(t.shape(), &shape[..], "{name}");
        assert_eq!(
            t.dtype.name(),
            expected["dtypes"][name].as_str().unwrap(),
            "{name}"
        );
        let want: Vec<f32> = vals
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got: Vec<f32> = t.data.iter().copied().collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn writer_accepts_any_order_and_refuses_incomplete_output() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let plan = vec![
        TensorInfo {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![2],
        },
        TensorInfo {
            name: "y".into(),
            dtype: DType::BF16,
            shape: vec![3],
        },
    ];
    // Incomplete: finish fails and nothing appears at the target.
    let mut w = SafetensorsWriter::create(&path, &plan, &IndexMap::new()).unwrap();
    w.write("x", array(&[2], 1).view()).unwrap();
    let err = w.finish().unwrap_err();
    assert!(
        err.to_string()
            .contains("'y' was planned but never written"),
        "{err}"
    );
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary file left behind"
    );

    // Wrong shape, unknown name, double write are errors naming the tensor.
    let mut w = SafetensorsWriter::create(&path, &plan, &IndexMap::new()).unwrap();
    assert!(matches!(
        w.write("y", array(&[2], 1).view()),
        Err(WeightsError::ShapeMismatch { .. })
    ));
    assert!(w.write("z", array(&[2], 1).view()).is_err());
    w.write("y", array(&[3], 2).view()).unwrap();
    assert!(
        w.write("y", array(&[3], 2).view())
            .unwrap_err()
            .to_string()
            .contains("twice")
    );
    w.write("x", array(&[2], 1).view()).unwrap();
    w.finish().unwrap();
    let back = StateDict::load(&path).unwrap();
    assert_eq!(back.get("x").unwrap().data, array(&[2], 1));
}

#[test]
fn failed_write_leaves_existing_output_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.safetensors");
    let mut old = StateDict::new();
    old.insert("w", Tensor::f32(array(&[4], 9)));
    old.save_safetensors(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    // An integer tensor holding 1.5 cannot be written: the save fails midway.
    let mut bad = StateDict::new();
    bad.insert("a", Tensor::f32(array(&[1000], 1)));
    bad.insert(
        "ids",
        Tensor::new(ArrayD::from_elem(IxDyn(&[2]), 1.5), DType::I64),
    );
    let err = bad.save_safetensors(&path).unwrap_err();
    assert!(
        matches!(err, WeightsError::InexactConversion { ref name, .. } if name == "ids"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn lazy_reader_gives_raw_bytes_and_single_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut sd = StateDict::new();
    sd.insert("a", Tensor::new(array(&[8, 8], 1), DType::BF16));
    sd.insert("b", Tensor::f32(array(&[2, 2], 2)));
    sd.save_safetensors(&path).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    assert_eq!(f.raw("a").unwrap().len(), 128);
    assert_eq!(f.info("b").unwrap().shape, vec![2, 2]);
    assert_eq!(f.load("b").unwrap().data, array(&[2, 2], 2));
    assert!(matches!(
        f.load("nope"),
        Err(WeightsError::TensorNotFound { .. })
    ));
}

#[test]
fn f32_tensors_are_viewed_in_place_and_other_dtypes_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = StateDict::new();
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, -2.5, 0.1, 1e-3, 7.0, -0.0]).unwrap();
    // A 1-byte tensor first, so that what follows starts at an odd offset
    // unless the writer aligns it.
    sd.insert(
        "a.u8",
        Tensor::new(ArrayD::from_elem(IxDyn(&[1]), 3.0), DType::U8),
    );
    sd.insert("b.f32", Tensor::new(x.clone(), DType::F32));
    sd.insert("c.bf16", Tensor::new(x.clone(), DType::BF16));
    let path = dir.path().join("m.safetensors");
    sd.save_safetensors(&path).unwrap();
    let f = SafetensorsFile::open(&path).unwrap();
    let bf16 = f.load("c.bf16").unwrap();
    assert!(f.f32_view("c.bf16").is_none() && f.f32_view("missing").is_none());
    // Where the view exists it is the loaded tensor, bit for bit; a
    // misaligned F32 tensor has none and still loads.
    let loaded = f.load("b.f32").unwrap();
    match f.f32_view("b.f32") {
        Some(v) => assert_eq!(
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            loaded.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        ),
        None => assert_eq!(f.raw("b.f32").unwrap().as_ptr() as usize % 4, 1),
    }
    assert_eq!(loaded.data, x);
    // An in-memory state dict views its own buffers.
    assert_eq!(sd.f32_view("b.f32").unwrap(), x.as_slice().unwrap());
    assert!(bf16.data.iter().all(|v| v.is_finite()));
}
