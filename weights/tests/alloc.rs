//! The counting allocator, installed for this test binary.

#[global_allocator]
static A: weights::alloc::Counting = weights::alloc::Counting;

/// One test function: a second test thread's own allocations and frees
/// (the harness starting it) would move the process heap these checks read.
#[test]
fn counting_allocator() {
    peak_and_live_follow_allocations();
    peak_windows_do_not_reset_each_other();
}

fn peak_and_live_follow_allocations() {
    assert!(weights::alloc::installed());
    let window = weights::alloc::PeakWindow::open();
    let before = weights::alloc::live();
    let big = vec![1u8; 10 << 20];
    let mut grown = vec![0u32; 1 << 10];
    grown.resize(1 << 20, 7); // realloc: +4 MB - 4 KB
    assert!(
        weights::alloc::live() >= before + (10 << 20) + (4 << 20),
        "{} vs {before}",
        weights::alloc::live()
    );
    let peak = window.peak().unwrap();
    drop(big);
    drop(grown);
    // Other test threads may allocate a little meanwhile; the 14 MB dominate.
    assert!(peak >= before + (14 << 20), "{peak} vs {before}");
    assert!(weights::alloc::live() < before + (1 << 20));
}

/// A window's peak is its own: another window opened and closed inside it
/// (another thread's measurement; a single global peak, reset by every
/// measurement, used to be lowered so) does not lower it, and a window opened after the allocation is freed
/// does not see it.
fn peak_windows_do_not_reset_each_other() {
    use weights::alloc::PeakWindow;
    let outer = PeakWindow::open();
    let big = vec![1u8; 8 << 20];
    drop(big);
    let inner = PeakWindow::open();
    let small = vec![1u8; 1 << 20];
    let inner_growth = inner.growth().unwrap();
    drop(small);
    drop(inner);
    let grew = outer.growth().unwrap();
    assert!(grew >= 8 << 20, "{grew}");
    assert!((1 << 20..8 << 20).contains(&inner_growth), "{inner_growth}");
    // Every slot taken: the windows beyond them measure nothing.
    let many: Vec<PeakWindow> = (0..40).map(|_| PeakWindow::open()).collect();
    assert!(many.iter().filter(|w| w.growth().is_none()).count() >= 8);
}
