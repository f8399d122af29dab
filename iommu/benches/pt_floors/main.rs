//! Floors of the DMA-map benchmark (issue 7): what the calls of each `dma_map` case cost at the least, in
//! two tiers, timed exactly as `dma_map` times the case (same IOVAs, batches, samples and medians):
//!
//! - **store floor**: only the stores of the table entries the call must change (the same entries, in the
//!   same table pages, cycled through by the batch as the page table's pages are), into a bare array of
//!   4 KiB pages: a run is written by a plain, non-atomic loop the compiler vectorizes and zeroed by
//!   `memset`, a single entry by one plain store; no lock, no descent, no check, no bookkeeping, no
//!   atomicity. A map's store floor binds any page table whose leaves are in memory, in any format (a
//!   hardware IOMMU walks them, so they must all be written); an unmap's binds any table that clears the
//!   entries it unmaps, as this one and Linux's do when the range does not cover a table's whole span (one
//!   that unlinked the table instead would owe the zeroing to the next user of the page).
//! - **locked floor**: the store floor plus the locked instructions the concurrency contract of
//!   `iommu::pt::IoPageTable` requires: writers on any thread take `&self`, so each map or unmap call
//!   takes the writer lock (one compare-exchange, released with a plain store), and the sync of a call
//!   that unmapped something bumps the table generation with an atomic read-modify-write (the IOTLB
//!   invalidation every `Translator` observes).
//!
//! `scripts/bench dma-map` runs it after `dma_map` and puts both floors next to the baseline, so that a case
//! whose "3x faster than the baseline" target lies below its floor shows as such in the same run.
//! Directly: `cargo bench -p iommu --bench pt_floors -- [--quick] [--samples N] [--json FILE]`. Without
//! `--bench` (as under `cargo test --all-targets`) it runs every case once with tiny batches and checks
//! that the stores landed where the page table puts those entries.

#[allow(dead_code)] // dma_map's translate constants are not used here
#[path = "../dma_map/cases.rs"]
mod cases;

use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU64};
use std::time::Instant;

use cases::*;
use iommu::pt::format;
use iommu::pt::{Prot, PAGE_4K};

/// One table page (512 entries, page aligned like the page table's).
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u64; format::ENTRIES]);

/// The stores of one call: `count` entries of page `page` from index `lo`, valued `first`, `first + step`,
/// ... for a map, zero for an unmap.
#[derive(Clone, Copy)]
struct Call {
    page: usize,
    lo: usize,
    count: usize,
    first: u64,
    step: u64,
}

/// The level whose leaves are `page_size` (1, 2 or 3).
fn leaf_level(page_size: u64) -> u32 {
    (1..=3)
        .find(|&l| format::level_size(l) == page_size)
        .expect("a leaf size")
}

/// The table pages a batch touches, and each call's place in them: the leaf table (level of `page_size`)
/// holding `iova` is the page keyed by `iova >> (shift + 9)`.
struct Layout {
    pages: Vec<Page>,
    calls: Vec<Call>,
}

impl Layout {
    /// `ranges`: (iova, pa, len) of each call; every leaf is `page_size`.
    fn new(ranges: impl Iterator<Item = (u64, u64, u64)>, page_size: u64) -> Layout {
        let level = leaf_level(page_size);
        let shift = format::level_shift(level);
        let flags = format::leaf_flags(level, format::prot_bits(Prot::RW));
        let mut keys = std::collections::HashMap::new();
        let mut calls = Vec::new();
        for (iova, pa, len) in ranges {
            let count = (len / page_size) as usize;
            let lo = format::index(iova, level);
            assert!(lo + count <= format::ENTRIES, "a call within one table");
            let n = keys.len();
            let page = *keys.entry(iova >> (shift + 9)).or_insert(n);
            calls.push(Call {
                page,
                lo,
                count,
                first: pa | flags,
                step: page_size,
            });
        }
        Layout {
            pages: vec![Page([0; format::ENTRIES]); keys.len()],
            calls,
        }
    }

    #[inline(always)]
    fn store(&mut self, c: &Call) {
        if c.count == 1 {
            self.pages[c.page].0[c.lo] = c.first;
            return;
        }
        let mut v = c.first;
        for e in &mut self.pages[c.page].0[c.lo..c.lo + c.count] {
            *e = v;
            v = v.wrapping_add(c.step);
        }
    }

    #[inline(always)]
    fn clear(&mut self, c: &Call) {
        if c.count == 1 {
            self.pages[c.page].0[c.lo] = 0;
            return;
        }
        self.pages[c.page].0[c.lo..c.lo + c.count].fill(0);
    }
}

/// The locked instructions of the page table's contract: a writer lock and a table generation.
#[derive(Default)]
struct Locks {
    locked: AtomicBool,
    gen: AtomicU64,
}

