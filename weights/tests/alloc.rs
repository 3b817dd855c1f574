//! The counting allocator, installed for this test binary.

#[global_allocator]
static A: weights::alloc::Counting = weights::alloc::Counting;

#[test]
fn peak_and_live_follow_allocations() {
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
