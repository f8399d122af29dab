//! Guest memory: anonymous memory from vm-memory, optionally backed by hugetlbfs pages (MAP_HUGETLB) or
//! advised for transparent huge pages, laid out around the 32-bit MMIO hole, and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::layout::{HIGH_RAM_4G, LOW_RAM_END, MAX_RAM};

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// 2 MiB, the huge page size used for hugetlbfs backing.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Ordinary anonymous memory, with `madvise(MADV_HUGEPAGE)` when `thp` is true.
    Anonymous {
        /// Ask for transparent huge pages.
        thp: bool,
    },
    /// 2 MiB hugetlbfs pages (MAP_HUGETLB): the host must have enough free huge pages.
    HugeTlb,
}

/// Errors of guest memory set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The size is not usable.
    #[error("guest memory size {0:#x} is invalid: it must be at least 64 MiB and at most {MAX_RAM:#x}, in whole MiB")]
    BadSize(u64),
    /// hugetlbfs asked but the size is not a multiple of 2 MiB.
    #[error("hugepages=on needs a memory size that is a multiple of 2 MiB (got {0:#x})")]
    HugeAlign(u64),
    /// hugetlbfs mapping failed.
    #[error(
        "hugepages=on: could not map {size_mib} MiB of 2 MiB huge pages ({source}); the host has {free} free \
         huge pages of {total} ({needed} needed): raise /proc/sys/vm/nr_hugepages or use hugepages=off"
    )]
    HugePages {
        /// Requested size in MiB.
        size_mib: u64,
        /// HugePages_Free.
        free: u64,
        /// HugePages_Total.
        total: u64,
        /// Pages needed.
        needed: u64,
        /// mmap's error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Anonymous mapping failed.
    #[error("could not allocate {size_mib} MiB of guest memory: {source}")]
    Mmap {
        /// Requested size in MiB.
        size_mib: u64,
        /// mmap's error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory refused the region layout (an internal error).
    #[error("guest memory layout refused: {0}")]
    Layout(String),
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot} ({size:#x} bytes at {guest:#x}): {source}")]
    Slot {
        /// Slot number.
        slot: u32,
        /// Guest address.
        guest: u64,
        /// Size.
        size: u64,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

/// The RAM ranges (guest address, size) for `size` bytes of RAM: below 3 GiB, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(LOW_RAM_END);
    let mut v = vec![(GuestAddress(0), low)];
    if size > low {
        v.push((GuestAddress(HIGH_RAM_4G), size - low));
    }
    v
}

fn meminfo_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Allocates guest RAM of `size` bytes with `backing`.
pub fn create(size: u64, backing: Backing) -> Result<GuestMemory, Error> {
    if !((64 << 20)..=MAX_RAM).contains(&size) || !size.is_multiple_of(1 << 20) {
        return Err(Error::BadSize(size));
    }
    if backing == Backing::HugeTlb && !size.is_multiple_of(HUGE_PAGE_SIZE) {
        return Err(Error::HugeAlign(size));
    }
    let mut regions = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let flags = match backing {
            // MAP_HUGETLB without a size flag uses the default huge page size (2 MiB on x86-64). No
            // MAP_NORESERVE: the pages are reserved at mmap time, so a host without enough free huge pages
            // fails here with a clear error instead of the guest dying of SIGBUS later.
            Backing::HugeTlb => libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB,
            Backing::Anonymous { .. } => {
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE
            }
        };
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(backing == Backing::HugeTlb)
            .build()
            .map_err(|source| match backing {
                Backing::HugeTlb => Error::HugePages {
                    size_mib: size >> 20,
                    free: meminfo_field("HugePages_Free:"),
                    total: meminfo_field("HugePages_Total:"),
                    needed: size / HUGE_PAGE_SIZE,
                    source,
                },
                Backing::Anonymous { .. } => Error::Mmap {
                    size_mib: size >> 20,
                    source,
                },
            })?;
        if let Backing::Anonymous { thp: true } = backing {
            // SAFETY: the range is the mapping just created, owned by `mapping`; madvise only changes
            // how the kernel backs it.
            let rc = unsafe {
                libc::madvise(mapping.as_ptr().cast(), len as usize, libc::MADV_HUGEPAGE)
            };
            if rc != 0 {
                log::info!(
                    "madvise(MADV_HUGEPAGE) refused ({}); guest RAM uses small pages",
                    std::io::Error::last_os_error()
                );
            }
        }
        let region = GuestRegionMmap::new(mapping, addr)
            .ok_or_else(|| Error::Layout(format!("region at {:#x} overflows", addr.0)))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| Error::Layout(e.to_string()))
}

/// Registers every region of `mem` with KVM as slots 0, 1, ...; returns the next free slot number.
pub fn register(vm: &VmFd, mem: &GuestMemory) -> Result<u32, Error> {
    let mut slot = 0u32;
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        let guest = region.start_addr().0;
        let size = region.len();
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the VM keeps for as long as the
        // VM exists (the Vm struct owns both; the slot dies with the VM fd).
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| Error::Slot {
            slot,
            guest,
            size,
            source,
        })?;
        log::debug!("memory slot {slot}: {size:#x} bytes at {guest:#x}");
        slot += 1;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (GuestAddress(0), LOW_RAM_END),
                (GuestAddress(HIGH_RAM_4G), (4 << 30) - LOW_RAM_END)
            ]
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            create(1 << 20, Backing::Anonymous { thp: false }),
            Err(Error::BadSize(_))
        ));
        assert!(matches!(
            create((64 << 20) + 1, Backing::Anonymous { thp: false }),
            Err(Error::BadSize(_))
        ));
        assert!(matches!(
            create(65 << 20, Backing::HugeTlb),
            Err(Error::HugeAlign(_))
        ));
    }

    #[test]
    fn anonymous_memory_is_usable() {
        use vm_memory::Bytes;
        let mem = create(64 << 20, Backing::Anonymous { thp: true });
        assert!(mem.is_ok());
        let mem = mem.unwrap_or_default();
        assert!(mem.write_obj(0xabcdu32, GuestAddress(0x1000)).is_ok());
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).ok(), Some(0xabcd));
    }
}