impl Locks {
    #[inline(always)]
    fn lock(&self) {
        while self
            .locked
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
    }
    #[inline(always)]
    fn unlock(&self) {
        self.locked.store(false, Release);
    }
    #[inline(always)]
    fn bump(&self) {
        self.gen.fetch_add(1, AcqRel);
    }
}

struct Opts {
    smoke: bool,
    samples: usize,
    warmup: usize,
    json: Option<String>,
}

/// Times `samples` batches (after `warmup`) of `f`, which runs one batch of `calls` calls; median ns/call.
fn time(o: &Opts, calls: usize, mut f: impl FnMut()) -> f64 {
    let mut v = Vec::with_capacity(o.samples);
    for r in 0..o.warmup + o.samples {
        let t0 = Instant::now();
        f();
        let ns = t0.elapsed().as_nanos() as f64 / calls as f64;
        if r >= o.warmup {
            v.push(ns);
        }
    }
    median(&mut v)
}

/// (store floor, locked floor) of a case's map and of its unmap.
fn map_case(o: &Opts, c: &MapCase) -> [(f64, f64); 2] {
    let batch = if o.smoke { 4 } else { c.batch };
    let ranges = (0..batch as u64).map(|j| {
        let at = c.off + j * c.stride;
        (IOVA_BASE + at, PA_BASE + at, c.len)
    });
    let mut l = Layout::new(ranges, c.len / c.leaves);
    let calls = l.calls.clone();
    let locks = Locks::default();
    let map = |l: &mut Layout, locked: bool| {
        for c in &calls {
            if locked {
                locks.lock();
            }
            l.store(c);
            if locked {
                locks.unlock();
            }
        }
        black_box(l.pages.as_mut_ptr());
    };
    let unmap = |l: &mut Layout, locked: bool| {
        for c in &calls {
            if locked {
                locks.lock();
            }
            l.clear(c);
            if locked {
                locks.unlock();
                locks.bump();
            }
        }
        black_box(l.pages.as_mut_ptr());
    };
    if o.smoke {
        map(&mut l, false);
        check(&l, c);
    }
    // Maps and unmaps alternate, as in dma_map (each sample there maps a batch, then unmaps it). Per
    // tier (store, locked): the medians of the maps and of the unmaps.
    let [store, locked] = [false, true].map(|locked| {
        let (mut m, mut u) = (Vec::new(), Vec::new());
        for r in 0..o.warmup + o.samples {
            let t0 = Instant::now();
            map(&mut l, locked);
            let t1 = Instant::now();
            unmap(&mut l, locked);
            let t2 = Instant::now();
            if r >= o.warmup {
                m.push((t1 - t0).as_nanos() as f64 / batch as f64);
                u.push((t2 - t1).as_nanos() as f64 / batch as f64);
            }
        }
        (median(&mut m), median(&mut u))
    });
    assert!(
        l.pages.iter().all(|p| p.0.iter().all(|&e| e == 0)),
        "{}: unmaps left entries",
        c.map
    );
    [(store.0, locked.0), (store.1, locked.1)]
}

/// Smoke check: the batch's stores are the entries the page table itself writes for those calls: each
/// call's entries are the indices of its IOVAs at the leaf level, calls share a page exactly when their
/// IOVAs share a leaf table, and each entry is the leaf the page table holds (output address, page size,
/// permission, and the encoding `format` gives a leaf).
fn check(l: &Layout, c: &MapCase) {
    let t = iommu::pt::IoPageTable::new();
    let mut g = iommu::pt::Gather::new();
    let size = c.len / c.leaves;
    let level = leaf_level(size);
    let table_span = format::level_size(level + 1);
    let mut page_of_table = std::collections::HashMap::new();
    for (j, call) in l.calls.iter().enumerate() {
        let at = c.off + j as u64 * c.stride;
        t.map(IOVA_BASE + at, PA_BASE + at, c.len, Prot::RW, &mut g)
            .expect("smoke map");
        t.sync(&mut g);
        let table = (IOVA_BASE + at) / table_span;
        assert_eq!(
            *page_of_table.entry(table).or_insert(call.page),
            call.page,
            "{}: call {j}: page of its leaf table",
            c.map
        );
        assert_eq!(call.count as u64, c.leaves, "{}: call {j}: leaves", c.map);
        for k in 0..call.count {
            let iova = IOVA_BASE + at + k as u64 * size;
            assert_eq!(format::index(iova, level), call.lo + k, "{}: index", c.map);
            let e = l.pages[call.page].0[call.lo + k];
            let want = t.iova_to_phys(iova).expect("mapped");
            assert_eq!(
                e,
                want.paddr | format::leaf_flags(level, format::prot_bits(want.prot)),
                "{}: call {j} entry {k}",
                c.map
            );
            assert_eq!(want.page_size, size, "{}: call {j} leaf size", c.map);
        }
    }
    assert_eq!(page_of_table.len(), l.pages.len(), "{}: pages", c.map);
}

