//! `--edu`: emulated DMA test devices ([`devices::edu`], QEMU's `edu` register layout) whose DMA goes
//! through the IOMMU component's `soft` instance.
//!
//! Lifecycle, through the VM's one IOMMU component (the same core as the passthrough devices'): the `soft`
//! instance is registered; a paging domain maps all guest RAM with IOVA = GPA (bus addresses are guest
//! physical addresses, as for the passthrough devices); each device is probed, its group claimed for the
//! guest and attached to that domain, and the device is put on the PCI bus. At the end (after the vCPUs
//! stopped) each device is taken off the bus and parked on the blocked domain, so it can reach no memory,
//! then released; the domain is freed last.

use std::sync::{Arc, Mutex};

use devices::edu::{EduDevice, EduStats};
use devices::pci::{PciBus, PciSlot};
use iommu::core::{
    CoreError, DeviceDesc, DeviceId, GroupId, InstanceId, IommuCore, PagingDomain, Prot, Target,
};
use iommu::soft::{FaultCounts, SoftIommu};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::dma::{error_chain, VMM_OWNER};
use crate::vm::Vm;

/// Why the edu devices could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EduError {
    /// The IOMMU component refused a step.
    #[error("edu: {what}: {}", error_chain(.source))]
    Iommu {
        /// The step.
        what: &'static str,
        /// The component's error.
        #[source]
        source: CoreError,
    },
    /// The PCI bus has no room.
    #[error("edu: putting the device on the PCI bus: {0}")]
    Bus(String),
    /// There is no edu device with this index.
    #[error("edu: there is no edu device {0}")]
    NoSuchDevice(usize),
    /// The guest-RAM domain was freed: the devices are being torn down.
    #[error("edu: the guest-RAM domain is gone (the VM is ending)")]
    NoDomain,
}

fn iommu_err(what: &'static str) -> impl FnOnce(CoreError) -> EduError {
    move |source| EduError::Iommu { what, source }
}

struct Edu {
    name: String,
    dev: DeviceId,
    group: GroupId,
    slot: Option<PciSlot>,
    pci: Arc<Mutex<EduDevice>>,
}

/// The `--edu` devices of a VM and their `soft` IOMMU instance. Drop it after the vCPUs stopped.
pub struct EduDevices {
    core: Arc<IommuCore>,
    soft: Arc<SoftIommu>,
    inst: InstanceId,
    domain: Option<PagingDomain>,
    bus: Arc<PciBus>,
    devices: Vec<Edu>,
}

impl EduDevices {
    /// Registers the `soft` instance, maps guest RAM (IOVA = GPA) into a new paging domain and plugs
    /// `count` edu devices into it. Nothing is left behind on error.
    pub fn attach(vm: &Vm, count: usize) -> Result<Self, EduError> {
        let core = vm.iommu().clone();
        let soft = SoftIommu::new();
        let inst = core
            .register(soft.clone())
            .map_err(iommu_err("registering the soft IOMMU"))?;
        let domain = core
            .alloc_paging(inst)
            .map_err(iommu_err("allocating the guest-RAM domain"))?;
        let mut this = EduDevices {
            core,
            soft,
            inst,
            domain: Some(domain),
            bus: vm.devices().pci().clone(),
            devices: Vec::new(),
        };
        // (On error, dropping `this` frees the domain.)
        if let Some(d) = &this.domain {
            for r in vm.memory().iter() {
                let (gpa, len) = (r.start_addr().0, r.len());
                this.core
                    .map(d, gpa, gpa, len, Prot::RW)
                    .map_err(iommu_err("mapping guest RAM into the domain"))?;
            }
        }
        for i in 0..count {
            let name = format!("edu{i}");
            this.plug(name, vm)?;
        }
        Ok(this)
    }

