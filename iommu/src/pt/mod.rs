//! Stage-2 I/O page tables: what a paging domain's IOVA space maps to, and the DMA hot path over it.
//!
//! Rules this module carries (shared/DESIGN.md, "Stage-2 I/O page tables"):
//! - A radix table over a 48-bit IOVA space, 4 levels of 512 entries, leaves of 4 KiB, 2 MiB or 1 GiB
//!   (the entry encoding, and the spec it follows, is in [`mod@format`]).
//! - [`IoPageTable::map`] picks, at every step, the largest page size that the alignment of iova|paddr and
//!   the remaining length allow (as Linux's `iommu_pgsize` / generic_pt do), writes runs of leaves, refuses
//!   to map over anything already mapped, and on error leaves the table unchanged.
//! - [`IoPageTable::unmap`] never silently splits a huge leaf: a range that cuts one is refused and the table
//!   is left unchanged.
//! - Invalidations are gathered in a [`Gather`] and made effective once per call by [`IoPageTable::sync`].
//! - Translation ([`Translator::translate`], [`IoPageTable::iova_to_phys`]) takes no lock.
//! - Table pages come from a pool whose usage is measurable ([`IoPageTable::pool_stats`]). As in Linux, a
//!   table is freed by an unmap that covers its whole span; one emptied by smaller unmaps stays linked
//!   (idle) until such an unmap, a larger leaf mapped over it, [`IoPageTable::reclaim_idle_tables`], or the
//!   idle limit (max(1024 tables, the non-idle tables in use)) reached by an unmap.
//!
//! # Concurrency and memory safety
//! Entries are `AtomicU64`. Writers (map, unmap, sync) serialize on a small writer lock; walkers never take
//! it. Page-table pages are never returned to the allocator while the table lives (the pool keeps them), so a
//! walker holding a stale pointer still reads valid memory. A page unlinked by unmap (or by a map that puts
//! a larger leaf over idle tables) is *pending*; it becomes reusable only after a `sync` that bumps the
//! table's generation under the writer lock, after the unlink ([`IoPageTable::reclaim_idle_tables`] does
//! both under one lock).
//! Walkers read the generation before and after a walk and retry when it changed (a seqlock read), so a walk
//! that raced with the reuse of a page it passed through is never trusted:
//! - a walker that reached page T read generation `g1` before the bump that made T reusable: had it read
//!   that bump's value or a later one (every bump is an atomic read-modify-write, so later bumps continue
//!   its release sequence), the unlink would happen-before its walk and it could not have reached T;
//! - anything written into T after its reuse is written after that bump, so a walker that reads it then reads
//!   a newer generation and retries.
//!
//! The walker checks the generation before it follows each table pointer, not only at the end: T may have
//! been reused at another level, where a 4 KiB leaf (no PS bit) looks like a table pointer to a walk at the
//! old level, and following it would leave the pool (`walk::lookup`). So a stale walker never dereferences
//! anything but pool pages.
//!
//! Syncs with no page to reclaim bump the generation without the lock (a `fetch_add`; the argument above
//! holds for any mix of such bumps).
//!
//! The same generation tags every IOTLB entry of a [`Translator`]: after `sync` of an unmap returns, no
//! translator returns a translation cached before it. Maps need no invalidation (nothing negative is cached).
//!
//! Runs of entries (2 MiB-or-more maps and unmaps) are scanned by the writer with plain vector loads and
//! written with 16-byte atomic stores where the CPU documents them; the argument that this stays within
//! Rust's memory model is in `run.rs`. A table entry also records, when the writer knows it, where the
//! entries of its table are (one run of leaves, in bits the walk ignores: [`format::run_of`]), so that runs
//! mapped and unmapped again in the same table need not read the entries at all (`walk.rs`).
//!
//! # Memory
//! Keeping emptied tables linked trades memory for speed: a driver that maps and unmaps single pages (a
//! NIC in strict mode) finds its tables in place, so a map+unmap pair writes two entries and allocates
//! nothing, and the unmap's sync takes no lock. The cost is at most max(1024 tables = 4 MiB,
//! the non-idle tables) of idle tables per domain, i.e. never more than twice the memory the mappings
//! themselves need beyond 4 MiB; [`IoPageTable::reclaim_idle_tables`] returns it at once.

