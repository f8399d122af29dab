//! The PCI hotplug controller the guest sees: a small register block in I/O space, driven by ACPI
//! (the VMM's DSDT holds the AML: slot objects with `_EJ0`, a Generic Event Device whose `_EVT` reads the
//! registers and sends `Notify` to the slots). Linux's `acpiphp` (built into Debian's kernels) does the
//! rest: on `Notify(Sxx, 1)` (device check) it scans the slot and binds a driver; on `Notify(Sxx, 3)`
//! (eject request) it stops and removes the PCI device, then calls `_EJ0`, which writes the slot's bit
//! to [`REG_EJECT`]. That write is the guest letting go of the device.
//!
//! Registers (32-bit, little-endian; smaller accesses see the matching bytes):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x0 | `PCIU` | read, clears what it returns | slots with a device the guest should scan (inserted) |
//! | 0x4 | `PCID` | read, clears what it returns | slots whose device the VMM asks the guest to eject |
//! | 0x8 | `B0EJ` | write | slots the guest ejected (`_EJ0`): the device leaves the bus at once |
//! | 0xc | `PSTA` | read | slots managed by this controller that hold a device (diagnostics) |
//!
//! What the controller does on an eject write: for each managed slot named, it removes the device from
//! the [`PciBus`] (config space and trapped BARs are gone before the vCPU returns to the guest), queues
//! it as [`Ejected`] and signals [`PciHotplugController::ejected_event`]; the VMM then parks or releases
//! the device outside the vCPU thread. Slots it does not manage are ignored (logged), so a guest cannot
//! eject the host bridge or an emulated device.
//!
//! Nothing here knows KVM or VFIO: the interrupt is an [`EventFd`] the VMM wired to an irqfd.

use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use crate::pci::{PciBus, PciDevice, PciSlot};

/// Size of the register block in I/O space.
pub const REGS_LEN: u16 = 16;
/// `PCIU`: slots to scan (read clears).
pub const REG_UP: u64 = 0x0;
/// `PCID`: slots to eject (read clears).
pub const REG_DOWN: u64 = 0x4;
/// `B0EJ`: slots the guest ejected (write).
pub const REG_EJECT: u64 = 0x8;
/// `PSTA`: managed slots that hold a device (read).
pub const REG_PRESENT: u64 = 0xc;

/// A device the guest ejected, already off the bus.
pub struct Ejected {
    /// The slot it was in.
    pub slot: PciSlot,
    /// The device that was there (`None` if the slot was already empty).
    pub device: Option<Arc<Mutex<dyn PciDevice>>>,
}

/// Errors of hotplug requests.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HotplugError {
    /// Slot 0 (host bridge) or out of range.
    #[error("slot {0} cannot be hotplugged (slots 1..=31 can)")]
    BadSlot(u8),
    /// The slot is not one this controller manages.
    #[error("slot {0} is not a hotplug slot of this VM")]
    NotManaged(PciSlot),
    /// The guest interrupt could not be raised.
    #[error("cannot raise the hotplug interrupt: {0}")]
    Interrupt(String),
}

#[derive(Default)]
struct State {
    up: u32,
    down: u32,
    managed: u32,
    ejected: Vec<Ejected>,
}

/// The controller. Shared by the vCPU threads (register accesses) and the VMM (requests).
pub struct PciHotplugController {
    bus: Arc<PciBus>,
    irq: EventFd,
    ejected_evt: EventFd,
    state: Mutex<State>,
}

fn bit(slot: u8) -> Result<u32, HotplugError> {
    if slot == 0 || slot > 31 {
        return Err(HotplugError::BadSlot(slot));
    }
    Ok(1u32 << slot)
}

