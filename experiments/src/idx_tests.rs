//! idx files: hand-made ones (plain and gzipped) and the vendored MNIST-10k.

use std::io::Write;
use std::path::Path;

use super::{IdxArray, IdxError, read_idx};

fn idx_bytes(code: u8, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, code, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(body);
    b
}

#[test]
fn reads_plain_and_gzipped_idx() {
    let dir = tempfile::tempdir().unwrap();
    let raw = idx_bytes(0x08, &[2, 3], &[1, 2, 3, 4, 5, 255]);
    std::fs::write(dir.path().join("a.idx"), &raw).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    std::fs::write(dir.path().join("a.idx.gz"), gz.finish().unwrap()).unwrap();
    for name in ["a.idx", "a.idx.gz"] {
        let a = read_idx(dir.path().join(name)).unwrap().into_u8().unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(a[[1, 2]], 255);
    }
    let f = idx_bytes(0x0D, &[2], &[0x3F, 0x80, 0, 0, 0xC0, 0x20, 0, 0]);
    std::fs::write(dir.path().join("f.idx"), &f).unwrap();
    match read_idx(dir.path().join("f.idx")).unwrap() {
        IdxArray::F32(a) => assert_eq!(a.as_slice().unwrap(), &[1.0, -2.5]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_idx_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.idx");
    std::fs::write(&p, idx_bytes(0x08, &[2, 3], &[1, 2, 3])).unwrap();
    assert!(matches!(read_idx(&p), Err(IdxError::Truncated { .. })));
    std::fs::write(&p, idx_bytes(0x07, &[1], &[1])).unwrap();
    assert!(matches!(
        read_idx(&p),
        Err(IdxError::UnknownType { code: 0x07, .. })
    ));
    std::fs::write(&p, [1, 0, 8, 1]).unwrap();
    let e = read_idx(&p).unwrap_err();
    assert!(matches!(e, IdxError::BadMagic { .. }));
    assert!(e.to_string().contains("x.idx"), "{e}");
}

#[test]
fn vendored_mnist_10k() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist-10k");
    let images = read_idx(root.join("train-images-idx3-ubyte.gz"))
        .unwrap()
        .into_u8()
        .unwrap();
    let labels = read_idx(root.join("train-labels-idx1-ubyte.gz"))
        .unwrap()
        .into_u8()
        .unwrap();
    assert_eq!(images.shape(), &[8000, 28, 28]);
    assert_eq!(labels.shape(), &[8000]);
    assert!(labels.iter().all(|&l| l < 10));
    // All ten digits occur, and images are not blank.
    let mut counts = [0usize; 10];
    labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert!(counts.iter().all(|&c| c > 500), "{counts:?}");
    assert!(images.iter().filter(|&&p| p > 0).count() > 8000 * 50);
    let test = read_idx(root.join("t10k-images-idx3-ubyte.gz")).unwrap();
    assert_eq!(test.shape(), &[2000, 28, 28]);
}
