//! `--floors`: what this machine charges for the parts of a page-table call that no implementation with a
//! writer lock and a generation counter can drop, timed like the cases (median over samples of batches).
//!
//! - `lock`: take and release an uncontended lock: one compare-exchange (a locked instruction, a full
//!   barrier on x86) and a store.
//! - `churn_pair`: the locked instructions of a single-page map + unmap pair: the map's lock, the unmap's
//!   lock, and the atomic increment of the generation by the unmap's sync (with one store to one hot entry
//!   under each lock). Nothing else: no descent, no miss.
//! - `guest_map`: a lock and a run of 64 entries (512 bytes, written as a page table writes them, 16 bytes
//!   at a time) into lines that rotate over 128 KiB as map_guest_64g's do, then the same run zeroed.
//!   ns per call (mean of the map and the zeroing).

use std::hint::black_box;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

/// Median over `samples` of the time per call of `f`, which runs `calls` calls.
fn median_ns(samples: usize, calls: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_nanos() as f64 / calls as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn lock(l: &AtomicBool) {
    while black_box(l)
        .compare_exchange_weak(false, true, Acquire, Relaxed)
        .is_err()
    {}
}

/// The three floors, in ns: (name, ns per call or pair).
pub fn measure(samples: usize) -> Vec<(&'static str, f64)> {
    let l = AtomicBool::new(false);
    let gen = AtomicU64::new(0);
    let entry = AtomicU64::new(0);
    let lock_ns = median_ns(samples, 1000, || {
        for _ in 0..1000 {
            lock(&l);
            l.store(false, Release);
        }
    });
    let pair_ns = median_ns(samples, 1000, || {
        for i in 0..1000 {
            lock(&l);
            entry.store(i, Release);
            l.store(false, Release);
            lock(&l);
            entry.store(0, Release);
            l.store(false, Release);
            black_box(&gen).fetch_add(1, AcqRel);
        }
    });
    // 32 tables of 512 entries; call j writes entries (j % 8) * 64.. of table j / 8, as map_guest_64g.
    let mut tables = vec![0u64; 32 * 512];
    let guest_ns = median_ns(samples, 512, || {
        // 1 GiB leaves from 1 TiB, then zeros.
        for (first, step) in [(1u64 << 40 | 0x83, 1u64 << 30), (0, 0)] {
            for (j, run) in tables.chunks_exact_mut(64).enumerate() {
                lock(&l);
                // Vectorized into 16-byte stores (SSE2, the x86-64 baseline).
                for (k, e) in run.iter_mut().enumerate() {
                    *e = first + k as u64 * step;
                }
                black_box(j);
                l.store(false, Release);
            }
        }
        black_box(&mut tables);
    });
    vec![
        ("lock", lock_ns),
        ("churn_pair", pair_ns),
        ("guest_map", guest_ns),
    ]
}
