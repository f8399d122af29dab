//! The DMA-map benchmark (issue 7): ns per call of the stage-2 page table's map / unmap / translate paths,
//! and of baseline 1 (a `BTreeMap` interval map, `baseline.rs`) in the same run.
//!
//! Run it through `scripts/bench dma-map` (which adds Linux's numbers and draws the chart), or directly:
//! `cargo bench -p iommu --bench dma_map -- [--quick] [--json FILE] [--samples N] [--only CASE,..] [--count]`.
//! `--count` adds one untimed batch per map case and churn (ours only) through the never-inlined `counted_map` /
//! `counted_unmap`, for instruction counts under valgrind (docs/benchmarks.md, "What changed").
//! Without `--bench` on its command line (as under `cargo test --all-targets`) it runs every case once
//! with tiny batches as a smoke test, checking that both structures give the same answers.
//!
//! Method, as shared/ptbench and scripts/linux-ptbench: each sample times a batch of B calls on B distinct
//! IOVAs (map cases: then times the B unmaps of the same ranges); per-call time = batch time / B; W warm-up
//! batches, then S samples; the reported figure is the median over samples. Every map and unmap call is
//! one domain call: `Gather::new()`, the call, `sync` (so unmap cases include the IOTLB invalidation).
//! IOVAs start at 1 TiB, output addresses at 16 TiB plus the same offset (same alignment, so the largest
//! leaves fit), except the translate window, whose output is skewed by 4 KiB so that only 4 KiB leaves fit.

mod baseline;
mod cases;

use std::hint::black_box;
use std::io::Write;
use std::time::Instant;

use baseline::IntervalMap;
use cases::*;
use iommu::pt::{Access, Gather, IoPageTable, Prot, Translator, PAGE_4K};

/// What is measured: the page table or the baseline.
trait Subject {
    type Tr;
    /// Whether `--count` runs its counted batch (the page table's only, so that the counted functions'
    /// totals are ours).
    const COUNTED: bool;
    fn name() -> &'static str;
    fn create() -> Self;
    /// One domain map call; returns the leaves written (1 for the interval map).
    fn map(&self, iova: u64, pa: u64, len: u64) -> u64;
    /// One domain unmap call; returns the bytes unmapped.
    fn unmap(&self, iova: u64, len: u64) -> u64;
    fn translator(&self) -> Self::Tr;
    /// Translation through the fast path (IOTLB for the page table).
    fn translate_cached(&self, tr: &mut Self::Tr, iova: u64) -> u64;
    /// Translation without any cache.
    fn translate_walk(&self, iova: u64) -> u64;
}

impl Subject for IoPageTable {
    type Tr = Translator;
    const COUNTED: bool = true;
    fn name() -> &'static str {
        "iommu::pt"
    }
    fn create() -> Self {
        IoPageTable::new()
    }
    #[inline(always)]
    fn map(&self, iova: u64, pa: u64, len: u64) -> u64 {
        let mut g = Gather::new();
        let s = IoPageTable::map(self, iova, pa, len, Prot::RW, &mut g).expect("bench map");
        self.sync(&mut g);
        s.leaves_written
    }
    #[inline(always)]
    fn unmap(&self, iova: u64, len: u64) -> u64 {
        let mut g = Gather::new();
        let b = IoPageTable::unmap(self, iova, len, &mut g).expect("bench unmap");
        self.sync(&mut g);
        b
    }
    fn translator(&self) -> Translator {
        IoPageTable::translator(self)
    }
    #[inline(always)]
    fn translate_cached(&self, tr: &mut Translator, iova: u64) -> u64 {
        tr.translate(iova, Access::Read).unwrap_or(u64::MAX)
    }
    #[inline(always)]
    fn translate_walk(&self, iova: u64) -> u64 {
        self.translate(iova, Access::Read).unwrap_or(u64::MAX)
    }
}

