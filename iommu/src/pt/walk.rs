//! The one walker of the stage-2 tables: lookup (lock-free), map (plan, then write) and unmap.
//!
//! It knows how a range decomposes into entries and how tables nest; the meaning of entry bits comes from
//! [`super::format`]. Writers call these functions with the table's writer lock held; `lookup` runs with no
//! lock at all.
//!
//! Ordering: writers store entries with `Release` (a new table's entries are written before the entry that
//! links it), walkers load with `Acquire`. Writers read entries with `Relaxed` loads: only writers store, and
//! they are serialized by the writer lock.
//!
//! Writer-side scans of runs of entries ([`plain`]) use plain (non-atomic) loads, and runs of stores use
//! 16-byte atomic stores where the CPU documents them: see `run.rs` for why both are sound.
//!
//! Where the entries of a table are: a table entry counts the non-zero entries of its table and, when the
//! writer knows it, says they are one run of leaves from a given index on ([`fmt::run_of`]). Map and unmap
//! of runs of more than one entry on the covering table (and unmap's general path there) keep that run up
//! to date, so a run of entries mapped or unmapped there needs no reading of the entries; every other store
//! that changes which entries of a table are non-zero, or links a table into it (the single-entry fast
//! paths included), clears the run in the entry linking the table, with the store that updates its count.
//! Paths that zero no entry of a child table store nothing and leave its record as it was, which stays
//! true. (In debug builds every use of a run checks it against the entries; `scripts/test` runs the page
//! table tests in an optimized build with those checks on too.)

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use super::format::{
    self as fmt, addr, can_be_leaf, count, index, is_leaf, is_present, leaf_flags, level_shift,
    level_size, run_of, table_entry, with_run, COUNT_ONE, ENTRIES,
};
use super::pool::{Pool, Table};
use super::run;
use super::MapStats;

/// The table a table entry points to.
///
/// # Safety
/// `e` must be a present non-leaf entry read from a table of a live pool: its address is then a table page
/// of that pool, which stays allocated while the pool lives.
#[inline(always)]
unsafe fn child<'a>(e: u64) -> &'a Table {
    &*(addr(e) as *const Table)
}

/// Lock-free walk: the leaf entry mapping `iova` and its level (`Some(None)`: nothing maps it), or `None`
/// when `unchanged()` says the table's generation moved before a table pointer was followed (the caller
/// retries). `iova` must be below 2^48.
///
/// Why the check before every step: a walker that raced with an unmap may hold a pointer to a page that
/// has since been reused, possibly at another level, so an entry it reads there can be a 4 KiB leaf (no PS
/// bit) that a walk at the old level would take for a table pointer and follow out of the pool. Every
/// entry of a page's new life is stored (`Release`) after the generation bump that made the page
/// reusable, so a walker whose `Acquire` load returned such an entry sees that bump in `unchanged()` and
/// stops before following it. Entries of a page's old life point into the pool or are leaves.
#[inline(always)]
pub(crate) fn lookup(
    root: &Table,
    iova: u64,
    unchanged: impl Fn() -> bool,
) -> Option<Option<(u64, u32)>> {
    let (mut t, mut level) = (root, fmt::LEVELS);
    loop {
        let e = t.e[index(iova, level)].load(Acquire);
        if !is_present(e) {
            return Some(None);
        }
        if is_leaf(level, e) {
            return Some(Some((e, level)));
        }
        if !unchanged() {
            return None;
        }
        // SAFETY: a present non-leaf entry, read at the level of the table it was found in: no page on the
        // way was reused since the walk began (checked just above), so it links a page of the live pool.
        t = unsafe { child(e) };
        level -= 1;
    }
}

