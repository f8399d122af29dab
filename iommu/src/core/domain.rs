//! Handles to the domains users own, and the targets of attach.

use super::types::{DomainId, DomainType};

/// A paging domain owned by its user (a guest's address space, a virtio-iommu domain): the only
/// handle that can map.
///
/// Rule carried: map/unmap exist only for paging domains. [`IommuCore::map`](super::IommuCore::map)
/// takes a `&PagingDomain`, so asking a blocked, identity or SVA domain to map does not compile:
///
/// ```compile_fail,E0308
/// # use iommu::core::{IommuCore, SvaDomain, Prot};
/// fn map_an_sva_domain(core: &IommuCore, sva: &SvaDomain) {
///     core.map(sva, 0, 0, 4096, Prot::RW); // error: expected `&PagingDomain`
/// }
/// ```
///
/// ```compile_fail,E0308
/// # use iommu::core::{IommuCore, Target, Prot};
/// fn map_the_blocked_domain(core: &IommuCore) {
///     core.map(Target::Blocked, 0, 0, 4096, Prot::RW); // error: blocked has no map
/// }
/// ```
///
/// Rule carried: a domain ends with [`IommuCore::free`](super::IommuCore::free), which consumes the
/// handle and refuses (handing it back) while the domain is attached. The handle is neither `Clone`
/// nor `Copy`, so a freed domain cannot be named again:
///
/// ```compile_fail,E0382
/// # use iommu::core::{IommuCore, PagingDomain, Prot};
/// fn use_after_free(core: &IommuCore, d: PagingDomain) {
///     let _ = core.free(d);
///     let _ = core.map(&d, 0, 0, 4096, Prot::RW); // error: use of moved value `d`
/// }
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct PagingDomain {
    pub(crate) id: DomainId,
    pub(crate) core: u64,
}

/// An SVA domain owned by its user: one process address space, set on PASIDs only, never mapped.
///
/// Rule carried: an SVA domain has no map (there is no way to pass it to
/// [`IommuCore::map`](super::IommuCore::map)) and cannot be attached to a device's requests without
/// PASID ([`Target`] has no SVA variant).
#[derive(Debug, PartialEq, Eq)]
pub struct SvaDomain {
    pub(crate) id: DomainId,
    pub(crate) core: u64,
}

impl PagingDomain {
    /// The domain's id (for listings and the driver call log).
    pub fn id(&self) -> DomainId {
        self.id
    }
}

impl SvaDomain {
    /// The domain's id (for listings and the driver call log).
    pub fn id(&self) -> DomainId {
        self.id
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::PagingDomain {}
    impl Sealed for super::SvaDomain {}
}

/// A domain handle that its user owns and ends with [`IommuCore::free`](super::IommuCore::free).
/// Static domains (blocked, identity) and group default domains are owned by the core and have no
/// such handle.
pub trait OwnedDomain: sealed::Sealed + std::fmt::Debug {
    /// The domain's id.
    fn domain_id(&self) -> DomainId;
    /// Which core made the handle.
    #[doc(hidden)]
    fn core_tag(&self) -> u64;
}

impl OwnedDomain for PagingDomain {
    fn domain_id(&self) -> DomainId {
        self.id
    }
    fn core_tag(&self) -> u64 {
        self.core
    }
}

impl OwnedDomain for SvaDomain {
    fn domain_id(&self) -> DomainId {
        self.id
    }
    fn core_tag(&self) -> u64 {
        self.core
    }
}

/// What a group's devices (requests without PASID) can be attached to.
///
/// Rule carried: SVA domains are not a target (PASIDs only), and there is no "detach" target:
/// leaving a domain means attaching another one.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A paging domain the caller owns.
    Paging(&'a PagingDomain),
    /// The group's blocking domain (the instance's static blocked domain, or an empty paging
    /// domain if it has none).
    Blocked,
    /// The instance's static identity domain.
    Identity,
}

/// What a PASID of a device can be set to.
#[derive(Debug, Clone, Copy)]
pub enum PasidTarget<'a> {
    /// A process address space.
    Sva(&'a SvaDomain),
    /// A paging domain the caller owns.
    Paging(&'a PagingDomain),
}

/// A domain as seen in listings: its id and type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    /// The domain's id.
    pub id: DomainId,
    /// Its type.
    pub dtype: DomainType,
}
