//! The DMA hot path of emulated devices: [`Translator`], a lock-free walk plus a small private IOTLB.

use std::sync::Arc;

use super::format::{self, ADDR_MASK, R, W};
use super::{Access, Inner};

/// Entries of a translator's IOTLB (direct-mapped on the 4 KiB page number).
pub const IOTLB_ENTRIES: usize = 64;

/// Why a translation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TranslateFault {
    /// Nothing is mapped at the IOVA.
    #[error(
        "IOVA {iova:#x} is not mapped in this domain: the device's driver must map it before DMA"
    )]
    NotMapped {
        /// Faulting IOVA.
        iova: u64,
    },
    /// The mapping does not allow the access.
    #[error("IOVA {iova:#x} is mapped without {access:?} permission: map it with that permission")]
    Permission {
        /// Faulting IOVA.
        iova: u64,
        /// The refused access.
        access: Access,
    },
}

/// Counters of one translator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TranslatorStats {
    /// Translations answered by the IOTLB.
    pub hits: u64,
    /// Translations that walked the table.
    pub misses: u64,
}

#[derive(Clone, Copy, Default)]
struct TlbEntry {
    /// 4 KiB page number + 1 (0: empty).
    tag: u64,
    /// Output address of the 4 KiB page | R | W.
    out: u64,
    /// Table generation the entry is valid for.
    gen: u64,
}

/// Translates IOVAs of one table for one device thread: a private IOTLB in front of the table's lock-free
/// walk. Its entries are tagged with the table's generation, so once [`super::IoPageTable::sync`] of an unmap
/// returned, no translation cached before it is returned again.
pub struct Translator {
    inner: Arc<Inner>,
    stats: TranslatorStats,
    tlb: [TlbEntry; IOTLB_ENTRIES],
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator")
            .field("stats", &self.stats)
            .finish()
    }
}

#[inline(always)]
const fn perm_bit(access: Access) -> u64 {
    match access {
        Access::Read => R,
        Access::Write => W,
    }
}

/// Turn a walk result into the output address or the fault.
#[inline(always)]
pub(super) fn check_leaf(
    leaf: Option<(u64, u32)>,
    iova: u64,
    access: Access,
) -> Result<u64, TranslateFault> {
    match leaf {
        None => Err(TranslateFault::NotMapped { iova }),
        Some((e, _)) if e & perm_bit(access) == 0 => {
            Err(TranslateFault::Permission { iova, access })
        }
        Some((e, level)) => Ok(format::addr(e) + (iova & (format::level_size(level) - 1))),
    }
}

impl Translator {
    pub(super) fn new(inner: Arc<Inner>) -> Self {
        Translator {
            inner,
            stats: TranslatorStats::default(),
            tlb: [TlbEntry::default(); IOTLB_ENTRIES],
        }
    }

    /// Translates one access of `iova`: the output address, or why not.
    #[inline]
    pub fn translate(&mut self, iova: u64, access: Access) -> Result<u64, TranslateFault> {
        let gen = self.inner.generation();
        let page = iova >> 12;
        let slot = &self.tlb[page as usize % IOTLB_ENTRIES];
        if slot.tag == page + 1 && slot.gen == gen {
            self.stats.hits += 1;
            if slot.out & perm_bit(access) != 0 {
                return Ok((slot.out & ADDR_MASK) | (iova & 0xfff));
            }
            return Err(TranslateFault::Permission { iova, access });
        }
        self.miss(iova, access)
    }

    #[inline(never)]
    fn miss(&mut self, iova: u64, access: Access) -> Result<u64, TranslateFault> {
        self.stats.misses += 1;
        let (leaf, gen) = self.inner.walk(iova);
        if let Some((e, level)) = leaf {
            let page = iova >> 12;
            let page_out = format::addr(e) + ((iova & (format::level_size(level) - 1)) & !0xfff);
            self.tlb[page as usize % IOTLB_ENTRIES] = TlbEntry {
                tag: page + 1,
                out: page_out | (e & (R | W)),
                gen,
            };
        }
        check_leaf(leaf, iova, access)
    }

    /// Hit and miss counters.
    pub fn stats(&self) -> TranslatorStats {
        self.stats
    }

    /// Drops every cached translation of this translator.
    pub fn invalidate(&mut self) {
        self.tlb = [TlbEntry::default(); IOTLB_ENTRIES];
    }
}