pub mod format;
mod iotlb;
mod pool;
mod run;
mod walk;

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

pub use iotlb::{TranslateFault, Translator, TranslatorStats, IOTLB_ENTRIES};
use pool::{Pool, Table};

/// 4 KiB: the smallest page, and the granule of every address and length.
pub const PAGE_4K: u64 = 1 << 12;
/// 2 MiB: a leaf at level 2.
pub const PAGE_2M: u64 = 1 << 21;
/// 1 GiB: a leaf at level 3.
pub const PAGE_1G: u64 = 1 << 30;
/// Width of the IOVA space: IOVAs are below `1 << IOVA_BITS`.
pub const IOVA_BITS: u32 = 48;
/// Width of the output address space: output addresses are below `1 << OA_BITS`.
pub const OA_BITS: u32 = format::OA_BITS;
/// The page sizes a leaf may have, smallest first.
pub const PAGE_SIZES: [u64; 3] = [PAGE_4K, PAGE_2M, PAGE_1G];

const IOVA_LIMIT: u64 = 1 << IOVA_BITS;
const OA_LIMIT: u64 = 1 << OA_BITS;

/// Permission of a mapping: what a device may do through it. At least one must be set to map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot {
    /// The device may read memory (DMA to the device).
    pub read: bool,
    /// The device may write memory (DMA from the device).
    pub write: bool,
}

impl Prot {
    /// Read only.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    /// Write only.
    pub const WRITE: Prot = Prot {
        read: false,
        write: true,
    };
    /// Read and write.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };

    /// Whether this permission allows `access`.
    #[inline]
    pub const fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
        }
    }
}

/// What a device does to memory through a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads memory.
    Read,
    /// The device writes memory.
    Write,
}

/// Why a map or unmap was refused. On every error the table is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PtError {
    /// The range overlaps a mapping.
    #[error("IOVA {iova:#x} is already mapped: map never replaces a mapping, unmap it first")]
    Overlap {
        /// First mapped IOVA found in the requested range.
        iova: u64,
    },
    /// The unmap range ends inside a huge leaf.
    #[error(
        "unmap range cuts the {page_size:#x}-byte leaf at IOVA {iova:#x}: huge leaves are never split, \
         unmap the whole leaf (or map with smaller pages)"
    )]
    PartialHugeUnmap {
        /// First IOVA of the leaf that would be cut.
        iova: u64,
        /// Its size.
        page_size: u64,
    },
    /// An address or the length is not a multiple of 4 KiB.
    #[error("iova {iova:#x}, paddr {paddr:#x} and length {len:#x} must all be multiples of 4 KiB")]
    Unaligned {
        /// Requested IOVA.
        iova: u64,
        /// Requested output address (0 for unmap).
        paddr: u64,
        /// Requested length.
        len: u64,
    },
    /// The IOVA range does not fit in the 48-bit IOVA space.
    #[error("IOVA range {iova:#x}+{len:#x} goes beyond the 48-bit IOVA space")]
    OutOfRange {
        /// Requested IOVA.
        iova: u64,
        /// Requested length.
        len: u64,
    },
    /// The output range does not fit in the 52-bit output address space.
    #[error("output range {paddr:#x}+{len:#x} goes beyond the 52-bit output address space")]
    OutputOutOfRange {
        /// Requested output address.
        paddr: u64,
        /// Requested length.
        len: u64,
    },
    /// Zero-length map or unmap.
    #[error("zero-length range: give a length of at least 4 KiB")]
    ZeroLength,
    /// Map with neither read nor write permission.
    #[error(
        "a mapping without read or write permission maps nothing: give Prot::READ, WRITE or RW"
    )]
    NoPermission,
    /// The pool could not get memory for table pages.
    #[error("out of memory for {pages} page-table pages: free memory or unmap something")]
    OutOfMemory {
        /// Pages that could not be allocated.
        pages: usize,
    },
}