impl Subject for IntervalMap {
    type Tr = ();
    const COUNTED: bool = false;
    fn name() -> &'static str {
        "btreemap"
    }
    fn create() -> Self {
        IntervalMap::default()
    }
    #[inline(always)]
    fn map(&self, iova: u64, pa: u64, len: u64) -> u64 {
        IntervalMap::map(self, iova, pa, len, Prot::RW).expect("bench map");
        1
    }
    #[inline(always)]
    fn unmap(&self, iova: u64, len: u64) -> u64 {
        IntervalMap::unmap(self, iova, len).expect("bench unmap")
    }
    fn translator(&self) {}
    #[inline(always)]
    fn translate_cached(&self, _: &mut (), iova: u64) -> u64 {
        self.translate(iova, Access::Read).unwrap_or(u64::MAX)
    }
    #[inline(always)]
    fn translate_walk(&self, iova: u64) -> u64 {
        self.translate(iova, Access::Read).unwrap_or(u64::MAX)
    }
}

struct Opts {
    smoke: bool,
    samples: usize,
    warmup: usize,
    only: Option<Vec<String>>,
    json: Option<String>,
    /// Run one more, untimed, batch of each map case and of churn through `counted_map`/`counted_unmap`.
    count: bool,
}

/// One result line.
struct Row {
    case: &'static str,
    ours: f64,
    base: f64,
    batch: usize,
    leaves: Option<u64>,
}

/// Times `samples` batches (after `warmup`) of `f`, which runs one batch and returns its calls; ns/call.
fn sample_batches(o: &Opts, mut f: impl FnMut() -> Vec<(usize, u128)>) -> Vec<f64> {
    // f returns (calls, ns) per timed phase; collect each phase separately.
    let mut phases: Vec<Vec<f64>> = Vec::new();
    for r in 0..o.warmup + o.samples {
        let res = f();
        if r >= o.warmup {
            phases.resize_with(res.len(), Vec::new);
            for (i, (calls, ns)) in res.into_iter().enumerate() {
                phases[i].push(ns as f64 / calls as f64);
            }
        }
    }
    phases.iter_mut().map(|p| median(p)).collect()
}

/// One map call, never inlined: with `--count`, `valgrind --tool=callgrind --toggle-collect='dma_map::counted*'`
/// counts the instructions of exactly the counted calls (see docs/benchmarks.md).
#[inline(never)]
fn counted_map<S: Subject>(s: &S, iova: u64, pa: u64, len: u64) -> u64 {
    s.map(iova, pa, len)
}

/// One unmap call, never inlined (see [`counted_map`]).
#[inline(never)]
fn counted_unmap<S: Subject>(s: &S, iova: u64, len: u64) -> u64 {
    s.unmap(iova, len)
}

/// `--count`: after the warm-up batches, one more batch of map and unmap calls through [`counted_map`] and
/// [`counted_unmap`], untimed.
fn count_map_case<S: Subject>(s: &S, c: &MapCase, batch: usize) {
    let (iova0, pa0) = (IOVA_BASE + c.off, PA_BASE + c.off);
    for j in 0..batch as u64 {
        black_box(counted_map(
            s,
            iova0 + j * c.stride,
            pa0 + j * c.stride,
            c.len,
        ));
    }
    for j in 0..batch as u64 {
        black_box(counted_unmap(s, iova0 + j * c.stride, c.len));
    }
    eprintln!(
        "[count] {} ({}): {batch} map and {batch} unmap calls",
        c.map,
        S::name()
    );
}

fn run_map_case<S: Subject>(o: &Opts, c: &MapCase) -> (Vec<f64>, u64) {
    let s = S::create();
    let batch = if o.smoke { 4 } else { c.batch };
    let iova0 = IOVA_BASE + c.off;
    let pa0 = PA_BASE + c.off;
    let leaves = s.map(iova0, pa0, c.len);
    assert_eq!(s.unmap(iova0, c.len), c.len, "{}: unmap length", c.map);
    let r = sample_batches(o, || {
        let t0 = Instant::now();
        for j in 0..batch as u64 {
            black_box(s.map(iova0 + j * c.stride, pa0 + j * c.stride, c.len));
        }
        let t1 = Instant::now();
        let mut bad = 0;
        for j in 0..batch as u64 {
            bad |= s.unmap(iova0 + j * c.stride, c.len) ^ c.len;
        }
        let t2 = Instant::now();
        assert_eq!(bad, 0, "{}: unmap returned a wrong length", c.map);
        vec![(batch, (t1 - t0).as_nanos()), (batch, (t2 - t1).as_nanos())]
    });
    if o.count && S::COUNTED {
        count_map_case(&s, c, batch);
    }
    (r, leaves)
}