/// Writer-side walk (the writer lock is held, so no page changes level under it): the leaf entry mapping
/// `iova` under table `t` of `level`, which must span `iova`, and its level.
#[inline(always)]
fn lookup_from(mut t: &Table, mut level: u32, iova: u64) -> Option<(u64, u32)> {
    loop {
        let e = t.e[index(iova, level)].load(Acquire);
        if !is_present(e) {
            return None;
        }
        if is_leaf(level, e) {
            return Some((e, level));
        }
        // SAFETY: present non-leaf entry of a live table, read under the writer lock.
        t = unsafe { child(e) };
        level -= 1;
    }
}

/// The deepest existing table whose span holds all of `[iova, end)`, and the entry linking it.
/// Writer side (the writer lock is held while it is used).
pub(crate) struct Descent<'a> {
    /// The covering table.
    pub(crate) table: &'a Table,
    /// Its level.
    pub(crate) level: u32,
    /// The entry (of the table one level up) that links `table`; `None` for the root.
    parent: Option<&'a AtomicU64>,
}

impl<'a> Descent<'a> {
    /// Descend from `root` while the range lies within one entry, does not cover that entry's whole span,
    /// and that entry is a table. (A range covering a whole entry stops above it: a map may put one leaf
    /// there, over an idle table, and an unmap frees the table under it, as Linux does.)
    #[inline(always)]
    pub(crate) fn new(root: &'a Table, iova: u64, end: u64) -> Self {
        let mut d = Descent {
            table: root,
            level: fmt::LEVELS,
            parent: None,
        };
        // The range lies within one entry of level L and does not cover it iff both `iova ^ (end - 1)` and
        // the length are below that entry's size, i.e. iff their OR is: one value for all levels.
        let m = (iova ^ (end - 1)) | (end - iova);
        // Unrolled over the levels, so that every shift and mask is a constant.
        let _ = d.step::<4>(iova, m) && d.step::<3>(iova, m) && d.step::<2>(iova, m);
        d
    }

    /// One level of [`Descent::new`] from the table at level `L`; whether it went down.
    #[inline(always)]
    fn step<const L: u32>(&mut self, iova: u64, m: u64) -> bool {
        if m >> level_shift(L) != 0 {
            return false;
        }
        let slot = &self.table.e[index(iova, L)];
        let e = slot.load(Relaxed);
        if e == 0 || is_leaf(L, e) {
            return false;
        }
        self.parent = Some(slot);
        // SAFETY: present non-leaf entry; the writer lock is held.
        self.table = unsafe { child(e) };
        self.level = L - 1;
        true
    }

    /// The number of non-zero entries of the covering table, from its parent entry (`None` for the root,
    /// which has no parent entry).
    #[inline(always)]
    pub(crate) fn live(&self) -> Option<u64> {
        self.parent.map(|p| count(p.load(Relaxed)))
    }

    /// Where the covering table's non-zero entries are, if known (`None` for the root): see
    /// [`fmt::run_of`].
    #[inline(always)]
    pub(crate) fn run(&self) -> Option<usize> {
        self.parent.and_then(|p| run_of(p.load(Relaxed)))
    }

    /// The covering table's count and run, as [`Descent::live`] and [`Descent::run`] (the run is checked
    /// against the entries in debug builds).
    #[inline(always)]
    pub(crate) fn live_run(&self) -> (Option<u64>, Option<usize>) {
        let (live, run) = (self.live(), self.run());
        if let (Some(l), Some(lo)) = (live, run) {
            debug_assert!(run_matches(self.table, self.level, lo, l), "stale run");
        }
        (live, run)
    }

    /// End of the covering table's span (the range's `iova` lies in it).
    #[inline(always)]
    pub(crate) fn span_end(&self, iova: u64) -> u64 {
        let span = level_size(self.level + 1);
        (iova & !(span - 1)) + span
    }

