//! The two kinds of driver ops (seed 003): [`IommuOps`] per IOMMU instance, [`DomainOps`] and
//! [`PagingDomainOps`] per domain type.
//!
//! A driver implements these traits and nothing else. Every rule of the model is checked by the core
//! before it calls a driver, and each method's doc says what the core has already guaranteed; a
//! driver must not re-check policy (that is how rules drift apart between drivers, seed 002).

use std::any::Any;
use std::sync::Arc;

use super::types::{
    AddressSpaceId, DeviceDesc, DeviceId, DomainType, Pasid, ProbeInfo, Prot, ResvRegion,
    StaticDomain,
};

/// What a driver reports when it cannot do what the core asked.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The driver does not implement this optional operation.
    #[error("the IOMMU driver does not support {op}; use an instance that provides it")]
    NotSupported {
        /// Name of the operation.
        op: &'static str,
    },
    /// The driver refused the arguments.
    #[error("the IOMMU driver refused the request: {0}")]
    Invalid(String),
    /// The hardware (or the host kernel) failed.
    #[error("the IOMMU driver failed: {0}")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl DriverError {
    /// Wraps any error as a [`DriverError::Failed`].
    pub fn failed(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        DriverError::Failed(Box::new(e))
    }
}

/// Invalidations gathered over one map or unmap call, flushed once at its end (Linux
/// `iommu_iotlb_gather`).
///
/// The core creates one per [`map`](crate::core::IommuCore::map) /
/// [`unmap`](crate::core::IommuCore::unmap) call, passes it to every `map_pages`/`unmap_pages`
/// call of that call, and hands it to [`PagingDomainOps::iotlb_sync`] (or
/// [`PagingDomainOps::iotlb_sync_map`]) exactly once. A driver may keep its own gather state in it
/// ([`driver_data`](Self::driver_data)), e.g. the soft driver keeps its page table's gather there.
#[derive(Default)]
pub struct IotlbGather {
    start: u64,
    end: u64,
    driver: Option<Box<dyn Any + Send>>,
}

impl std::fmt::Debug for IotlbGather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotlbGather")
            .field("range", &self.range())
            .field("driver_data", &self.driver.is_some())
            .finish()
    }
}

impl IotlbGather {
    /// An empty gather.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `[iova, iova + len)` needs invalidation.
    pub fn add_range(&mut self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = iova.saturating_add(len);
        if self.end == 0 {
            self.start = iova;
            self.end = end;
        } else {
            self.start = self.start.min(iova);
            self.end = self.end.max(end);
        }
    }

    /// The gathered range, if any.
    pub fn range(&self) -> Option<std::ops::Range<u64>> {
        (self.end != 0).then_some(self.start..self.end)
    }

    /// The driver's own gather state of type `T`, created with `T::default()` on first use.
    ///
    /// If state of another type was stored before, it is replaced.
    pub fn driver_data<T: Default + Send + 'static>(&mut self) -> &mut T {
        if !self.driver.as_ref().is_some_and(|d| d.is::<T>()) {
            self.driver = Some(Box::new(T::default()));
        }
        match self.driver.as_mut().and_then(|d| d.downcast_mut::<T>()) {
            Some(t) => t,
            None => unreachable!("driver data was just set to type T"),
        }
    }

    /// Takes the driver's gather state out, if it is of type `T`.
    pub fn take_driver_data<T: Send + 'static>(&mut self) -> Option<T> {
        match self.driver.take()?.downcast::<T>() {
            Ok(t) => Some(*t),
            Err(other) => {
                self.driver = Some(other);
                None
            }
        }
    }
}

/// Per-IOMMU-instance operations: what a driver does for devices, and which domains it can make.
///
/// Rule carried (seed 003): instance ops are separate from domain ops; one instance may make domains
/// of several types, each with its own [`DomainOps`].
///
/// Rule carried (seed 001): there is no `detach_dev`. Devices leave a domain only by being attached
/// to another. An instance without default domains offers [`set_platform_dma`](Self::set_platform_dma)
/// instead, and that is the only special case.
///
/// Rule carried (seed 000): [`release_device`](Self::release_device) only undoes
/// [`probe_device`](Self::probe_device); the core attaches the [`release_domain`](Self::release_domain)
/// before calling it.
pub trait IommuOps: Send + Sync {
    /// A short name for logs and listings ("soft", "vfio-type1").
    fn name(&self) -> &str;