fn window<S: Subject>(o: &Opts) -> (S, u64) {
    // 4 KiB leaves, mapped as a driver maps pages: one map call per 4 KiB page (one interval each in the
    // baseline); the output is skewed by 4 KiB, so even a single call could only use 4 KiB leaves.
    let s = S::create();
    let win = if o.smoke { 64 * PAGE_4K } else { WINDOW };
    for p in (0..win).step_by(PAGE_4K as usize) {
        s.map(IOVA_BASE + p, WINDOW_PA + p, PAGE_4K);
    }
    (s, win)
}

fn run_translate<S: Subject>(o: &Opts) -> Vec<f64> {
    let (s, win) = window::<S>(o);
    let batch = if o.smoke { 64 } else { LOOKUP_BATCH };
    let mut tr = s.translator();
    let hit = IOVA_BASE + 0x12345678 % win;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let random: Vec<u64> = (0..batch).map(|_| IOVA_BASE + rng.next() % win).collect();
    let hit_ns = sample_batches(o, || {
        let t0 = Instant::now();
        let mut bad = 0;
        for _ in 0..batch {
            let iova = black_box(hit);
            bad |= s.translate_cached(&mut tr, iova) ^ (iova - IOVA_BASE + WINDOW_PA);
        }
        let t1 = Instant::now();
        assert_eq!(bad, 0, "translate_hit: wrong translation");
        vec![(batch, (t1 - t0).as_nanos())]
    });
    let walk_ns = sample_batches(o, || {
        let t0 = Instant::now();
        let mut bad = 0;
        for &iova in &random {
            bad |= s.translate_walk(iova) ^ (iova - IOVA_BASE + WINDOW_PA);
        }
        let t1 = Instant::now();
        assert_eq!(bad, 0, "translate_walk: wrong translation");
        vec![(batch, (t1 - t0).as_nanos())]
    });
    vec![hit_ns[0], walk_ns[0]]
}

fn run_churn<S: Subject>(o: &Opts) -> f64 {
    // Map + unmap of one 4 KiB page at random IOVAs of the 1 GiB window, which was mapped and then
    // emptied page by page (as scripts/linux-ptbench does: in both, the emptied leaf tables stay linked,
    // so a pair writes two entries and allocates nothing). ns per map+unmap pair.
    let (s, win) = window::<S>(o);
    for p in (0..win).step_by(PAGE_4K as usize) {
        s.unmap(IOVA_BASE + p, PAGE_4K);
    }
    let batch = if o.smoke { 64 } else { CHURN_BATCH };
    let pool = churn_pool(win);
    let mut pos = 0;
    let ns = sample_batches(o, || {
        let t0 = Instant::now();
        let mut bad = 0;
        for j in 0..batch {
            let iova = pool[(pos + j) % CHURN_POOL];
            s.map(iova, iova - IOVA_BASE + PA_BASE, PAGE_4K);
            bad |= s.unmap(iova, PAGE_4K) ^ PAGE_4K;
        }
        let t1 = Instant::now();
        pos = (pos + batch) % CHURN_POOL;
        assert_eq!(bad, 0, "churn_4k: unmap returned a wrong length");
        vec![(batch, (t1 - t0).as_nanos())]
    })[0];
    if o.count && S::COUNTED {
        for j in 0..batch {
            let iova = pool[(pos + j) % CHURN_POOL];
            counted_map(&s, iova, iova - IOVA_BASE + PA_BASE, PAGE_4K);
            black_box(counted_unmap(&s, iova, PAGE_4K));
        }
        eprintln!(
            "[count] churn_4k ({}): {batch} map and {batch} unmap calls",
            S::name()
        );
    }
    ns
}