    /// `added` entries of the covering table went from zero to non-zero: count them in its parent entry,
    /// which records `run` as where the table's entries now are ([`fmt::run_of`]; `None`: not known).
    #[inline(always)]
    pub(crate) fn add_to_parent(&self, added: u64, run: Option<usize>, pool: &mut Pool) {
        if let Some(p) = self.parent {
            let e = p.load(Relaxed);
            if added != 0 && count(e) == 0 {
                pool.idle -= 1;
            }
            let new = with_run(e + added * COUNT_ONE, run);
            if new != e {
                p.store(new, Release);
            }
        }
    }

    /// `removed` entries of the covering table became zero: uncount them in its parent entry. A table left
    /// empty stays linked (idle, see the pool): the range lies inside its span without covering it (else
    /// the descent would have stopped above it), and a range that covers a table's whole span frees it in
    /// [`unmap`].
    /// `run`: as in [`Descent::add_to_parent`].
    #[inline(always)]
    pub(crate) fn remove_from_parent(&self, removed: u64, run: Option<usize>, pool: &mut Pool) {
        if let Some(p) = self.parent {
            let e = p.load(Relaxed);
            if removed != 0 && count(e) == removed {
                pool.idle += 1;
            }
            let new = with_run(e - removed * COUNT_ONE, run);
            if new != e {
                p.store(new, Release);
            }
        }
    }
}

/// The run of a table whose `live` non-zero entries were at `run` (see [`fmt::run_of`]) after leaves were
/// written into its free entries `from..to`.
#[inline(always)]
fn run_after_map(run: Option<usize>, live: u64, from: usize, to: usize) -> Option<usize> {
    match run {
        _ if live == 0 => Some(from),
        Some(lo) if from == lo + live as usize => Some(lo),
        Some(lo) if to == lo => Some(from),
        _ => None,
    }
}

/// A table's `live` non-zero entries are the run `lo..lo + live` (see [`fmt::run_of`]) and its entries
/// `from..to` are about to be zeroed: the first of them that is non-zero, how many are, and the run left.
#[inline(always)]
fn run_cut(lo: usize, live: u64, from: usize, to: usize) -> (usize, u64, Option<usize>) {
    let hi = lo + live as usize;
    let (a, b) = (from.max(lo), to.min(hi));
    if a >= b {
        return (a, 0, Some(lo));
    }
    let left = if a == lo && b == hi {
        None // nothing left (a run index of 512 would not fit the record's 9 bits)
    } else if a == lo {
        Some(b)
    } else if b == hi {
        Some(lo)
    } else {
        None // a hole in the middle
    };
    (a, (b - a) as u64, left)
}

/// Whether the non-zero entries of `t` at `level` are exactly `lo..lo + live`, all leaves (debug checks of
/// [`fmt::run_of`]).
fn run_matches(t: &Table, level: u32, lo: usize, live: u64) -> bool {
    t.e.iter().enumerate().all(|(i, e)| {
        let e = e.load(Relaxed);
        let inside = (lo..lo + live as usize).contains(&i);
        if inside {
            e != 0 && is_leaf(level, e)
        } else {
            e == 0
        }
    })
}

/// One step of a map range's decomposition at one table level (the `iommu_pgsize` rule: the largest page
/// size that the alignment of iova|paddr and the remaining length allow).
enum MapSpan {
    /// `n` leaves of this level at entries `idx..idx + n`, first output address `pa`.
    Leaves {
        idx: usize,
        n: usize,
        iova: u64,
        pa: u64,
    },
    /// `[iova, end)` (within the entry `idx`) needs a table one level down.
    Descend {
        idx: usize,
        iova: u64,
        end: u64,
        pa: u64,
    },
}

struct MapSpans {
    level: u32,
    cur: u64,
    end: u64,
    pa: u64,
    idx: usize,
}

impl MapSpans {
    #[inline(always)]
    fn new(level: u32, cur: u64, end: u64, pa: u64) -> Self {
        MapSpans {
            level,
            cur,
            end,
            pa,
            idx: index(cur, level),
        }
    }
}