    /// Takes `dev` under this instance: allocate per-device state, read its capabilities.
    ///
    /// The core guarantees `dev` is fresh (never probed, or released since). Must not touch the
    /// device's translation: the core attaches the group's domain afterwards (unless the returned
    /// [`ProbeInfo::attach_deferred`] says the first attach is deferred).
    fn probe_device(&self, dev: DeviceId, desc: &DeviceDesc) -> Result<ProbeInfo, DriverError>;

    /// Undoes exactly what [`probe_device`](Self::probe_device) did.
    ///
    /// The core guarantees: every PASID of the device has been removed; the release domain has been
    /// attached (unless the device's deferred attach never happened, in which case no hardware was
    /// touched); the device is no longer in any group. Must not attach or detach anything.
    fn release_device(&self, dev: DeviceId);

    /// Which group `dev` belongs to: devices of this instance that return the same key share a group.
    ///
    /// Called once, right after a successful probe.
    fn device_group(&self, dev: DeviceId, desc: &DeviceDesc) -> u64;

    /// The device's reserved regions. A region of type [`Direct`](super::ResvType::Direct) makes the
    /// device `require_direct`: the core then refuses to put it in a blocked domain.
    fn get_resv_regions(&self, _dev: DeviceId) -> Vec<ResvRegion> {
        Vec::new()
    }

    /// The default domain type this device needs (`Identity` or `Paging`), or `None` for no
    /// preference (the core then uses `Paging`, falling back to `Identity` if the instance cannot
    /// allocate paging domains). Consulted when a group is created, unless the instance has a static
    /// [`default_domain`](Self::default_domain) or [`uses_platform_dma`](Self::uses_platform_dma).
    fn def_domain_type(&self, _dev: DeviceId) -> Option<DomainType> {
        None
    }

    /// Allocates an empty paging domain. `Ok` means the domain is ready to map and attach.
    fn domain_alloc_paging(&self) -> Result<Arc<dyn PagingDomainOps>, DriverError> {
        Err(DriverError::NotSupported {
            op: "domain_alloc_paging",
        })
    }

    /// Allocates an SVA domain sharing the address space `space` for use by `dev` on a PASID.
    ///
    /// The core guarantees `dev` was probed by this instance and supports PASIDs.
    fn domain_alloc_sva(
        &self,
        _dev: DeviceId,
        _space: AddressSpaceId,
    ) -> Result<Arc<dyn DomainOps>, DriverError> {
        Err(DriverError::NotSupported {
            op: "domain_alloc_sva",
        })
    }

    /// The instance's static identity domain, if it has one. Asked once, at registration.
    fn identity_domain(&self) -> Option<Arc<dyn DomainOps>> {
        None
    }

    /// The instance's static blocked domain, if it has one. Asked once, at registration.
    ///
    /// Its [`set_dev_pasid`](DomainOps::set_dev_pasid) is how the core removes a PASID's domain (no
    /// detach, for PASIDs too); without a blocked domain the core uses an empty paging domain.
    fn blocked_domain(&self) -> Option<Arc<dyn DomainOps>> {
        None
    }

    /// Which static domain the core attaches before [`release_device`](Self::release_device) and
    /// when a group is parked. Usually [`StaticDomain::Blocked`]. Asked once, at registration.
    fn release_domain(&self) -> Option<StaticDomain> {
        None
    }

    /// A static default domain for every group of this instance. Asked once, at registration.
    fn default_domain(&self) -> Option<StaticDomain> {
        None
    }

    /// `true` when this instance has no default domains: groups start in the platform's own DMA
    /// setup, and giving a group back to the host calls [`set_platform_dma`](Self::set_platform_dma)
    /// on each of its devices. Asked once, at registration.
    fn uses_platform_dma(&self) -> bool {
        false
    }

    /// Returns `dev` to the platform's DMA setup (for instances without default domains only).
    ///
    /// The core guarantees `dev`'s group is being given back to the host and has no default domain.
    fn set_platform_dma(&self, _dev: DeviceId) -> Result<(), DriverError> {
        Err(DriverError::NotSupported {
            op: "set_platform_dma",
        })
    }
}