fn wanted(o: &Opts, names: &[&str]) -> bool {
    o.only
        .as_ref()
        .is_none_or(|only| names.iter().any(|n| only.iter().any(|x| x == n)))
}

fn progress(i: &mut usize, total: usize, what: &str) {
    *i += 1;
    eprint!("\r\x1b[K[dma-map {i:>2}/{total}] {what} ...");
    let _ = std::io::stderr().flush();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        smoke: !args.iter().any(|a| a == "--bench"),
        samples: 501,
        warmup: 20,
        only: None,
        json: None,
        count: false,
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
            "--count" => o.count = true,
            "--only" => o.only = it.next().map(|s| s.split(',').map(String::from).collect()),
            other => {
                eprintln!("dma_map: ignoring unknown argument '{other}'");
            }
        }
    }
    if o.smoke {
        o.samples = 1;
        o.warmup = 0;
    }
    let mut rows: Vec<Row> = Vec::new();
    let total = MAP_CASES.len() + 2;
    let mut step = 0;
    for c in MAP_CASES {
        progress(&mut step, total, c.map);
        if !wanted(&o, &[c.map, c.unmap.unwrap_or("")]) {
            continue;
        }
        let (ours, leaves) = run_map_case::<IoPageTable>(&o, c);
        assert_eq!(leaves, c.leaves, "{}: leaves one call wrote", c.map);
        let (base, _) = run_map_case::<IntervalMap>(&o, c);
        rows.push(Row {
            case: c.map,
            ours: ours[0],
            base: base[0],
            batch: c.batch,
            leaves: Some(leaves),
        });
        if let Some(u) = c.unmap {
            rows.push(Row {
                case: u,
                ours: ours[1],
                base: base[1],
                batch: c.batch,
                leaves: None,
            });
        }
    }
    progress(&mut step, total, "translate_hit, translate_walk");
    if wanted(&o, &["translate_hit", "translate_walk"]) {
        let ours = run_translate::<IoPageTable>(&o);
        let base = run_translate::<IntervalMap>(&o);
        rows.push(Row {
            case: "translate_hit",
            ours: ours[0],
            base: base[0],
            batch: LOOKUP_BATCH,
            leaves: None,
        });
        rows.push(Row {
            case: "translate_walk",
            ours: ours[1],
            base: base[1],
            batch: LOOKUP_BATCH,
            leaves: None,
        });
    }
    progress(&mut step, total, "churn_4k");
    if wanted(&o, &["churn_4k"]) {
        let ours = run_churn::<IoPageTable>(&o);
        let base = run_churn::<IntervalMap>(&o);
        rows.push(Row {
            case: "churn_4k",
            ours,
            base,
            batch: CHURN_BATCH,
            leaves: None,
        });
    }
    eprintln!(
        "\r\x1b[K[dma-map] done: {} cases, {} samples each",
        rows.len(),
        o.samples
    );

    println!(
        "{:<16} {:>12} {:>14} {:>8}   ({} vs {}, median ns per call)",
        "case",
        "ours ns/op",
        "baseline ns/op",
        "ratio",
        IoPageTable::name(),
        IntervalMap::name()
    );
    for r in &rows {
        println!(
            "{:<16} {:>12.2} {:>14.2} {:>7.1}x",
            r.case,
            r.ours,
            r.base,
            r.base / r.ours
        );
    }
    if let Some(path) = &o.json {
        let mut out = String::new();
        for r in &rows {
            out += &format!(
                "{{\"case\": \"{}\", \"ns_per_op\": {:.2}, \"baseline_ns_per_op\": {:.2}, \"samples\": {}, \"batch\": {}{}}}\n",
                r.case,
                r.ours,
                r.base,
                o.samples,
                r.batch,
                r.leaves.map(|l| format!(", \"leaves_per_call\": {l}")).unwrap_or_default()
            );
        }
        if let Err(e) = std::fs::write(path, out) {
            eprintln!("dma_map: cannot write {path}: {e}");
            std::process::exit(1);
        }
    }
}
