//! KVM's GSI routing table and irqfds. KVM_SET_GSI_ROUTING replaces the whole table, so one owner keeps
//! it: the IOAPIC pins 0..24 and the PIC lines 0..16 (KVM's default routes, which must survive), plus one
//! MSI route per allocated vector. Devices reach it through [`devices::pci::MsiRouting`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::{MsiError, MsiRouting};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::layout::IOAPIC_PINS;

/// Highest GSI handed out (KVM's default KVM_MAX_IRQ_ROUTES is 4096).
pub const MAX_GSI: u32 = 4095;

#[derive(Clone, Copy)]
struct Msi {
    address: u64,
    data: u32,
    masked: bool,
}

struct State {
    msi: BTreeMap<u32, (Option<Msi>, EventFd)>,
}

/// The owner of KVM's GSI routing table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl GsiRouter {
    /// A router for `vm` (which has an in-kernel irqchip). Installs the legacy routes at once.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, MsiError> {
        let r = Self {
            vm,
            state: Mutex::new(State {
                msi: BTreeMap::new(),
            }),
        };
        {
            let s = r.lock();
            r.commit(&s)?;
        }
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, s: &State) -> Result<(), MsiError> {
        let mut entries = Vec::new();
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip_entry(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for irq in 0..16u32 {
            if irq == 2 {
                continue; // the cascade
            }
            let (chip, pin) = if irq < 8 {
                (KVM_IRQCHIP_PIC_MASTER, irq)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
            };
            entries.push(irqchip_entry(irq, chip, pin));
        }
        for (gsi, (msi, _)) in &s.msi {
            let Some(m) = msi.filter(|m| !m.masked) else {
                continue;
            };
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|e| MsiError::Kvm(format!("{e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| MsiError::Kvm(e.to_string()))
    }

    /// Registers `fd` as the irqfd of a legacy IOAPIC pin (e.g. the serial port's IRQ 4).
    pub fn register_legacy_irqfd(&self, fd: &EventFd, pin: u32) -> Result<(), MsiError> {
        self.vm
            .register_irqfd(fd, pin)
            .map_err(|e| MsiError::Kvm(e.to_string()))
    }

    /// Number of MSI vectors allocated.
    pub fn msi_count(&self) -> usize {
        self.lock().msi.len()
    }
}

impl MsiRouting for GsiRouter {
    fn allocate(&self) -> Result<(u32, EventFd), MsiError> {
        let mut s = self.lock();
        let gsi = (IOAPIC_PINS..=MAX_GSI)
            .find(|g| !s.msi.contains_key(g))
            .ok_or(MsiError::Exhausted(MAX_GSI + 1 - IOAPIC_PINS))?;
        let fd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| MsiError::Kvm(format!("eventfd: {e}")))?;
        self.vm
            .register_irqfd(&fd, gsi)
            .map_err(|e| MsiError::Kvm(e.to_string()))?;
        let clone = fd
            .try_clone()
            .map_err(|e| MsiError::Kvm(format!("eventfd: {e}")))?;
        s.msi.insert(gsi, (None, fd));
        Ok((gsi, clone))
    }

    fn set_msi(&self, gsi: u32, address: u64, data: u32, masked: bool) -> Result<(), MsiError> {
        let mut s = self.lock();
        let entry = s.msi.get_mut(&gsi).ok_or(MsiError::UnknownGsi(gsi))?;
        entry.0 = Some(Msi {
            address,
            data,
            masked,
        });
        self.commit(&s)
    }

    fn release(&self, gsi: u32) -> Result<(), MsiError> {
        let mut s = self.lock();
        let (_, fd) = s.msi.remove(&gsi).ok_or(MsiError::UnknownGsi(gsi))?;
        self.vm
            .unregister_irqfd(&fd, gsi)
            .map_err(|e| MsiError::Kvm(e.to_string()))?;
        self.commit(&s)
    }
}
