//! Plain identifiers and descriptions shared by the core and its drivers.

use std::fmt;

/// A device known to the core, from [`probe_device`](crate::core::IommuCore::probe_device) until
/// [`release_device`](crate::core::IommuCore::release_device).
///
/// Rule carried: every device belongs to exactly one group and one IOMMU instance; the id is the key
/// under which drivers program their "hardware" (the soft driver's device table, a VFIO device fd).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

/// A group of devices that the hardware cannot isolate from each other.
///
/// Rule carried: all devices of a group are always in the same domain, so attach and DMA ownership
/// act on groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u32);

/// A domain known to the core: a static domain of an instance, a group's default or blocking
/// domain, or a domain allocated by a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(pub u32);

/// An IOMMU instance (one registered driver object, see [`IommuOps`](crate::core::IommuOps)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub u32);

/// Who holds a group for DMA when it is not the host: a VM, a user-space driver.
///
/// The core only compares owners: the one who claimed a group is the one who may give it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(pub u64);

/// A process address space identifier on the PCIe side (20 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pasid(pub u32);

impl Pasid {
    /// PCIe PASIDs are 20 bits wide.
    pub const MAX: u32 = (1 << 20) - 1;
}

/// An address space that an SVA domain shares (one process's page tables, an `mm` in Linux).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressSpaceId(pub u64);

macro_rules! display_id {
    ($t:ty, $p:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&format!(concat!($p, "{}"), self.0))
            }
        }
    };
}
display_id!(DeviceId, "dev");
display_id!(GroupId, "group");
display_id!(DomainId, "domain");
display_id!(InstanceId, "iommu");
display_id!(OwnerId, "owner");
display_id!(Pasid, "pasid");
display_id!(AddressSpaceId, "as");

/// The four kinds of domain of the model (seed 003: each type has its own domain ops).
///
/// | type | what a device in it reaches | ops |
/// |---|---|---|
/// | `Blocked` | nothing | attach only |
/// | `Identity` | every address, untranslated (output = input) | attach only |
/// | `Paging` | what was mapped | attach, set_dev_pasid, map/unmap, sync, iova_to_phys |
/// | `Sva` | one process's address space | set_dev_pasid only, no map |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainType {
    /// Blocks all DMA.
    Blocked,
    /// Lets DMA through untranslated.
    Identity,
    /// Translates through I/O page tables that users fill with map/unmap.
    Paging,
    /// Shares a process address space; attached to PASIDs only, never mapped through the IOMMU API.
    Sva,
}

impl fmt::Display for DomainType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            DomainType::Blocked => "blocked",
            DomainType::Identity => "identity",
            DomainType::Paging => "paging",
            DomainType::Sva => "sva",
        })
    }
}

/// Permission of a mapping and direction of a DMA access: the page tables' own types, so one type
/// serves the core, the drivers and the devices.
pub use crate::pt::{Access, Prot};

/// Kinds of reserved region a driver reports for a device (Linux `IOMMU_RESV_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResvType {
    /// Must stay mapped 1:1 at all times (an RMR/RMRR): makes the device `require_direct`.
    Direct,
    /// Mapped 1:1 by default, but may be dropped when the device is assigned (does not make the
    /// device `require_direct`).
    DirectRelaxable,
    /// Must never be mapped.
    Reserved,
    /// Hardware MSI doorbell.
    Msi,
    /// Software-managed MSI window.
    SwMsi,
}

/// One reserved IOVA region of a device.
///
/// Rule carried: a [`ResvType::Direct`] region makes its device `require_direct`: never in a blocked
/// domain, identity instead of blocked at release, and the region is mapped 1:1 in a paging default
/// domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvRegion {
    /// First IOVA of the region.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the region is.
    pub kind: ResvType,
}

/// What the caller of [`probe_device`](crate::core::IommuCore::probe_device) knows about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceDesc {
    /// A name for logs and listings (e.g. a PCI address or "virtio-net0").
    pub name: String,
    /// PCI requester id (bus/device/function) if the device has one.
    pub rid: Option<u16>,
}

impl DeviceDesc {
    /// A device known by name only.
    pub fn new(name: impl Into<String>) -> Self {
        DeviceDesc {
            name: name.into(),
            rid: None,
        }
    }

    /// A device with a PCI requester id.
    pub fn with_rid(name: impl Into<String>, rid: u16) -> Self {
        DeviceDesc {
            name: name.into(),
            rid: Some(rid),
        }
    }
}

/// What a driver learned at probe time.
///
/// Rule carried: `attach_deferred` is how a device says its first attach is deferred; a release
/// before that attach touches no hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProbeInfo {
    /// The device keeps its pre-probe translation until its first real use (Linux
    /// `attach_deferred`, e.g. a kdump kernel inheriting live DMA). While this is set the core does not
    /// attach the default domain, and a release touches no hardware.
    pub attach_deferred: bool,
    /// Number of PASIDs the device supports (0: no PASID capability).
    pub max_pasids: u32,
}

/// A static domain of an instance, named by what it is (the instance owns exactly one of each kind
/// it provides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StaticDomain {
    /// The instance's static blocked domain.
    Blocked,
    /// The instance's static identity domain.
    Identity,
}

impl StaticDomain {
    /// The domain type of this static domain.
    pub fn domain_type(self) -> DomainType {
        match self {
            StaticDomain::Blocked => DomainType::Blocked,
            StaticDomain::Identity => DomainType::Identity,
        }
    }
}