impl Iterator for MapSpans {
    type Item = MapSpan;
    #[inline(always)]
    fn next(&mut self) -> Option<MapSpan> {
        if self.cur >= self.end {
            return None;
        }
        let shift = level_shift(self.level);
        let size = 1u64 << shift;
        let (cur, pa, idx) = (self.cur, self.pa, self.idx);
        if can_be_leaf(self.level) && (cur | pa) & (size - 1) == 0 && self.end - cur >= size {
            let n = (((self.end - cur) >> shift) as usize).min(ENTRIES - idx);
            let bytes = (n as u64) << shift;
            self.cur += bytes;
            self.pa += bytes;
            self.idx += n;
            Some(MapSpan::Leaves {
                idx,
                n,
                iova: cur,
                pa,
            })
        } else {
            let sub_end = self.end.min((cur & !(size - 1)) + size);
            self.cur = sub_end;
            self.pa += sub_end - cur;
            self.idx += 1;
            Some(MapSpan::Descend {
                idx,
                iova: cur,
                end: sub_end,
                pa,
            })
        }
    }
}

/// Writer side: calls `f` with the entries `idx..idx + n` of `t` as plain `u64`s (vectorizable loads).
/// Only call it with the writer lock held; `f` must not store to the table (it cannot: it gets values).
#[inline(always)]
fn plain<R>(t: &Table, idx: usize, n: usize, f: impl FnOnce(&[u64]) -> R) -> R {
    let run = &t.e[idx..idx + n];
    // SAFETY: `AtomicU64` has the size, alignment and bit validity of `u64`. The slice is only read, and
    // only during `f`, while the caller holds the writer lock: no thread stores to these entries meanwhile
    // (walkers only load them), so these plain reads race with nothing that writes (see the module docs).
    // The slice does not outlive `f`, so no later atomic store of ours invalidates a live reference.
    let v = unsafe { std::slice::from_raw_parts(run.as_ptr().cast::<u64>(), n) };
    f(v)
}

/// OR of the entries `idx..idx + n` (writer side: plain reads, vectorized).
#[inline(always)]
fn or_entries(t: &Table, idx: usize, n: usize) -> u64 {
    plain(t, idx, n, run::or_all)
}

/// Whether the entries `idx..idx + n` of `t` at `level` are all leaves (`Some(true)`), all zero
/// (`Some(false)`), or a mix of zeros, leaves and tables (`None`). Writer side: two vectorized reductions
/// (an AND and an OR) instead of a per-entry count, which the baseline x86-64 target cannot vectorize.
#[inline(always)]
fn uniform(t: &Table, level: u32, idx: usize, n: usize) -> Option<bool> {
    plain(t, idx, n, |v| {
        // Bit 0 of `e | e >> 1` is R or W: set for every present entry. Above level 1, PS marks leaves.
        let all = if level == 1 {
            run::and_present(v) & fmt::R
        } else {
            run::and_all(v) & fmt::PS
        };
        if all != 0 {
            return Some(true);
        }
        (run::or_all(v) == 0).then_some(false)
    })
}

/// Zero the entries `idx..idx + n` (atomic stores, see `run.rs`; zero over zero is harmless to walkers).
#[inline(always)]
fn zero_entries(t: &Table, idx: usize, n: usize) {
    run::store_run(&t.e[idx..idx + n], 0, 0);
}

/// First mapped address in `[cur, end)` under the table `t` at `level`, if any (error reporting).
pub(crate) fn first_mapped(t: &Table, level: u32, mut cur: u64, end: u64) -> Option<u64> {
    let size = level_size(level);
    let mut idx = index(cur, level);
    while cur < end {
        let sub_end = end.min((cur & !(size - 1)) + size);
        let e = t.e[idx].load(Relaxed);
        if e != 0 {
            if is_leaf(level, e) {
                return Some(cur);
            }
            // SAFETY: present non-leaf entry; the writer lock is held.
            if let Some(a) = first_mapped(unsafe { child(e) }, level - 1, cur, sub_end) {
                return Some(a);
            }
        }
        cur = sub_end;
        idx += 1;
    }
    None
}