impl PciHotplugController {
    /// A controller for `bus` that raises `irq` (the Generic Event Device's interrupt) when it has news
    /// for the guest, and signals `ejected_evt` when the guest ejected a device.
    pub fn new(bus: Arc<PciBus>, irq: EventFd, ejected_evt: EventFd) -> Self {
        Self {
            bus,
            irq,
            ejected_evt,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Readable when the guest ejected something ([`take_ejected`](Self::take_ejected) says what).
    pub fn ejected_event(&self) -> &EventFd {
        &self.ejected_evt
    }

    /// Makes `slot` a hotplug slot: the guest may eject its device, and requests may name it.
    pub fn manage(&self, slot: PciSlot) -> Result<(), HotplugError> {
        let b = bit(slot.0)?;
        self.lock().managed |= b;
        Ok(())
    }

    /// Whether `slot` is managed.
    pub fn is_managed(&self, slot: PciSlot) -> bool {
        bit(slot.0).is_ok_and(|b| self.lock().managed & b != 0)
    }

    fn raise(&self) -> Result<(), HotplugError> {
        self.irq
            .write(1)
            .map_err(|e| HotplugError::Interrupt(e.to_string()))
    }

    /// Tells the guest that `slot` (managed) now holds a device: sets its `PCIU` bit and raises the
    /// interrupt. A pending eject request for the slot is withdrawn.
    pub fn request_insert(&self, slot: PciSlot) -> Result<(), HotplugError> {
        let b = bit(slot.0)?;
        {
            let mut s = self.lock();
            if s.managed & b == 0 {
                return Err(HotplugError::NotManaged(slot));
            }
            s.up |= b;
            s.down &= !b;
        }
        log::info!("hotplug: slot {slot}: insertion signalled to the guest");
        self.raise()
    }

    /// Asks the guest to let go of the device in `slot` (managed): sets its `PCID` bit and raises the
    /// interrupt. The guest answers by ejecting it (or never: the device then stays).
    pub fn request_eject(&self, slot: PciSlot) -> Result<(), HotplugError> {
        let b = bit(slot.0)?;
        {
            let mut s = self.lock();
            if s.managed & b == 0 {
                return Err(HotplugError::NotManaged(slot));
            }
            s.down |= b;
            s.up &= !b;
        }
        log::info!("hotplug: slot {slot}: eject request signalled to the guest");
        self.raise()
    }

    /// The devices the guest ejected since the last call, oldest first.
    pub fn take_ejected(&self) -> Vec<Ejected> {
        let _ = self.ejected_evt.read();
        std::mem::take(&mut self.lock().ejected)
    }

    /// Bitmaps (up, down, managed) for diagnostics and tests.
    pub fn pending(&self) -> (u32, u32, u32) {
        let s = self.lock();
        (s.up, s.down, s.managed)
    }

    fn present(&self, managed: u32) -> u32 {
        (1..32u8)
            .filter(|s| managed & (1 << s) != 0 && self.bus.device(PciSlot(*s)).is_some())
            .fold(0, |a, s| a | (1 << s))
    }

    /// A guest read at `offset` into the register block. Reads of `PCIU`/`PCID` clear the bits they
    /// return; unknown offsets read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let reg = offset & !3;
        let byte = (offset & 3) as usize;
        let mask = byte_mask(byte, data.len());
        let value = {
            let mut s = self.lock();
            match reg {
                REG_UP => {
                    let v = s.up;
                    s.up &= !mask;
                    v
                }
                REG_DOWN => {
                    let v = s.down;
                    s.down &= !mask;
                    v
                }
                REG_PRESENT => {
                    let m = s.managed;
                    drop(s);
                    self.present(m)
                }
                _ => 0,
            }
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(byte + i).copied().unwrap_or(0);
        }
    }

    /// A guest write at `offset`. A write to `B0EJ` ejects the managed slots it names.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset & !3 != REG_EJECT {
            log::debug!("hotplug: write to read-only offset {offset:#x} ignored");
            return;
        }
        let byte = (offset & 3) as usize;
        let mut bytes = [0u8; 4];
        for (i, d) in data.iter().enumerate() {
            if let Some(b) = bytes.get_mut(byte + i) {
                *b = *d;
            }
        }
        let slots = u32::from_le_bytes(bytes);
        let mut any = false;
        for s in 1..32u8 {
            if slots & (1 << s) == 0 {
                continue;
            }
            let slot = PciSlot(s);
            let managed = {
                let mut st = self.lock();
                let m = st.managed & (1 << s) != 0;
                if m {
                    st.up &= !(1 << s);
                    st.down &= !(1 << s);
                    st.managed &= !(1 << s);
                }
                m
            };
            if !managed {
                log::warn!(
                    "hotplug: the guest ejected slot {slot}, which is not a hotplug slot: ignored"
                );
                continue;
            }
            let device = self.bus.remove_device(slot);
            log::info!(
                "hotplug: the guest ejected slot {slot} ({}); it is off the bus",
                device
                    .as_ref()
                    .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).name())
                    .unwrap_or_else(|| "empty".into())
            );
            self.lock().ejected.push(Ejected { slot, device });
            any = true;
        }
        if slots & 1 != 0 {
            log::warn!("hotplug: the guest tried to eject slot 0 (host bridge): ignored");
        }
        if any {
            if let Err(e) = self.ejected_evt.write(1) {
                log::error!("hotplug: cannot signal the eject to the VMM: {e}");
            }
        }
    }
}

