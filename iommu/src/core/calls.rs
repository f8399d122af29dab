//! The record of every driver call the core makes: what "hardware" was touched, in which order.
//!
//! Owns: a bounded ring of [`DriverCall`]s and a counter per operation. Must not: influence policy;
//! it only observes (tests and the VMM's diagnostics read it).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::types::{DeviceId, DomainId, DomainType, InstanceId, Pasid};

/// One driver operation the core called (the names are the model's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverOp {
    /// `IommuOps::probe_device`.
    ProbeDevice {
        /// The device.
        dev: DeviceId,
    },
    /// `IommuOps::release_device`.
    ReleaseDevice {
        /// The device.
        dev: DeviceId,
    },
    /// `IommuOps::set_platform_dma`.
    SetPlatformDma {
        /// The device.
        dev: DeviceId,
    },
    /// A domain allocation (`domain_alloc_paging` / `domain_alloc_sva`).
    DomainAlloc {
        /// The id the core gave the new domain (or would have).
        domain: DomainId,
        /// Its type.
        dtype: DomainType,
    },
    /// `DomainOps::free`.
    DomainFree {
        /// The domain.
        domain: DomainId,
    },
    /// `DomainOps::attach_dev`.
    AttachDev {
        /// The device.
        dev: DeviceId,
        /// The domain attached.
        domain: DomainId,
        /// Its type.
        dtype: DomainType,
    },
    /// `DomainOps::set_dev_pasid` (with the blocked domain: removal of the PASID's domain).
    SetDevPasid {
        /// The device.
        dev: DeviceId,
        /// The PASID.
        pasid: Pasid,
        /// The domain set.
        domain: DomainId,
        /// Its type.
        dtype: DomainType,
    },
    /// `PagingDomainOps::map_pages`.
    MapPages {
        /// The domain.
        domain: DomainId,
        /// First IOVA.
        iova: u64,
        /// Page size.
        pgsize: u64,
        /// Number of pages.
        pgcount: u64,
    },
    /// `PagingDomainOps::unmap_pages`.
    UnmapPages {
        /// The domain.
        domain: DomainId,
        /// First IOVA.
        iova: u64,
        /// Page size.
        pgsize: u64,
        /// Number of pages.
        pgcount: u64,
    },
    /// `PagingDomainOps::iotlb_sync_map`.
    IotlbSyncMap {
        /// The domain.
        domain: DomainId,
    },
    /// `PagingDomainOps::iotlb_sync`.
    IotlbSync {
        /// The domain.
        domain: DomainId,
    },
    /// `PagingDomainOps::flush_iotlb_all`.
    FlushIotlbAll {
        /// The domain.
        domain: DomainId,
    },
}

impl DriverOp {
    /// The operation's name as in the model (`attach_dev`, `map_pages`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            DriverOp::ProbeDevice { .. } => "probe_device",
            DriverOp::ReleaseDevice { .. } => "release_device",
            DriverOp::SetPlatformDma { .. } => "set_platform_dma",
            DriverOp::DomainAlloc { .. } => "domain_alloc",
            DriverOp::DomainFree { .. } => "free",
            DriverOp::AttachDev { .. } => "attach_dev",
            DriverOp::SetDevPasid { .. } => "set_dev_pasid",
            DriverOp::MapPages { .. } => "map_pages",
            DriverOp::UnmapPages { .. } => "unmap_pages",
            DriverOp::IotlbSyncMap { .. } => "iotlb_sync_map",
            DriverOp::IotlbSync { .. } => "iotlb_sync",
            DriverOp::FlushIotlbAll { .. } => "flush_iotlb_all",
        }
    }

    /// The device the operation touched, if it is a per-device operation.
    pub fn device(&self) -> Option<DeviceId> {
        match self {
            DriverOp::ProbeDevice { dev }
            | DriverOp::ReleaseDevice { dev }
            | DriverOp::SetPlatformDma { dev }
            | DriverOp::AttachDev { dev, .. }
            | DriverOp::SetDevPasid { dev, .. } => Some(*dev),
            _ => None,
        }
    }

    /// Whether the operation programs a device's translation (the "hardware touches" of the release
    /// rule): attach_dev, set_dev_pasid, set_platform_dma.
    pub fn touches_device_translation(&self) -> bool {
        matches!(
            self,
            DriverOp::AttachDev { .. }
                | DriverOp::SetDevPasid { .. }
                | DriverOp::SetPlatformDma { .. }
        )
    }
}

/// One recorded call: sequence number, instance, operation, and whether the driver succeeded.
///
/// Rule carried: drivers are trait impls and nothing else, and the core calls them; so the core's
/// record is the complete list of hardware touches (read it with
/// [`IommuCore::driver_calls`](crate::core::IommuCore::driver_calls)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverCall {
    /// Increases by one per call, over the core's life.
    pub seq: u64,
    /// The instance whose driver was called.
    pub instance: InstanceId,
    /// The operation.
    pub op: DriverOp,
    /// `false` when the driver returned an error.
    pub ok: bool,
}

const OPS: [&str; 12] = [
    "probe_device",
    "release_device",
    "set_platform_dma",
    "domain_alloc",
    "free",
    "attach_dev",
    "set_dev_pasid",
    "map_pages",
    "unmap_pages",
    "iotlb_sync_map",
    "iotlb_sync",
    "flush_iotlb_all",
];

struct Inner {
    ring: VecDeque<DriverCall>,
    next_seq: u64,
    counts: [u64; OPS.len()],
}

/// Bounded log of driver calls plus per-operation counters.
pub(crate) struct CallLog {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl CallLog {
    pub(crate) fn new(capacity: usize) -> Self {
        CallLog {
            capacity,
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(capacity.min(1024)),
                next_seq: 0,
                counts: [0; OPS.len()],
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn record(&self, instance: InstanceId, op: DriverOp, ok: bool) {
        let mut inner = self.lock();
        let name = op.name();
        if let Some(i) = OPS.iter().position(|n| *n == name) {
            inner.counts[i] += 1;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if self.capacity == 0 {
            return;
        }
        if inner.ring.len() == self.capacity {
            inner.ring.pop_front();
        }
        inner.ring.push_back(DriverCall {
            seq,
            instance,
            op,
            ok,
        });
    }

    pub(crate) fn snapshot(&self) -> Vec<DriverCall> {
        self.lock().ring.iter().cloned().collect()
    }

    pub(crate) fn take(&self) -> Vec<DriverCall> {
        self.lock().ring.drain(..).collect()
    }

    pub(crate) fn counts(&self) -> Vec<(&'static str, u64)> {
        let inner = self.lock();
        OPS.iter()
            .copied()
            .zip(inner.counts.iter().copied())
            .collect()
    }
}