/// Plan a map of `[cur, end)` -> `pa` under `t` (or under a table yet to be allocated, `None`): checks that
/// nothing in the range is mapped (`Err(first mapped iova)`) and counts the tables the map will allocate.
/// Reads only.
pub(crate) fn plan_map(
    t: Option<&Table>,
    level: u32,
    cur: u64,
    end: u64,
    pa: u64,
) -> Result<usize, u64> {
    let mut needed = 0;
    for span in MapSpans::new(level, cur, end, pa) {
        match span {
            MapSpan::Leaves { idx, n, iova, .. } => {
                if let Some(t) = t {
                    if or_entries(t, idx, n) != 0 {
                        // Leaves, or tables that may be idle (no leaf under them): those are replaced.
                        let span_end = iova + ((n as u64) << level_shift(level));
                        if let Some(a) = first_mapped(t, level, iova, span_end) {
                            return Err(a);
                        }
                    }
                }
            }
            MapSpan::Descend { idx, iova, end, pa } => {
                let e = t.map_or(0, |t| t.e[idx].load(Relaxed));
                if e == 0 {
                    needed += 1 + plan_map(None, level - 1, iova, end, pa)?;
                } else if is_leaf(level, e) {
                    return Err(iova);
                } else {
                    // SAFETY: present non-leaf entry; the writer lock is held.
                    needed += plan_map(Some(unsafe { child(e) }), level - 1, iova, end, pa)?;
                }
            }
        }
    }
    Ok(needed)
}

/// What a map call carries down the levels.
pub(crate) struct MapCtx<'a> {
    /// Permission bits of the leaves ([`fmt::prot_bits`]).
    pub(crate) perm: u64,
    pub(crate) pool: &'a mut Pool,
    pub(crate) stats: MapStats,
}

/// Map `[cur, end)` -> `pa` under `t` at `level`, after [`plan_map`] succeeded and the pool holds the pages
/// it counted. Returns how many entries of `t` went from zero to non-zero.
pub(crate) fn map(t: &Table, level: u32, cur: u64, end: u64, pa: u64, cx: &mut MapCtx) -> u64 {
    let mut added = 0u64;
    for span in MapSpans::new(level, cur, end, pa) {
        match span {
            MapSpan::Leaves { idx, n, pa, .. } => {
                // plan_map checked that any non-zero entry here is a table with no leaf under it.
                let replaced = if or_entries(t, idx, n) != 0 {
                    unlink_idle(t, level, idx, n, cx.pool)
                } else {
                    0
                };
                write_leaves(t, level, idx, n, pa, cx.perm);
                added += n as u64 - replaced;
                cx.stats.count_leaves(level, n as u64);
            }
            MapSpan::Descend { idx, iova, end, pa } => {
                let e = t.e[idx].load(Relaxed);
                if e == 0 {
                    let Ok(new) = cx.pool.alloc() else {
                        // plan_map counted this page and the caller reserved it.
                        unreachable!("page-table pool reservation violated");
                    };
                    cx.stats.tables_allocated += 1;
                    // SAFETY: a page of the live pool.
                    let c = map(unsafe { new.as_ref() }, level - 1, iova, end, pa, cx);
                    // A fresh table that got one run of leaves of its own level: its entry says where.
                    let size = level_size(level - 1);
                    let run = (can_be_leaf(level - 1)
                        && (iova | pa | (end - iova)) & (size - 1) == 0)
                        .then(|| index(iova, level - 1));
                    t.e[idx].store(with_run(table_entry(new.as_ptr() as u64, c), run), Release);
                    added += 1;
                } else {
                    debug_assert!(!is_leaf(level, e), "plan_map let a map over a leaf through");
                    // SAFETY: present non-leaf entry; the writer lock is held.
                    let c = map(unsafe { child(e) }, level - 1, iova, end, pa, cx);
                    if count(e) == 0 && c != 0 {
                        cx.pool.idle -= 1;
                    }
                    // (Entries of the child changed: where they are is not known any more.)
                    t.e[idx].store(with_run(e + c * COUNT_ONE, None), Release);
                }
            }
        }
    }
    added
}

