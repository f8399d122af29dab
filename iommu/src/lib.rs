//! iovmm's IOMMU component: a domain manager with the Linux IOMMU core's semantics, over stage-2 I/O
//! page tables with huge pages.
//!
//! It is usable and testable on its own: no KVM, no VFIO, no VMM types.
//!
//! # Map of the crate
//! | module | owns | must not |
//! |---|---|---|
//! | [`core`] | the rules: devices, groups, domains, DMA ownership, release, PASIDs; the driver traits | touch hardware or page tables itself |
//! | [`soft`] | the `soft` instance: a device table and the DMA translate call of emulated devices, with a fault log | decide policy |
//! | [`pt`] | stage-2 I/O page tables: map/unmap with 4K/2M/1G leaves, gather and sync, translation with a small IOTLB | know about devices or domains |
//!
//! # Where the rules come from
//! The model is Linux drivers/iommu/iommu.c as the review threads in `shared/seeds/` leave it:
//! release domains attached by the core (seed 000), no detach op (seed 001), require_direct and the
//! I/O page fault check in the core (seed 002), per-type domain ops and `free` (seed 003), per-device
//! PASID exit handlers (seed 004). [`core::IommuCore`]'s doc lists where each rule is enforced.
pub mod core;
pub mod pt;
pub mod soft;
#[cfg(feature = "vfio")]
pub mod vfio;
