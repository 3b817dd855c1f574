//! A counting global allocator: live and peak heap bytes, for memory
//! measurements (the `s2ft` study's memory columns, the efficiency example).
//! A program installs it with `#[global_allocator]`; where it is not
//! installed (a library user's program), [`installed`] is false and callers
//! report memory as not measured.
//!
//! It counts host heap only: on the CUDA backend, device memory is not seen.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// The allocator: `#[global_allocator] static A: Counting = Counting;`.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Concurrent [`PeakWindow`]s at most (more get no measurement).
const WINDOWS: usize = 32;
/// Which window slots are open (bit `i`: slot `i`).
static OPEN: AtomicU32 = AtomicU32::new(0);
/// Each open window's peak of live bytes.
static WINDOW_PEAK: [AtomicUsize; WINDOWS] = [const { AtomicUsize::new(0) }; WINDOWS];

/// Counts `n` more live bytes and raises the open windows' peaks.
fn grow(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    let mut open = OPEN.load(Ordering::Relaxed);
    while open != 0 {
        WINDOW_PEAK[open.trailing_zeros() as usize].fetch_max(now, Ordering::Relaxed);
        open &= open - 1;
    }
}

/// A peak measurement of its own: the largest live heap between
/// [`PeakWindow::open`] and [`PeakWindow::growth`] / [`PeakWindow::peak`],
/// which no other window (another thread's measurement) resets. The heap is
/// still the process's: other threads' allocations count.
pub struct PeakWindow {
    slot: Option<usize>,
    start: usize,
}

impl PeakWindow {
    /// Opens a window at the current live bytes.
    pub fn open() -> PeakWindow {
        loop {
            let open = OPEN.load(Ordering::Acquire);
            if open == u32::MAX {
                return PeakWindow {
                    slot: None,
                    start: live(),
                };
            }
            let i = (!open).trailing_zeros() as usize;
            let start = live();
            WINDOW_PEAK[i].store(start, Ordering::Relaxed);
            if OPEN
                .compare_exchange(open, open | 1 << i, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // Bytes allocated between the store and the opening count too.
                WINDOW_PEAK[i].fetch_max(live(), Ordering::Relaxed);
                return PeakWindow {
                    slot: Some(i),
                    start,
                };
            }
        }
    }

    /// How far the live heap rose above the window's start, at most, so far;
    /// `None` where [`Counting`] is not installed or all slots were taken.
    pub fn growth(&self) -> Option<usize> {
        Some(self.peak()?.saturating_sub(self.start))
    }

    /// The largest live heap since the window opened, in bytes; `None` as
    /// for [`PeakWindow::growth`].
    pub fn peak(&self) -> Option<usize> {
        let i = self.slot.filter(|_| installed())?;
        Some(WINDOW_PEAK[i].load(Ordering::Relaxed))
    }
}

impl Drop for PeakWindow {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            OPEN.fetch_and(!(1 << i), Ordering::AcqRel);
        }
    }
}

// SAFETY: every call forwards to the system allocator with the same layout;
// the counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grow(l.size());
            INSTALLED.store(true, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            if new_size >= l.size() {
                grow(new_size - l.size());
            } else {
                LIVE.fetch_sub(l.size() - new_size, Ordering::Relaxed);
            }
        }
        q
    }
}

/// Whether [`Counting`] is the program's global allocator.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Live heap bytes now.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}