/// The map fast path: when `[iova, iova + len)` -> `pa` is one run of leaves of the covering table's level
/// (both addresses and the length aligned to that level's page size) and those entries are free, write them
/// and count them in the parent entry. `None`: take the general path (which also reports overlaps).
#[inline(always)]
pub(crate) fn map_run(
    d: &Descent,
    iova: u64,
    pa: u64,
    len: u64,
    perm: u64,
    pool: &mut Pool,
) -> Option<MapStats> {
    let level = d.level;
    if !can_be_leaf(level) || (iova | pa | len) & (level_size(level) - 1) != 0 {
        return None;
    }
    let idx = index(iova, level);
    let n = (len >> level_shift(level)) as usize;
    if n == 1 {
        // One leaf: no run loops, and no bookkeeping of where the entries are (single pages do not go
        // back as runs).
        let slot = &d.table.e[idx];
        if slot.load(Relaxed) != 0 {
            return None;
        }
        slot.store(pa | leaf_flags(level, perm), Release);
        d.add_to_parent(1, None, pool);
    } else {
        let (live, run) = d.live_run();
        // Descent stops where the range spans several entries, or one entry that is not a table; with an
        // aligned range that is only ever a run within this table.
        if idx + n > ENTRIES {
            return None;
        }
        // Are the entries free? Known without reading them when the table is empty (a fresh or idle one)
        // or when its entry says where its entries are.
        let free = match (live, run) {
            (Some(0), _) => true,
            (Some(l), Some(lo)) => idx + n <= lo || idx >= lo + l as usize,
            _ => or_entries(d.table, idx, n) == 0,
        };
        if !free {
            return None;
        }
        write_leaves(d.table, level, idx, n, pa, perm);
        let run = live.and_then(|l| run_after_map(run, l, idx, idx + n));
        d.add_to_parent(n as u64, run, pool);
    }
    let mut stats = MapStats::default();
    stats.count_leaves(level, n as u64);
    Some(stats)
}

/// The unmap fast path: the range is exactly the entry of the covering table at `iova`. When that entry is
/// a leaf or zero, clear it (uncounting it in the parent entry; the table stays linked even if now empty:
/// the range does not cover its span) and return the bytes unmapped; `None` when it is a table (take the
/// general path, which frees it).
#[inline(always)]
pub(crate) fn unmap_one(d: &Descent, iova: u64, pool: &mut Pool) -> Option<u64> {
    let idx = index(iova, d.level);
    let slot = &d.table.e[idx];
    let e = slot.load(Relaxed);
    if e == 0 {
        return Some(0);
    }
    if !is_leaf(d.level, e) {
        return None;
    }
    slot.store(0, Release);
    // (Where the entries are left is not worth working out for one entry.)
    d.remove_from_parent(1, None, pool);
    Some(level_size(d.level))
}

/// Write a run of `n` leaves at `level` starting at entry `idx` with output address `pa`.
#[inline(always)]
fn write_leaves(t: &Table, level: u32, idx: usize, n: usize, pa: u64, perm: u64) {
    run::store_run(
        &t.e[idx..idx + n],
        pa | leaf_flags(level, perm),
        level_size(level),
    );
}

/// The leaf mapping `iova` under `t` at `level` (writer side), as (first iova of the leaf, page size).
#[inline(always)]
pub(crate) fn leaf_at(t: &Table, level: u32, iova: u64) -> Option<(u64, u64)> {
    lookup_from(t, level, iova).map(|(_, level)| {
        let size = level_size(level);
        (iova & !(size - 1), size)
    })
}