/// Invalidations gathered by unmap (and ranges touched by map), made effective by [`IoPageTable::sync`]
/// once per call, as the Linux IOMMU core's `iommu_iotlb_gather` / `iotlb_sync`.
///
/// Use one gather per call and sync it on the table that filled it.
#[derive(Debug, Default, Clone)]
pub struct Gather {
    start: u64,
    end: u64,
    flush: bool,
    freed_pages: usize,
}

impl Gather {
    /// An empty gather.
    #[inline]
    pub const fn new() -> Self {
        Gather {
            start: u64::MAX,
            end: 0,
            flush: false,
            freed_pages: 0,
        }
    }

    /// The IOVA range touched since the last sync, if any.
    pub fn range(&self) -> Option<Range<u64>> {
        (self.start < self.end).then_some(self.start..self.end)
    }

    /// Whether sync has translations to invalidate (something was unmapped).
    pub fn needs_flush(&self) -> bool {
        self.flush
    }

    /// Table pages unlinked since the last sync (they become reusable at sync).
    pub fn freed_pages(&self) -> usize {
        self.freed_pages
    }

    #[inline]
    fn touch(&mut self, iova: u64, end: u64) {
        self.start = self.start.min(iova);
        self.end = self.end.max(end);
    }
}

/// What one map call wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Leaf entries written (all sizes).
    pub leaves_written: u64,
    /// 4 KiB leaves written.
    pub leaves_4k: u64,
    /// 2 MiB leaves written.
    pub leaves_2m: u64,
    /// 1 GiB leaves written.
    pub leaves_1g: u64,
    /// Table pages allocated.
    pub tables_allocated: u64,
}

impl MapStats {
    #[inline(always)]
    fn count_leaves(&mut self, level: u32, n: u64) {
        self.leaves_written += n;
        match level {
            1 => self.leaves_4k += n,
            2 => self.leaves_2m += n,
            _ => self.leaves_1g += n,
        }
    }
}

/// Where an IOVA goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The exact output address of the IOVA (leaf address + offset in the leaf).
    pub paddr: u64,
    /// Permission of the mapping.
    pub prot: Prot,
    /// Size of the leaf that maps it.
    pub page_size: u64,
}

/// Usage of the table's page pool. `table_pages_in_use` is 1 (the root) for a new table, after an unmap of
/// everything, and after [`IoPageTable::reclaim_idle_tables`] on a table with nothing mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Pages linked into the table (including the root and idle tables).
    pub table_pages_in_use: usize,
    /// Linked pages that hold no entry (idle: kept for the next map there, see
    /// [`IoPageTable::reclaim_idle_tables`]); the root is never counted.
    pub table_pages_idle: usize,
    /// Pages unlinked by unmap, reusable after the next sync.
    pub table_pages_pending: usize,
    /// Pages ready for reuse.
    pub table_pages_free: usize,
    /// All pages the pool holds (memory is returned when the table is dropped).
    pub table_pages_reserved: usize,
    /// Generation of the table: the number of syncs that invalidated translations.
    pub generation: u64,
}

/// A small test-and-test-and-set lock for the writers. Unlock is a plain store, lock one compare-exchange:
/// writers are short and rarely contend, and translators never take it.
struct WriterLock<T> {
    locked: AtomicBool,
    data: UnsafeCell<T>,
}

// SAFETY: the lock gives exclusive access to `data` to one thread at a time.
unsafe impl<T: Send> Sync for WriterLock<T> {}

impl<T> WriterLock<T> {
    fn new(data: T) -> Self {
        WriterLock {
            locked: AtomicBool::new(false),
            data: UnsafeCell::new(data),
        }
    }

