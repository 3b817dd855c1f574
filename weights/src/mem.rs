//! Large buffers backed by transparent huge pages.
//!
//! On this kind of machine a fresh 75 MB buffer spends most of its first write
//! in 4 KiB page faults (≈ 75 ms single-threaded, far more when threads fault
//! together). Where the kernel leaves huge pages to the program (`madvise`
//! mode), advising them cuts the faults 512-fold. Decoding tensors, similarity
//! matrices and merge outputs all allocate such buffers.

/// Reserves room for `n` more values in `out`, advising huge pages for the
/// whole-page part of the allocation when it is at least 4 MiB.
pub fn reserve_huge<T>(out: &mut Vec<T>, n: usize) {
    out.reserve(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = out.capacity() * std::mem::size_of::<T>();
        if bytes >= 2 * HUGE {
            let start = out.as_mut_ptr() as usize;
            let lo = start.next_multiple_of(HUGE);
            let hi = (start + bytes) / HUGE * HUGE;
            if hi > lo {
                // SAFETY: [lo, hi) lies inside the allocation `out` owns;
                // MADV_HUGEPAGE changes no contents, only how the kernel backs
                // the pages. A failure (no THP) is harmless.
                unsafe {
                    libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
}

/// Tells the kernel the whole pages inside `bytes` (part of a read-only file
/// mapping) are not needed now, so they leave this process's resident set.
/// The mapping stays valid: the next read faults the pages back in from the
/// file. Does nothing off Linux or for a slice not backed by a file mapping
/// (the call then fails harmlessly or is never made).
pub fn release_pages(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        let page = 4096usize;
        let start = bytes.as_ptr() as usize;
        let lo = start.next_multiple_of(page);
        let hi = (start + bytes.len()) / page * page;
        if hi > lo {
            // SAFETY: [lo, hi) lies inside `bytes`, which callers take from a
            // read-only shared file mapping; MADV_DONTNEED on such pages
            // discards only the cached copy, never the contents.
            unsafe {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

/// A vector of `n` copies of `value`, huge-page backed when large.
pub fn filled<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = Vec::new();
    reserve_huge(&mut v, n);
    v.resize(n, value);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_has_the_value_everywhere() {
        for n in [0, 1, 1000, 3 << 20] {
            let v = filled(n, 1.5f64);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 1.5));
        }
    }
}
