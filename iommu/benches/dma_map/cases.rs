//! The cases of the DMA-map benchmark: what each call maps, where, and in batches of how many. Shared by
//! `dma_map` (the page table and baseline 1) and `pt_floors` (what the same calls' stores cost by
//! themselves), so that both time exactly the same IOVAs.

use iommu::pt::{PAGE_1G, PAGE_2M, PAGE_4K};

pub const IOVA_BASE: u64 = 1 << 40;
pub const PA_BASE: u64 = 1 << 44;
pub const MIB: u64 = 1 << 20;

/// A map case: B calls of `len` bytes at `IOVA_BASE + off + j * stride`.
pub struct MapCase {
    pub map: &'static str,
    pub unmap: Option<&'static str>,
    pub len: u64,
    pub off: u64,
    pub stride: u64,
    pub batch: usize,
    /// Leaves one page-table call must write.
    pub leaves: u64,
}

pub const MAP_CASES: &[MapCase] = &[
    MapCase {
        map: "map_4k",
        unmap: Some("unmap_4k"),
        len: PAGE_4K,
        off: 0,
        stride: PAGE_4K,
        batch: 4096,
        leaves: 1,
    },
    MapCase {
        map: "map_2m",
        unmap: Some("unmap_2m"),
        len: PAGE_2M,
        off: 0,
        stride: PAGE_2M,
        batch: 2048,
        leaves: 1,
    },
    MapCase {
        map: "map_1g",
        unmap: Some("unmap_1g"),
        len: PAGE_1G,
        off: 0,
        stride: PAGE_1G,
        batch: 1024,
        leaves: 1,
    },
    // 1 MiB at 2 MiB + 1 MiB: 1 MiB aligned, not 2 MiB aligned: 256 x 4K.
    MapCase {
        map: "map_256x4k",
        unmap: Some("unmap_256x4k"),
        len: MIB,
        off: MIB,
        stride: PAGE_2M,
        batch: 512,
        leaves: 256,
    },
    MapCase {
        map: "map_256x2m",
        unmap: Some("unmap_256x2m"),
        len: 256 * PAGE_2M,
        off: 0,
        stride: PAGE_1G,
        batch: 256,
        leaves: 256,
    },
    MapCase {
        map: "map_256x1g",
        unmap: Some("unmap_256x1g"),
        len: 256 * PAGE_1G,
        off: 0,
        stride: 512 * PAGE_1G,
        batch: 192,
        leaves: 256,
    },
    // A VMM mapping 64 GiB of guest RAM at boot, 1 GiB aligned: 64 leaves.
    MapCase {
        map: "map_guest_64g",
        unmap: None,
        len: 64 * PAGE_1G,
        off: 0,
        stride: 64 * PAGE_1G,
        batch: 256,
        leaves: 64,
    },
];

pub const WINDOW: u64 = PAGE_1G;
pub const WINDOW_PA: u64 = PA_BASE + PAGE_4K;
pub const LOOKUP_BATCH: usize = 16384;
pub const CHURN_BATCH: usize = 4096;
pub const CHURN_POOL: usize = 65536;

/// The IOVAs churn_4k maps and unmaps, in order (cycled through batch after batch): random 4 KiB pages of
/// the window `[IOVA_BASE, IOVA_BASE + win)`.
pub fn churn_pool(win: u64) -> Vec<u64> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..CHURN_POOL)
        .map(|_| IOVA_BASE + (rng.next() % (win / PAGE_4K)) * PAGE_4K)
        .collect()
}

/// Deterministic xorshift, so both subjects see the same IOVAs.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The median of `v` (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