    #[inline(always)]
    fn lock(&self) -> WriterGuard<'_, T> {
        if self
            .locked
            .compare_exchange_weak(false, true, Acquire, Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        WriterGuard { lock: self }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            if !self.locked.load(Relaxed)
                && self
                    .locked
                    .compare_exchange_weak(false, true, Acquire, Relaxed)
                    .is_ok()
            {
                return;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

struct WriterGuard<'a, T> {
    lock: &'a WriterLock<T>,
}

impl<T> Deref for WriterGuard<'_, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for WriterGuard<'_, T> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock, exclusively.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for WriterGuard<'_, T> {
    #[inline(always)]
    fn drop(&mut self) {
        self.lock.locked.store(false, Release);
    }
}

/// Writer-side state.
struct Writer {
    pool: Pool,
}

/// A generation counter on its own cache line (walkers read it on every translation).
#[repr(align(64))]
struct Generation(AtomicU64);

/// The shared state of one table; translators hold it too.
pub(crate) struct Inner {
    gen: Generation,
    root: NonNull<Table>,
    writer: WriterLock<Writer>,
}

// SAFETY: `root` points into the pool owned by `writer`, which lives as long as `Inner`. Entries are atomics;
// every mutation happens under the writer lock, and walkers only load atomics of pool pages, which stay
// allocated while `Inner` lives (see the module docs for the reuse protocol).
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

impl Inner {
    #[inline(always)]
    fn root(&self) -> &Table {
        // SAFETY: the root page is allocated at creation and never freed before `Inner` drops.
        unsafe { self.root.as_ref() }
    }

    /// Lock-free walk, retried until no sync intervened. Returns the leaf (entry, level), if any, and the
    /// generation it is valid for.
    #[inline(always)]
    pub(crate) fn walk(&self, iova: u64) -> (Option<(u64, u32)>, u64) {
        loop {
            let g1 = self.gen.0.load(Acquire);
            if iova >= IOVA_LIMIT {
                return (None, g1);
            }
            let unchanged = || self.gen.0.load(Acquire) == g1;
            if let Some(r) = walk::lookup(self.root(), iova, unchanged) {
                if unchanged() {
                    return (r, g1);
                }
            }
        }
    }

    #[inline(always)]
    pub(crate) fn generation(&self) -> u64 {
        self.gen.0.load(Acquire)
    }
}

/// A stage-2 I/O page table: one paging domain's IOVA space. `Send + Sync`: map, unmap, sync and
/// translation all take `&self`; writers serialize among themselves, translations take no lock.
pub struct IoPageTable {
    inner: Arc<Inner>,
}

impl Default for IoPageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IoPageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPageTable")
            .field("pool", &self.pool_stats())
            .finish()
    }
}

impl IoPageTable {
    /// An empty table (one root page).
    pub fn new() -> Self {
        let mut pool = Pool::new();
        let root = match pool.alloc() {
            Ok(r) => r,
            Err(_) => std::alloc::handle_alloc_error(
                std::alloc::Layout::new::<Table>(), // the pool logged why
            ),
        };
        IoPageTable {
            inner: Arc::new(Inner {
                gen: Generation(AtomicU64::new(0)),
                root,
                writer: WriterLock::new(Writer { pool }),
            }),
        }
    }

    /// Maps `[iova, iova + len)` to `[paddr, paddr + len)` with `prot`.
    ///
    /// `iova`, `paddr` and `len` must be multiples of 4 KiB. At each step the largest page size that the
    /// alignment of iova|paddr and the remaining length allow is used, and runs of leaves are written per
    /// table. Refused, with the table unchanged, when anything in the range is already mapped.
    /// Call [`IoPageTable::sync`] with `gather` afterwards (once per call).
    pub fn map(
        &self,
        iova: u64,
        paddr: u64,
        len: u64,
        prot: Prot,
        gather: &mut Gather,
    ) -> Result<MapStats, PtError> {
        let end = check_range(iova, paddr, len)?;
        if paddr.checked_add(len).is_none_or(|e| e > OA_LIMIT) {
            return Err(PtError::OutputOutOfRange { paddr, len });
        }
        let perm = format::prot_bits(prot);
        if perm == 0 {
            return Err(PtError::NoPermission);
        }
        let mut w = self.inner.writer.lock();
        let d = walk::Descent::new(self.inner.root(), iova, end);
        // Fast path: one run of leaves of the covering table's own level, on free entries.
        if let Some(stats) = walk::map_run(&d, iova, paddr, len, perm, &mut w.pool) {
            drop(w);
            gather.touch(iova, end);
            return Ok(stats);
        }
        let needed = walk::plan_map(Some(d.table), d.level, iova, end, paddr)
            .map_err(|iova| PtError::Overlap { iova })?;
        if needed > 0 {
            w.pool.reserve(needed)?;
        }
        let pending = w.pool.pending();
        let mut cx = walk::MapCtx {
            perm,
            pool: &mut w.pool,
            stats: MapStats::default(),
        };
        let added = walk::map(d.table, d.level, iova, end, paddr, &mut cx);
        let stats = cx.stats;
        // (Where the covering table's entries are is not known after the general path.)
        d.add_to_parent(added, None, &mut w.pool);
        // Idle tables replaced by larger leaves: reusable after the sync.
        let freed = w.pool.pending() - pending;
        drop(w);
        gather.touch(iova, end);
        gather.freed_pages += freed;
        Ok(stats)
    }