/// (store floor, locked floor) of a churn_4k pair. As in dma_map, the batch reads the next IOVAs of the
/// same pool (8 bytes each); the leaf table and entry of an IOVA of the window follow from it.
fn churn(o: &Opts) -> (f64, f64) {
    let win = if o.smoke { 64 * PAGE_4K } else { WINDOW };
    let pool = churn_pool(win);
    let batch = if o.smoke { 64 } else { CHURN_BATCH };
    let table_span = format::level_size(2);
    let flags = format::leaf_flags(1, format::prot_bits(Prot::RW));
    let mut pages = vec![Page([0; format::ENTRIES]); win.div_ceil(table_span) as usize];
    let at = |iova: u64| {
        let off = iova - IOVA_BASE;
        ((off / table_span) as usize, format::index(iova, 1))
    };
    if o.smoke {
        let (t, mut g) = (iommu::pt::IoPageTable::new(), iommu::pt::Gather::new());
        for &iova in &pool[..batch] {
            let (p, i) = at(iova);
            pages[p].0[i] = (iova - IOVA_BASE + PA_BASE) | flags;
            let _ = t.map(iova, iova - IOVA_BASE + PA_BASE, PAGE_4K, Prot::RW, &mut g);
            t.sync(&mut g);
            let want = t.iova_to_phys(iova).expect("mapped");
            assert_eq!(
                pages[p].0[i],
                want.paddr | flags,
                "churn_4k: entry of {iova:#x}"
            );
            assert_eq!(
                p,
                ((iova - IOVA_BASE) >> 21) as usize,
                "churn_4k: leaf table"
            );
            pages[p].0[i] = 0;
        }
    }
    let locks = Locks::default();
    let mut pos = 0;
    let mut pairs = |pages: &mut [Page], locked: bool| {
        for j in 0..batch {
            let iova = pool[(pos + j) % CHURN_POOL];
            let (p, i) = at(iova);
            if locked {
                locks.lock();
            }
            pages[p].0[i] = (iova - IOVA_BASE + PA_BASE) | flags;
            if locked {
                locks.unlock();
                locks.lock();
            } else {
                // Two calls: the compiler must not fold the map's store into the unmap's.
                compiler_fence(SeqCst);
            }
            pages[p].0[i] = 0;
            if locked {
                locks.unlock();
                locks.bump();
            }
        }
        pos = (pos + batch) % CHURN_POOL;
        black_box(pages.as_mut_ptr());
    };
    let store = time(o, batch, || pairs(&mut pages, false));
    let locked = time(o, batch, || pairs(&mut pages, true));
    (store, locked)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        smoke: !args.iter().any(|a| a == "--bench"),
        samples: 501,
        warmup: 20,
        json: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {}
            "--quick" => {
                o.samples = 51;
                o.warmup = 5;
            }
            "--samples" => o.samples = it.next().and_then(|s| s.parse().ok()).unwrap_or(o.samples),
            "--json" => o.json = it.next().cloned(),
            other => eprintln!("pt_floors: ignoring unknown argument '{other}'"),
        }
    }
    if o.smoke {
        o.samples = 1;
        o.warmup = 0;
    }
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    let total = MAP_CASES.len() + 1;
    for (i, c) in MAP_CASES.iter().enumerate() {
        eprint!("\r\x1b[K[pt-floors {:>2}/{total}] {} ...", i + 1, c.map);
        let _ = std::io::stderr().flush();
        let [m, u] = map_case(&o, c);
        rows.push((c.map, m.0, m.1));
        if let Some(name) = c.unmap {
            rows.push((name, u.0, u.1));
        }
    }
    eprint!("\r\x1b[K[pt-floors {total:>2}/{total}] churn_4k ...");
    let (s, l) = churn(&o);
    rows.push(("churn_4k", s, l));
    eprintln!(
        "\r\x1b[K[pt-floors] done: {} cases, {} samples each",
        rows.len(),
        o.samples
    );

    println!(
        "{:<16} {:>16} {:>17}   (median ns per call)",
        "case", "store floor ns", "locked floor ns"
    );
    for (case, s, l) in &rows {
        println!("{case:<16} {s:>16.2} {l:>17.2}");
    }
    if let Some(path) = &o.json {
        let out: String = rows
            .iter()
            .map(|(case, s, l)| {
                format!(
                    "{{\"case\": \"{case}\", \"store_floor_ns_per_op\": {s:.2}, \"locked_floor_ns_per_op\": {l:.2}, \"samples\": {}}}\n",
                    o.samples
                )
            })
            .collect();
        if let Err(e) = std::fs::write(path, out) {
            eprintln!("pt_floors: cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
}