    fn plug(&mut self, name: String, vm: &Vm) -> Result<(), EduError> {
        let dev = self
            .core
            .probe_device(self.inst, DeviceDesc::new(name.clone()))
            .map_err(iommu_err("probing the device"))?;
        let group = match self.core.group_of(dev) {
            Ok(g) => g,
            Err(e) => {
                self.release(dev, &name);
                return Err(iommu_err("its group")(e));
            }
        };
        let Some(domain) = self.domain.as_ref() else {
            self.release(dev, &name);
            return Err(EduError::NoDomain);
        };
        let claimed = self
            .core
            .claim_dma_owner(group, VMM_OWNER)
            .and_then(|()| self.core.attach(group, VMM_OWNER, Target::Paging(domain)));
        if let Err(e) = claimed {
            self.release(dev, &name);
            return Err(iommu_err(
                "claiming it for the guest and attaching guest RAM",
            )(e));
        }
        let pci = Arc::new(Mutex::new(EduDevice::new(
            name.clone(),
            self.soft.port(dev, None),
            vm.memory().clone(),
        )));
        let mut edu = Edu {
            name,
            dev,
            group,
            slot: None,
            pci: pci.clone(),
        };
        match self.bus.add_device(None, pci) {
            Ok(slot) => {
                log::info!(
                    "edu: {} plugged as guest PCI {slot}, DMA through the soft IOMMU (guest RAM mapped IOVA=GPA)",
                    edu.name
                );
                edu.slot = Some(slot);
                self.devices.push(edu);
                Ok(())
            }
            Err(e) => {
                self.park_and_release(&edu);
                Err(EduError::Bus(e.to_string()))
            }
        }
    }

    /// The PCI slots of the devices, in order.
    pub fn slots(&self) -> Vec<PciSlot> {
        self.devices.iter().filter_map(|d| d.slot).collect()
    }

    /// What each device's DMA engine did.
    pub fn stats(&self) -> Vec<EduStats> {
        self.devices
            .iter()
            .map(|d| d.pci.lock().map(|p| p.stats()).unwrap_or_default())
            .collect()
    }

    /// The soft IOMMU's fault counts (every refused translation of every device).
    pub fn faults(&self) -> FaultCounts {
        self.soft.faults().counts()
    }

    /// Parks device `i` on the blocked domain (as an unplug does): its DMA reaches nothing from now on.
    pub fn park(&self, i: usize) -> Result<(), EduError> {
        let d = self.devices.get(i).ok_or(EduError::NoSuchDevice(i))?;
        self.core
            .park(d.group, VMM_OWNER)
            .map_err(iommu_err("parking the device"))
    }

    /// Releases `dev` from the component; whether it went.
    fn release(&self, dev: DeviceId, name: &str) -> bool {
        match self.core.release_device(dev) {
            Ok(()) => true,
            Err(e) => {
                log::error!("edu: {name}: releasing: {}", error_chain(&e));
                false
            }
        }
    }

    /// Takes `d` off the bus, parks it on the blocked domain and releases it; whether both went.
    fn park_and_release(&self, d: &Edu) -> bool {
        if let Some(slot) = d.slot {
            self.bus.remove_device(slot);
        }
        let parked = match self.core.park(d.group, VMM_OWNER) {
            Ok(()) => true,
            Err(e) => {
                log::error!("edu: {}: parking: {}", d.name, error_chain(&e));
                false
            }
        };
        self.release(d.dev, &d.name) && parked
    }
}

impl Drop for EduDevices {
    fn drop(&mut self) {
        for d in std::mem::take(&mut self.devices).into_iter().rev() {
            let stats = d.pci.lock().map(|p| p.stats()).unwrap_or_default();
            let done = self.park_and_release(&d);
            log::info!(
                "edu: {}: {} transfer(s), {} bytes, {} refused ({} IOMMU faults); {}",
                d.name,
                stats.transfers,
                stats.bytes,
                stats.refused,
                stats.faults,
                if done {
                    "parked and released"
                } else {
                    "NOT cleanly parked and released (see the errors above)"
                }
            );
        }
        if let Some(d) = self.domain.take() {
            if let Err(e) = self.core.free(d) {
                log::error!(
                    "edu: freeing the guest-RAM domain: {}",
                    error_chain(&e.error)
                );
            }
        }
    }
}