    /// Unmaps what is mapped in `[iova, iova + len)` and returns the bytes unmapped (holes are skipped).
    ///
    /// Refused, with the table unchanged, when the range cuts a 2 MiB or 1 GiB leaf. Tables whose whole span
    /// the range covers are unlinked and become reusable at the next sync; a table left empty by a range
    /// covering only part of its span stays linked, idle, for the next map there (see
    /// [`IoPageTable::reclaim_idle_tables`]; idle tables beyond a limit are reclaimed here). The unmap is
    /// effective for cached translations only after [`IoPageTable::sync`] with `gather`.
    pub fn unmap(&self, iova: u64, len: u64, gather: &mut Gather) -> Result<u64, PtError> {
        let end = check_range(iova, 0, len)?;
        let mut w = self.inner.writer.lock();
        let d = walk::Descent::new(self.inner.root(), iova, end);
        // Only the leaves holding the range's two ends can be cut; an end aligned to the size of the covering
        // table's entries cuts nothing (leaves under it are that size or smaller), nor does anything under a
        // leaf table (4 KiB leaves only).
        let entry_size = format::level_size(d.level);
        if len == entry_size && iova & (entry_size - 1) == 0 {
            // Fast path: the range is exactly one entry of the covering table, a leaf or nothing (so its
            // aligned ends cut nothing).
            if let Some(bytes) = walk::unmap_one(&d, iova, &mut w.pool) {
                if w.pool.idle_limit() {
                    drop(w);
                    return self.unmap_reclaim(iova, end, bytes, gather);
                }
                drop(w);
                if bytes > 0 {
                    gather.touch(iova, end);
                    gather.flush = true;
                }
                return Ok(bytes);
            }
        }
        for edge in [iova, end] {
            if d.level > 1 && edge & (entry_size - 1) != 0 && edge < d.span_end(iova) {
                if let Some((start, size)) = walk::leaf_at(d.table, d.level, edge) {
                    if start < edge {
                        return Err(PtError::PartialHugeUnmap {
                            iova: start,
                            page_size: size,
                        });
                    }
                }
            }
        }
        let pending = w.pool.pending();
        let (live, run) = d.live_run();
        let (removed, bytes, run) =
            walk::unmap(d.table, d.level, iova, end, live, run, &mut w.pool);
        d.remove_from_parent(removed, run, &mut w.pool);
        if w.pool.idle_limit() {
            self.reclaim_locked(&mut w.pool);
        }
        let freed = w.pool.pending() - pending;
        drop(w);
        if bytes > 0 || freed > 0 {
            gather.touch(iova, end);
            gather.flush = true;
            gather.freed_pages += freed;
        }
        Ok(bytes)
    }

    /// The end of an unmap whose fast path took idle tables beyond their limit: reclaim them.
    #[cold]
    fn unmap_reclaim(
        &self,
        iova: u64,
        end: u64,
        bytes: u64,
        gather: &mut Gather,
    ) -> Result<u64, PtError> {
        let mut w = self.inner.writer.lock();
        let pending = w.pool.pending();
        if w.pool.idle_limit() {
            self.reclaim_locked(&mut w.pool);
        }
        let freed = w.pool.pending() - pending;
        drop(w);
        gather.touch(iova, end);
        gather.flush = true;
        gather.freed_pages += freed;
        Ok(bytes)
    }

