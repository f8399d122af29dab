//! Errors of the core: each says which rule refused the request and what to do instead.

use super::ops::DriverError;
use super::types::{DeviceId, DomainId, DomainType, GroupId, InstanceId, OwnerId, Pasid};

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why the core refused a request, or which driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The instance id is not registered with this core.
    #[error("{0} is not registered with this IOMMU core; register its driver first")]
    UnknownInstance(InstanceId),
    /// The device was never probed, or was released.
    #[error("{0} is not known to the IOMMU core (never probed, or already released)")]
    UnknownDevice(DeviceId),
    /// The group does not exist (never created, or its last device was released).
    #[error("{0} does not exist (no device was probed into it, or all were released)")]
    UnknownGroup(GroupId),
    /// A domain handle from another core, or of a domain that no longer exists.
    #[error(
        "{0} is not a domain of this IOMMU core; use handles only with the core that made them"
    )]
    ForeignDomain(DomainId),
    /// Domains attach only to devices of the instance that made them.
    #[error("{domain} belongs to {domain_instance} but {dev} is behind {dev_instance}; allocate the domain from the device's instance")]
    WrongInstance {
        /// The domain.
        domain: DomainId,
        /// Its instance.
        domain_instance: InstanceId,
        /// The device.
        dev: DeviceId,
        /// The device's instance.
        dev_instance: InstanceId,
    },
    /// A device that requires direct (1:1) mappings may never be put in a blocked domain (seed 002).
    #[error("{dev} ({name}): firmware requires a 1:1 mapping of this device's reserved (direct) regions, so it cannot be attached to a blocked domain; leave it in its default or identity domain (such a device cannot be given to a guest), or contact the platform vendor")]
    RequireDirect {
        /// The device.
        dev: DeviceId,
        /// Its name.
        name: String,
    },
    /// A device in a blocked or identity domain with no PASID attached must have no I/O page fault
    /// users (seed 002, checked at attach).
    #[error("{dev}: its I/O page fault reference count would be {count}, not zero, after attaching a {dtype} domain with no PASID attached; drop the IOPF users (fault-capable domains, iopf_get callers) first")]
    IopfRefcount {
        /// The device.
        dev: DeviceId,
        /// The count it would have.
        count: u32,
        /// The domain type being attached.
        dtype: DomainType,
    },
    /// `free` of a domain that is still attached (rule: free only what nothing uses).
    #[error("{domain} is still attached (groups: [{}], PASIDs: [{}]); attach those groups to another domain and remove those PASIDs before freeing it", list(groups), list(pasids.iter().map(|(d, p)| format!("{d}/{p}"))))]
    StillAttached {
        /// The domain.
        domain: DomainId,
        /// Groups whose current domain it is.
        groups: Vec<GroupId>,
        /// (device, PASID) pairs it is set on.
        pasids: Vec<(DeviceId, Pasid)>,
    },
    /// Guest domains attach only to groups claimed for DMA by a user.
    #[error(
        "{0} is owned by the host (in its default domain); claim DMA ownership for the guest first"
    )]
    NotOwned(GroupId),
    /// Another owner holds the group.
    #[error("{group} is held by {owner}; that owner must release DMA ownership first")]
    OwnedByOther {
        /// The group.
        group: GroupId,
        /// Its current owner.
        owner: OwnerId,
    },
    /// The group is parked: it can reach no memory until plugged again.
    #[error("{0} is parked (unplugged from its guest, in the blocked release domain); plug it before attaching a domain")]
    Parked(GroupId),
    /// Plug of a group that is not parked.
    #[error("{0} is not parked; only a parked group can be plugged")]
    NotParked(GroupId),
    /// SVA domains are only for PASIDs.
    #[error("{0} is an SVA domain: it attaches to PASIDs only (set_dev_pasid), not to a device's requests without PASID")]
    SvaOnRid(DomainId),
    /// The device cannot use that PASID.
    #[error("{dev} supports {max} PASIDs, so {pasid} is out of range; use a smaller PASID")]
    PasidOutOfRange {
        /// The device.
        dev: DeviceId,
        /// The PASID asked for.
        pasid: Pasid,
        /// Number of PASIDs the device supports.
        max: u32,
    },
    /// No domain is set on that PASID.
    #[error("{dev} has no domain on {pasid}")]
    PasidNotAttached {
        /// The device.
        dev: DeviceId,
        /// The PASID.
        pasid: Pasid,
    },
    /// The instance lacks a domain the operation needs.
    #[error("{instance} provides no {what}; the driver must provide it for this operation")]
    Missing {
        /// The instance.
        instance: InstanceId,
        /// What is missing.
        what: &'static str,
    },
    /// Map/unmap arguments not aligned to the domain's smallest page size.
    #[error(
        "{what} {value:#x} is not aligned to the domain's smallest page size {pgsize:#x}; align it"
    )]
    Unaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The smallest page size.
        pgsize: u64,
    },
    /// Map/unmap range empty, overflowing, or beyond the domain's input address size.
    #[error("range {iova:#x}+{len:#x} is empty or outside the domain's {ias_bits}-bit IOVA space")]
    OutOfRange {
        /// First IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// The domain's input address bits.
        ias_bits: u32,
    },
    /// A driver call failed; the core has undone its side of the operation.
    #[error("{op} failed in the {instance} driver")]
    Driver {
        /// The driver operation.
        op: &'static str,
        /// The instance.
        instance: InstanceId,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// A group attach failed and rolling back failed too: the group's devices may be in different
    /// domains. Release the group's devices.
    #[error("{group}: attach failed and the rollback to {} failed for [{}]; the group's devices may be in different domains: release them", domain.map_or("platform DMA".to_string(), |d| d.to_string()), list(devices))]
    RollbackFailed {
        /// The group.
        group: GroupId,
        /// The domain the rollback tried to restore.
        domain: Option<DomainId>,
        /// Devices the rollback could not restore.
        devices: Vec<DeviceId>,
    },
}

/// A refused [`free`](crate::core::IommuCore::free): the domain handle comes back with the reason,
/// so the caller still owns the domain.
#[derive(Debug, thiserror::Error)]
#[error("free refused: {error}")]
pub struct FreeRefused<D: std::fmt::Debug> {
    /// The domain, still allocated and still owned by the caller.
    pub domain: D,
    /// Why.
    #[source]
    pub error: CoreError,
}

/// Lets `?` turn a refused free into its reason. The handle is dropped, so the domain stays
/// allocated in the core until the core is dropped.
impl<D: std::fmt::Debug> From<FreeRefused<D>> for CoreError {
    fn from(r: FreeRefused<D>) -> Self {
        r.error
    }
}
