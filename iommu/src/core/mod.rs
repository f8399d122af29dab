//! The domain manager: the rules of the Linux IOMMU core, in one place.
//!
//! # What this module owns
//! Devices, groups, domains, DMA ownership and PASIDs of every registered IOMMU instance, and the
//! rules that govern them ([`IommuCore`]). It defines the two kinds of driver ops ([`IommuOps`] per
//! instance, [`DomainOps`]/[`PagingDomainOps`] per domain type) and records every call it makes to a
//! driver ([`DriverCall`]).
//!
//! # What it must not do
//! Touch hardware or page tables itself (drivers do, when the core calls them); know about KVM, VFIO
//! or guest memory; leave a rule to a driver.
//!
//! # The model in one page
//! - A device is probed into an instance and lands in exactly one **group**; a group is in one domain
//!   at a time, so attach acts on groups.
//! - **Domain types**: blocked, identity, paging, SVA. Only a [`PagingDomain`] can map; an
//!   [`SvaDomain`] goes on PASIDs only; blocked and identity are static domains of the instance.
//! - **No detach**: a group leaves a domain by attaching another. The host owns groups in their
//!   default domain; [`IommuCore::claim_dma_owner`] moves a group to the blocked domain for a guest;
//!   [`IommuCore::release_dma_owner`] restores the default domain (or calls `set_platform_dma`).
//! - **Parked** ([`DmaOwner::Parked`]): unplugged by its guest, in the blocked domain, still held.
//! - **Release** ([`IommuCore::release_device`]): PASIDs go, then the release domain (identity instead
//!   of blocked for a device that requires direct mappings), then the driver's release_device; a
//!   device whose deferred attach never happened is not touched.
//! - **PASIDs**: SVA and paging domains on PASIDs; a per-device exit handler runs before the core
//!   removes a PASID's domain.
//! - **free** ends a domain, and is refused while it is attached.
//!
//! [`rules`] lists every rule, the function that enforces it, and the tests that check it.
//!
//! # Where this differs from Linux, and why
//! - **Attach needs DMA ownership.** Linux lets a kernel driver attach a domain to a group still in
//!   its default domain; here only the owner of a claimed group attaches ([`CoreError::NotOwned`]),
//!   because the VMM has no host-kernel drivers: every non-default domain belongs to a guest.
//! - **Parking always uses the blocking domain**, even for an instance whose release domain is
//!   identity: a parked device must reach nothing. (Devices that require direct mappings can never be
//!   claimed, so they are never parked.)
//! - **Unmap is one `unmap_pages` call** covering the range, as generic_pt's unmap does, so a range
//!   that cuts a huge page is refused whole. Map still goes in runs of one page size per call, as
//!   `iommu_map` does, so a driver sees (pgsize, pgcount).
//! - **`iotlb_sync_map` receives the call's gather**, so a driver whose page tables gather on map
//!   too (the soft driver) syncs once per call.
//! - **PASID domains are set per device**, not on every device of the group; the group rule is about
//!   requests without PASID.
//! - **The I/O page fault reference count is kept by the core**: one reference per fault-capable
//!   domain (SVA, [`IommuCore::alloc_paging_iopf`]) the device or one of its PASIDs is in, plus one
//!   per [`IommuCore::iopf_get`].
//! - **PASID exit handlers run under the core's lock** (they must not call the core), which makes
//!   "handler, then removal" atomic with respect to other requests.

mod calls;
mod domain;
mod error;
mod manager;
mod ops;
pub mod rules;
mod types;

pub use calls::{DriverCall, DriverOp};
pub use domain::{DomainInfo, OwnedDomain, PagingDomain, PasidTarget, SvaDomain, Target};
pub use error::{CoreError, FreeRefused};
pub use manager::{DeviceStatus, DmaOwner, IommuCore, PasidExit, PasidExitHandler};
pub use ops::{DomainOps, DriverError, IommuOps, IotlbGather, PagingDomainOps};
pub use types::{
    Access, AddressSpaceId, DeviceDesc, DeviceId, DomainId, DomainType, GroupId, InstanceId,
    OwnerId, Pasid, ProbeInfo, Prot, ResvRegion, ResvType, StaticDomain,
};
