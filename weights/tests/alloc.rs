//! The counting allocator, installed for this test binary.

#[global_allocator]
static A: weights::alloc::Counting = weights::alloc::Counting;

/// The tests measure the one process heap: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn peak_and_live_follow_allocations() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(weights::alloc::installed());
    let before = weights::alloc::reset_peak();
    let big = vec![1u8; 10 << 20];
    let mut grown = vec![0u32; 1 << 10];
    grown.resize(1 << 20, 7); // realloc: +4 MB - 4 KB
    assert!(weights::alloc::live() >= before + (10 << 20) + (4 << 20));
    let peak = weights::alloc::peak();
    drop(big);
    drop(grown);
    // Other test threads may allocate a little meanwhile; the 14 MB dominate.
    assert!(peak >= before + (14 << 20), "{peak} vs {before}");
    assert!(weights::alloc::live() < before + (1 << 20));
}

/// A window's peak is its own: another window opened and closed inside it
/// (another thread's measurement, which used to reset the one global peak)
/// does not lower it, and a window opened after the allocation is freed
/// does not see it.
#[test]
fn peak_windows_do_not_reset_each_other() {
    use weights::alloc::PeakWindow;
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let outer = PeakWindow::open();
    let big = vec![1u8; 8 << 20];
    drop(big);
    let inner = PeakWindow::open();
    let small = vec![1u8; 1 << 20];
    let inner_growth = inner.growth().unwrap();
    drop(small);
    drop(inner);
    let _ = weights::alloc::reset_peak();
    let grew = outer.growth().unwrap();
    assert!(grew >= 8 << 20, "{grew}");
    assert!((1 << 20..8 << 20).contains(&inner_growth), "{inner_growth}");
    // Every slot taken: the windows beyond them measure nothing.
    let many: Vec<PeakWindow> = (0..40).map(|_| PeakWindow::open()).collect();
    assert!(many.iter().filter(|w| w.growth().is_none()).count() >= 8);
}