/// Unmap what is mapped in `[cur, end)` under `t` at `level`. The caller checked that no leaf is cut by the
/// range's ends. Tables whose whole span the range covers are unlinked and released to the pool (pending
/// until sync); a table left empty by a range that covers only part of its span stays linked, idle.
/// Returns (entries of `t` that became zero, bytes unmapped).
///
/// `live` is the number of non-zero entries of `t` when known (its parent entry's count): a leaf table
/// that is full, or empty, needs no scan; nor does one whose `run` is known ([`fmt::run_of`]). Returns the
/// run of `t` afterwards too, when known.
pub(crate) fn unmap(
    t: &Table,
    level: u32,
    cur: u64,
    end: u64,
    live: Option<u64>,
    run: Option<usize>,
    pool: &mut Pool,
) -> (u64, u64, Option<usize>) {
    let shift = level_shift(level);
    let size = 1u64 << shift;
    let first = index(cur, level);
    let last = index(end - 1, level);
    if let (Some(l), Some(lo)) = (live, run) {
        // The non-zero entries are the run, all leaves. Entries only partly covered (the first and the
        // last, above level 1) are zero: a leaf there would be cut, which the caller refused.
        let (from, removed, left) = run_cut(lo, l, first, last + 1);
        if removed != 0 {
            zero_entries(t, from, removed as usize);
        }
        return (removed, removed << shift, left);
    }
    if level == 1 {
        let n = last + 1 - first;
        // (A count equal to the run's length says nothing: some of them may lie outside the run.)
        let known = match live {
            Some(0) => Some(false),
            Some(l) if l == ENTRIES as u64 => Some(true),
            _ => uniform(t, 1, first, n),
        };
        let removed = match known {
            Some(true) => n as u64,
            Some(false) => return (0, 0, None),
            None => t.e[first..=last]
                .iter()
                .map(|e| (e.load(Relaxed) != 0) as u64)
                .sum(),
        };
        zero_entries(t, first, n);
        return (removed, removed << 12, None);
    }
    let (mut removed, mut bytes) = (0u64, 0u64);
    let base = cur & !((size << 9) - 1);
    let lo = |i: usize| base + ((i as u64) << shift);
    // A partly covered entry (only the first and the last can be): recurse into its table, which stays
    // linked even when left empty.
    let partial = |i: usize, bytes: &mut u64, pool: &mut Pool| {
        let e = t.e[i].load(Relaxed);
        if e == 0 {
            return;
        }
        if is_leaf(level, e) {
            // The caller refused ranges that cut a leaf.
            debug_assert!(false, "unmap would cut a huge leaf");
            return;
        }
        // SAFETY: present non-leaf entry; the writer lock is held.
        let c = unsafe { child(e) };
        let (r, b, _) = unmap(
            c,
            level - 1,
            cur.max(lo(i)),
            end.min(lo(i) + size),
            Some(count(e)),
            None,
            pool,
        );
        *bytes += b;
        if r != 0 {
            if r == count(e) {
                pool.idle += 1;
            }
            t.e[i].store(with_run(e - r * COUNT_ONE, None), Release);
        }
    };
    // Fully covered entries: leaves are just cleared (a vectorized count, then a run of stores when there
    // is no table among them), tables cleared and released.
    let full = |from: usize, to: usize, removed: &mut u64, bytes: &mut u64, pool: &mut Pool| {
        match uniform(t, level, from, to - from) {
            Some(true) => {
                zero_entries(t, from, to - from);
                let n = (to - from) as u64;
                *removed += n;
                *bytes += n << shift;
                return;
            }
            Some(false) => return,
            None => {}
        }
        let mut leaves = 0u64;
        for slot in &t.e[from..to] {
            let e = slot.load(Relaxed);
            if e == 0 {
                continue;
            }
            slot.store(0, Release);
            if is_leaf(level, e) {
                leaves += 1;
            } else {
                // SAFETY: present non-leaf entry; the writer lock is held.
                let c = unsafe { child(e) };
                *bytes += clear(c, level - 1, count(e), pool);
                release(c, count(e), pool);
                *removed += 1;
            }
        }
        *removed += leaves;
        *bytes += leaves << shift;
    };
    let head_full = cur == lo(first);
    let tail_full = end == lo(last) + size;
    if first == last {
        if head_full && tail_full {
            full(first, first + 1, &mut removed, &mut bytes, pool);
        } else {
            partial(first, &mut bytes, pool);
        }
    } else {
        let from = if head_full {
            first
        } else {
            partial(first, &mut bytes, pool);
            first + 1
        };
        let to = if tail_full { last + 1 } else { last };
        full(from, to, &mut removed, &mut bytes, pool);
        if !tail_full {
            partial(last, &mut bytes, pool);
        }
    }
    (removed, bytes, None)
}