/// Operations every domain type has (blocked, identity, SVA, and paging through
/// [`PagingDomainOps`]).
///
/// Rule carried (seed 003): domain ops are per domain *type*; a domain that cannot map has no map
/// operation at all. Rule carried: the function that ends a domain is [`free`](Self::free), which
/// pairs with allocation; the core calls it only when nothing is attached.
pub trait DomainOps: Send + Sync {
    /// Makes `dev`'s requests without PASID translate through this domain, replacing whatever domain
    /// it was in (there is no detach in between).
    ///
    /// The core guarantees: `dev` belongs to this domain's instance; a blocked domain is never
    /// attached to a device that requires direct mappings; for blocked and identity attaches with no
    /// PASID attached, the device's I/O page fault reference count is zero; the domain is not SVA.
    fn attach_dev(&self, dev: DeviceId) -> Result<(), DriverError>;

    /// Makes `dev`'s requests with `pasid` translate through this domain, replacing the PASID's
    /// previous domain. The blocked domain's `set_dev_pasid` removes the PASID's domain.
    ///
    /// The core guarantees `pasid` is below the device's `max_pasids`, and, when this removes a
    /// domain, that the device's exit handler has already been told the PASID is going away.
    fn set_dev_pasid(&self, _dev: DeviceId, _pasid: Pasid) -> Result<(), DriverError> {
        Err(DriverError::NotSupported {
            op: "set_dev_pasid",
        })
    }

    /// Frees the domain. The core guarantees no device or PASID is attached to it, and calls this once.
    fn free(&self) {}
}

/// The extra operations of a paging domain: the only domain type that can map.
///
/// Rule carried: map/unmap exist only here, so asking a blocked, identity or SVA domain to map cannot
/// be written (see [`PagingDomain`](crate::core::PagingDomain)).
pub trait PagingDomainOps: DomainOps {
    /// Page sizes this domain can map, as a bitmap (bit n set: pages of 2^n bytes).
    fn pgsize_bitmap(&self) -> u64;

    /// Number of IOVA bits the domain translates (e.g. 48); IOVAs at or above `1 << ias_bits` are
    /// refused by the core.
    fn ias_bits(&self) -> u32;

    /// Maps `pgcount` pages of `pgsize` bytes from `iova` to `paddr` and returns the bytes mapped
    /// (on error, what was mapped before the error stays mapped and the core unmaps it).
    ///
    /// The core guarantees `pgsize` is in [`pgsize_bitmap`](Self::pgsize_bitmap), `iova` and `paddr`
    /// are aligned to it, and the range fits in [`ias_bits`](Self::ias_bits). Overlapping an
    /// existing mapping must be refused.
    fn map_pages(
        &self,
        iova: u64,
        paddr: u64,
        pgsize: u64,
        pgcount: u64,
        prot: Prot,
        gather: &mut IotlbGather,
    ) -> Result<u64, DriverError>;

    /// Unmaps `pgcount * pgsize` bytes at `iova` and returns the bytes unmapped; invalidations go into
    /// `gather` and are flushed by [`iotlb_sync`](Self::iotlb_sync). Unmapping part of a larger leaf
    /// must be refused, never silently split.
    ///
    /// The core guarantees the same alignment as for [`map_pages`](Self::map_pages).
    fn unmap_pages(
        &self,
        iova: u64,
        pgsize: u64,
        pgcount: u64,
        gather: &mut IotlbGather,
    ) -> Result<u64, DriverError>;

    /// Makes mappings made by the `map_pages` calls of one map call visible to the hardware. Called
    /// once per map call.
    fn iotlb_sync_map(
        &self,
        _iova: u64,
        _size: u64,
        _gather: &mut IotlbGather,
    ) -> Result<(), DriverError> {
        Ok(())
    }

    /// Flushes what `gather` collected. Called once per unmap call.
    fn iotlb_sync(&self, gather: &mut IotlbGather);

    /// Flushes every cached translation of this domain.
    fn flush_iotlb_all(&self);

    /// The output address `iova` translates to, if mapped.
    fn iova_to_phys(&self, iova: u64) -> Option<u64>;
}
