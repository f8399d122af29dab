//! Where page-table pages come from: a pool that only returns memory to the allocator when the whole
//! table is dropped.
//!
//! Why: translations walk the tables without a lock, so a walker may still hold a pointer to a table page
//! that a writer has just unlinked. Pages therefore go through three states:
//! `in use` (linked into the tree) -> `pending` (unlinked by an unmap; a walker may still read it) ->
//! `free` (after the next `sync`, which bumps the table's generation; see `mod.rs` for why that makes reuse
//! safe) -> `in use` again. Since pool memory stays allocated while the table lives, a stale walker always
//! reads valid memory of atomics; the generation check makes it retry instead of trusting what it read.
//!
//! Every page in `free` and `pending` is all zero: tables are freed only when empty (or after being
//! cleared), so allocation needs no zeroing.
//!
//! A table emptied by an unmap that covers only part of its span is not freed: it stays linked, *idle*
//! (its parent entry counts zero entries), so that the next map there (a driver mapping and unmapping
//! single pages in strict mode) finds its tables in place instead of allocating and freeing them on every
//! pair, as Linux's generic page tables do. The pool counts idle tables; they are freed by an unmap that
//! covers their whole span, when a map puts a larger leaf over them, by
//! [`super::IoPageTable::reclaim_idle_tables`], and automatically once they exceed [`Pool::idle_limit`].

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use super::format::{ADDR_MASK, ENTRIES};
use super::PtError;

/// One page of 512 entries. Entries are atomics because walkers read them while a writer writes.
#[repr(C, align(4096))]
pub(crate) struct Table {
    pub(crate) e: [AtomicU64; ENTRIES],
}

/// Size of one table page.
pub(crate) const TABLE_BYTES: usize = std::mem::size_of::<Table>();
const MIN_CHUNK_PAGES: usize = 8;
const MAX_CHUNK_PAGES: usize = 512;

/// The pool of table pages of one `IoPageTable`. Only the writer (under the table's writer lock) touches it.
pub(crate) struct Pool {
    chunks: Vec<(NonNull<u8>, Layout)>,
    free: Vec<NonNull<Table>>,
    pending: Vec<NonNull<Table>>,
    in_use: usize,
    reserved: usize,
    /// Linked tables whose parent entry counts zero entries (included in `in_use`).
    pub(crate) idle: usize,
}

/// Idle tables always allowed (4 MiB of table pages).
pub(crate) const IDLE_FLOOR: usize = 1024;

impl Pool {
    pub(crate) fn new() -> Self {
        Pool {
            chunks: Vec::new(),
            free: Vec::new(),
            pending: Vec::new(),
            in_use: 0,
            reserved: 0,
            idle: 0,
        }
    }

    /// Makes sure `n` pages can be allocated without failing.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), PtError> {
        while self.free.len() < n {
            self.grow(n - self.free.len())?;
        }
        Ok(())
    }

    fn grow(&mut self, at_least: usize) -> Result<(), PtError> {
        let pages = self
            .reserved
            .clamp(MIN_CHUNK_PAGES, MAX_CHUNK_PAGES)
            .max(at_least);
        let layout = Layout::from_size_align(pages * TABLE_BYTES, TABLE_BYTES)
            .map_err(|_| PtError::OutOfMemory { pages })?;
        // SAFETY: layout has a non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        let Some(base) = NonNull::new(base) else {
            log::error!("page-table pool: cannot allocate {pages} pages");
            return Err(PtError::OutOfMemory { pages });
        };
        if base.as_ptr() as u64 + (pages * TABLE_BYTES) as u64 > (ADDR_MASK | 0xfff) + 1 {
            // Table entries hold the table's address in bits 51:12; memory above that cannot be linked.
            // SAFETY: allocated just above with this layout.
            unsafe { dealloc(base.as_ptr(), layout) };
            log::error!("page-table pool: allocator returned memory above 2^52");
            return Err(PtError::OutOfMemory { pages });
        }
        self.chunks.push((base, layout));
        self.free.reserve(pages);
        for i in (0..pages).rev() {
            // SAFETY: i < pages, inside the chunk just allocated.
            let p = unsafe { base.as_ptr().add(i * TABLE_BYTES) } as *mut Table;
            // SAFETY: non-null (inside a non-null allocation).
            self.free.push(unsafe { NonNull::new_unchecked(p) });
        }
        self.reserved += pages;
        Ok(())
    }

    /// A zeroed page, linked by the caller.
    #[inline]
    pub(crate) fn alloc(&mut self) -> Result<NonNull<Table>, PtError> {
        if self.free.is_empty() {
            self.grow(1)?;
        }
        let p = self.free.pop().ok_or(PtError::OutOfMemory { pages: 1 })?;
        self.in_use += 1;
        Ok(p)
    }

    /// A page the caller unlinked and cleared; it becomes reusable at the next [`Pool::reclaim`].
    #[inline]
    pub(crate) fn release(&mut self, page: NonNull<Table>) {
        #[cfg(debug_assertions)]
        {
            // SAFETY: page belongs to this pool, which is alive.
            let t = unsafe { page.as_ref() };
            debug_assert!(
                t.e.iter()
                    .all(|e| e.load(std::sync::atomic::Ordering::Relaxed) == 0),
                "freed table page not empty"
            );
        }
        self.pending.push(page);
        self.in_use -= 1;
    }

    /// Pending pages become free. Call only after the table's generation was bumped (under the writer lock)
    /// after those pages were unlinked.
    pub(crate) fn reclaim(&mut self) {
        self.free.append(&mut self.pending);
    }

    /// Whether idle tables exceed their limit: more than [`IDLE_FLOOR`] and more than the tables in use
    /// that are not idle (so idle tables never more than double the memory of what is mapped, beyond
    /// 4 MiB).
    #[inline(always)]
    pub(crate) fn idle_limit(&self) -> bool {
        self.idle > IDLE_FLOOR && self.idle > self.in_use - self.idle
    }

    pub(crate) fn in_use(&self) -> usize {
        self.in_use
    }
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }
    pub(crate) fn free(&self) -> usize {
        self.free.len()
    }
    pub(crate) fn reserved(&self) -> usize {
        self.reserved
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (base, layout) in self.chunks.drain(..) {
            // SAFETY: allocated in grow() with this layout; the pool owns it and no table outlives the pool
            // (the pool lives in the table's shared state, dropped when the last handle goes).
            unsafe { dealloc(base.as_ptr(), layout) };
        }
    }
}