    /// Where `iova` goes, if it is mapped. Lock-free.
    pub fn iova_to_phys(&self, iova: u64) -> Option<Translation> {
        let (leaf, _) = self.inner.walk(iova);
        leaf.map(|(e, level)| {
            let size = format::level_size(level);
            Translation {
                paddr: format::addr(e) + (iova & (size - 1)),
                prot: format::prot_of(e),
                page_size: size,
            }
        })
    }

    /// Translates one access without an IOTLB (a lock-free walk). See [`Translator`] for the cached path.
    #[inline]
    pub fn translate(&self, iova: u64, access: Access) -> Result<u64, TranslateFault> {
        let (leaf, _) = self.inner.walk(iova);
        iotlb::check_leaf(leaf, iova, access)
    }

    /// The IOTLB sync: makes the gathered unmaps effective for every translator (cached translations
    /// older than this call are never returned again) and makes the gathered table pages reusable.
    /// Called once per map/unmap call; cheap when there is nothing to invalidate.
    #[inline]
    pub fn sync(&self, gather: &mut Gather) {
        if gather.freed_pages > 0 {
            self.flush_locked();
        } else if gather.flush {
            // Nothing to reclaim: the bump alone invalidates; no lock needed (see the module docs).
            self.inner.gen.0.fetch_add(1, AcqRel);
        }
        *gather = Gather::new();
    }

    /// Invalidates every cached translation (and makes pending table pages reusable).
    pub fn flush_all(&self) {
        self.flush_locked();
    }

    fn flush_locked(&self) {
        let mut w = self.inner.writer.lock();
        // The bump that makes pending pages reusable is taken under the writer lock, so it is ordered after
        // the unlinks of every pending page (see the module docs).
        self.inner.gen.0.fetch_add(1, AcqRel);
        w.pool.reclaim();
    }

    /// Unlinks every idle table (a table left empty by unmaps that did not cover its whole span, kept linked
    /// so that the next map there needs no allocation) and every table left empty by that, and makes them
    /// reusable (this invalidates cached translations, as a sync that frees pages does). Returns how many
    /// table pages it freed. Unmaps call it on their own when idle tables exceed
    /// max(1024, the non-idle tables in use); call it to return the table memory to its minimum.
    pub fn reclaim_idle_tables(&self) -> usize {
        let mut w = self.inner.writer.lock();
        let pending = w.pool.pending();
        self.reclaim_locked(&mut w.pool);
        let freed = w.pool.pending() - pending;
        if freed > 0 {
            // Under the writer lock, after the unlinks: see the module docs.
            self.inner.gen.0.fetch_add(1, AcqRel);
            w.pool.reclaim();
        }
        freed
    }

    #[cold]
    fn reclaim_locked(&self, pool: &mut Pool) {
        walk::reclaim_idle(self.inner.root(), format::LEVELS, pool);
        debug_assert_eq!(pool.idle, 0, "idle tables left after a reclaim");
    }

    /// Usage of the table-page pool.
    pub fn pool_stats(&self) -> PoolStats {
        let w = self.inner.writer.lock();
        PoolStats {
            table_pages_in_use: w.pool.in_use(),
            table_pages_idle: w.pool.idle,
            table_pages_pending: w.pool.pending(),
            table_pages_free: w.pool.free(),
            table_pages_reserved: w.pool.reserved(),
            generation: self.inner.generation(),
        }
    }

    /// The number of syncs that invalidated translations so far (the table's generation).
    pub fn invalidations(&self) -> u64 {
        self.inner.generation()
    }

    /// A translator (lock-free walk plus a private IOTLB) for one device thread.
    pub fn translator(&self) -> Translator {
        Translator::new(self.inner.clone())
    }
}

/// Validates a range; returns its end.
#[inline(always)]
fn check_range(iova: u64, paddr: u64, len: u64) -> Result<u64, PtError> {
    if len == 0 {
        return Err(PtError::ZeroLength);
    }
    if (iova | paddr | len) & (PAGE_4K - 1) != 0 {
        return Err(PtError::Unaligned { iova, paddr, len });
    }
    match iova.checked_add(len) {
        Some(end) if end <= IOVA_LIMIT => Ok(end),
        _ => Err(PtError::OutOfRange { iova, len }),
    }
}
