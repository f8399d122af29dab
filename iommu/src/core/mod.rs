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