/// Release an unlinked, cleared table whose parent entry counted `count` entries (0: it was idle).
#[inline(always)]
fn release(t: &Table, count: u64, pool: &mut Pool) {
    if count == 0 {
        pool.idle -= 1;
    }
    pool.release(t.into());
}

/// Clear every entry of an unlinked table `t` at `level` that holds `live` non-zero entries, releasing its
/// sub-tables. Returns the bytes that were mapped under it.
fn clear(t: &Table, level: u32, mut live: u64, pool: &mut Pool) -> u64 {
    let size = level_size(level);
    let mut bytes = 0;
    for slot in t.e.iter() {
        if live == 0 {
            break;
        }
        let e = slot.load(Relaxed);
        if e == 0 {
            continue;
        }
        live -= 1;
        slot.store(0, Release);
        if is_leaf(level, e) {
            bytes += size;
        } else {
            // SAFETY: present non-leaf entry; the writer lock is held.
            let c = unsafe { child(e) };
            bytes += clear(c, level - 1, count(e), pool);
            release(c, count(e), pool);
        }
    }
    bytes
}

/// Entries `idx..idx + n` of `t` at `level` are zero or tables with no leaf under them (a map is about to
/// write leaves there): unlink those tables and release them with everything under them. Returns how many
/// entries held a table.
fn unlink_idle(t: &Table, level: u32, idx: usize, n: usize, pool: &mut Pool) -> u64 {
    let mut replaced = 0;
    for slot in &t.e[idx..idx + n] {
        let e = slot.load(Relaxed);
        if e == 0 {
            continue;
        }
        debug_assert!(!is_leaf(level, e), "plan_map let a map over a leaf through");
        slot.store(0, Release);
        // SAFETY: present non-leaf entry; the writer lock is held.
        let c = unsafe { child(e) };
        let bytes = clear(c, level - 1, count(e), pool);
        debug_assert_eq!(bytes, 0, "replaced a table holding leaves");
        release(c, count(e), pool);
        replaced += 1;
    }
    replaced
}

/// Unlink and release every idle table under the directory `t` at `level` (>= 2), and every table that
/// becomes empty that way. Leaf tables are never read: whether they are empty is in their parent entry.
/// Returns how many entries of `t` became zero.
pub(crate) fn reclaim_idle(t: &Table, level: u32, pool: &mut Pool) -> u64 {
    let mut removed = 0;
    for slot in t.e.iter() {
        let e = slot.load(Relaxed);
        if e == 0 || is_leaf(level, e) {
            continue;
        }
        // SAFETY: present non-leaf entry; the writer lock is held.
        let c = unsafe { child(e) };
        let n = count(e);
        let r = if n != 0 && level > 2 {
            reclaim_idle(c, level - 1, pool)
        } else {
            0
        };
        if r == n {
            // Idle, or emptied just now: every entry of `c` is zero.
            slot.store(0, Release);
            release(c, n, pool);
            removed += 1;
        } else if r != 0 {
            slot.store(with_run(e - r * COUNT_ONE, None), Release);
        }
    }
    removed
}