/// The bits of a 32-bit register covered by an access of `len` bytes at byte `byte`.
fn byte_mask(byte: usize, len: usize) -> u32 {
    let mut m = 0u32;
    for i in byte..(byte + len).min(4) {
        m |= 0xff << (8 * i);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{BarWindows, HostBridge};

    fn setup() -> (Arc<PciBus>, PciHotplugController, EventFd, EventFd) {
        let bus = Arc::new(PciBus::new(BarWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: (1 << 40, 1 << 30),
            io: (0x1000, 0xf000),
        }));
        bus.add_device(Some(0), Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ej = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let c = PciHotplugController::new(
            bus.clone(),
            irq.try_clone().unwrap(),
            ej.try_clone().unwrap(),
        );
        (bus, c, irq, ej)
    }

    fn read32(c: &PciHotplugController, off: u64) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn insert_sets_up_bit_raises_irq_and_read_clears() {
        let (bus, c, irq, _) = setup();
        let slot = bus
            .add_device(None, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        assert_eq!(slot, PciSlot(1));
        assert_eq!(
            c.request_insert(slot),
            Err(HotplugError::NotManaged(slot)),
            "unmanaged slots are refused"
        );
        c.manage(slot).unwrap();
        c.request_insert(slot).unwrap();
        assert_eq!(irq.read().unwrap(), 1, "the GED interrupt was raised");
        assert_eq!(read32(&c, REG_PRESENT), 1 << 1);
        assert_eq!(read32(&c, REG_UP), 1 << 1);
        assert_eq!(read32(&c, REG_UP), 0, "PCIU clears on read");
        assert_eq!(read32(&c, REG_DOWN), 0);
    }

    #[test]
    fn eject_request_then_guest_eject_removes_the_device_from_the_bus() {
        let (bus, c, irq, ej) = setup();
        let slot = bus
            .add_device(None, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        c.manage(slot).unwrap();
        c.request_eject(slot).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        // A byte read of PCID's low byte sees and clears bit 1.
        let mut b = [0u8; 1];
        c.read(REG_DOWN, &mut b);
        assert_eq!(b[0], 1 << 1);
        assert_eq!(read32(&c, REG_DOWN), 0);
        // _EJ0 writes the slot's bit.
        c.write(REG_EJECT, &(1u32 << 1).to_le_bytes());
        assert_eq!(ej.read().unwrap(), 1, "the VMM was told");
        assert!(bus.device(slot).is_none(), "off the bus at once");
        let e = c.take_ejected();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].slot, slot);
        assert!(e[0].device.is_some());
        assert!(!c.is_managed(slot), "no longer a hotplug slot");
        assert!(c.take_ejected().is_empty());
    }

    #[test]
    fn the_guest_cannot_eject_unmanaged_slots_or_the_host_bridge() {
        let (bus, c, _, ej) = setup();
        let slot = bus
            .add_device(None, Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        c.write(REG_EJECT, &u32::MAX.to_le_bytes());
        assert!(bus.device(PciSlot(0)).is_some());
        assert!(bus.device(slot).is_some());
        assert!(c.take_ejected().is_empty());
        assert!(ej.read().is_err(), "nothing signalled (EAGAIN)");
        // Writes elsewhere and odd reads are harmless.
        c.write(REG_UP, &[0xff; 4]);
        c.write(0x40, &[1]);
        let mut d = [0u8; 2];
        c.read(0x7, &mut d);
        assert_eq!(c.pending(), (0, 0, 0));
    }

    #[test]
    fn bad_slots_are_refused() {
        let (_, c, _, _) = setup();
        assert_eq!(c.manage(PciSlot(0)), Err(HotplugError::BadSlot(0)));
        assert_eq!(c.manage(PciSlot(32)), Err(HotplugError::BadSlot(32)));
        assert_eq!(c.request_eject(PciSlot(40)), Err(HotplugError::BadSlot(40)));
    }

    #[test]
    fn byte_masks() {
        assert_eq!(byte_mask(0, 4), u32::MAX);
        assert_eq!(byte_mask(0, 1), 0xff);
        assert_eq!(byte_mask(2, 2), 0xffff_0000);
        assert_eq!(byte_mask(3, 8), 0xff00_0000);
    }
}
