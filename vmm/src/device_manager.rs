//! The wiring between vCPU exits and the devices: which port or address belongs to which device. The
//! devices themselves live in the `devices` crate; this module only routes.
//!
//! Port map: COM1 0x3f8..0x3ff, the i8042 0x60/0x64, the CMOS RTC 0x70/0x71, the ACPI power register 0x3c0,
//! the PCI hotplug registers (with `--api-socket`, see `crate::hotplug`), the PCI config ports 0xcf8..0xcff
//! and I/O BARs. MMIO: the ECAM window and trapped BARs. Anything else reads all-ones and ignores writes
//! (logged at trace level for ports, debug for MMIO). Nothing a guest writes here can stop the VMM
//! except the power register and the i8042's reset command, which end the VM on purpose.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use devices::cmos::{Cmos, CMOS_DATA_PORT, CMOS_INDEX_PORT};
use devices::hotplug::{PciHotplugController, REGS_LEN};
use devices::pci::PciBus;
use devices::power::{AcpiPowerControl, PowerEvent, I8042};
use devices::serial::SerialConsole;

use crate::layout::{
    ACPI_POWER_PORT, COM1_PORT, ECAM_SIZE, ECAM_START, I8042_CMD_PORT, I8042_DATA_PORT,
};
use crate::vcpu::{ExitHandler, VmExit};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VM's devices, shared by the vCPU threads and the event loop.
pub struct DeviceManager {
    serial: Option<Mutex<SerialConsole>>,
    power: Mutex<AcpiPowerControl>,
    i8042: Mutex<I8042>,
    cmos: Mutex<Cmos>,
    pci: Arc<PciBus>,
    /// The PCI hotplug registers (first port, controller), when hotplug is on (`crate::hotplug`).
    hotplug: OnceLock<(u16, Arc<PciHotplugController>)>,
}

fn power_exit(e: PowerEvent) -> VmExit {
    match e {
        PowerEvent::PowerOff => VmExit::PowerOff,
        PowerEvent::Reset => VmExit::Reset,
    }
}

impl DeviceManager {
    /// Wires `serial` (when the console is on) and the PCI bus `pci`.
    pub fn new(serial: Option<SerialConsole>, pci: Arc<PciBus>) -> Self {
        Self {
            serial: serial.map(Mutex::new),
            power: Mutex::new(AcpiPowerControl),
            i8042: Mutex::new(I8042),
            cmos: Mutex::new(Cmos::new()),
            pci,
            hotplug: OnceLock::new(),
        }
    }

    /// Puts the PCI hotplug controller's registers at ports `port..port + 16` (once).
    pub fn set_hotplug(&self, port: u16, controller: Arc<PciHotplugController>) {
        if self.hotplug.set((port, controller)).is_err() {
            log::warn!("the PCI hotplug controller is already wired");
        }
    }

    fn hotplug_at(&self, port: u16) -> Option<(u64, &PciHotplugController)> {
        let (base, c) = self.hotplug.get()?;
        (port >= *base && port < base + REGS_LEN).then(|| (u64::from(port - base), &**c))
    }

    /// The PCI bus.
    pub fn pci(&self) -> &Arc<PciBus> {
        &self.pci
    }

    /// Queues console input for the guest; returns how many bytes were taken (0 when the FIFO is full
    /// or the console is off).
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial
            .as_ref()
            .map(|s| lock(s).enqueue_input(bytes))
            .unwrap_or(0)
    }
}

impl ExitHandler for DeviceManager {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> Option<VmExit> {
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p)
                && self.serial.is_some()
                && data.len() == 1 =>
            {
                if let Some(s) = &self.serial {
                    data[0] = lock(s).read((p - COM1_PORT) as u8);
                }
            }
            ACPI_POWER_PORT => data.fill(lock(&self.power).read()),
            CMOS_INDEX_PORT | CMOS_DATA_PORT => data.fill(lock(&self.cmos).read(port)),
            I8042_DATA_PORT | I8042_CMD_PORT => data.fill(lock(&self.i8042).read()),
            p if self.hotplug_at(p).is_some() => {
                if let Some((off, c)) = self.hotplug_at(p) {
                    c.read(off, data);
                }
            }
            _ => {
                if !self.pci.pio_read(port, data) {
                    log::trace!("unhandled port read {port:#x} ({} bytes)", data.len());
                    data.fill(0xff);
                }
            }
        }
        None
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Option<VmExit> {
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) && self.serial.is_some() => {
                if let Some(s) = &self.serial {
                    let mut s = lock(s);
                    for b in data {
                        s.write((p - COM1_PORT) as u8, *b);
                    }
                }
                None
            }
            ACPI_POWER_PORT => {
                log::info!("guest wrote {data:x?} to the ACPI sleep control / reset register");
                data.first()
                    .and_then(|v| lock(&self.power).write(*v))
                    .map(power_exit)
            }
            I8042_CMD_PORT => {
                log::debug!("guest wrote {data:x?} to the i8042 command port");
                data.first()
                    .and_then(|v| lock(&self.i8042).write_command(*v))
                    .map(power_exit)
            }
            I8042_DATA_PORT => None,
            CMOS_INDEX_PORT | CMOS_DATA_PORT => {
                if let Some(v) = data.first() {
                    lock(&self.cmos).write(port, *v);
                }
                None
            }
            p if self.hotplug_at(p).is_some() => {
                if let Some((off, c)) = self.hotplug_at(p) {
                    c.write(off, data);
                }
                None
            }
            _ => {
                match self.pci.pio_write(port, data) {
                    Ok(Some(_)) => {}
                    Ok(None) => log::trace!("unhandled port write {port:#x} = {data:x?}"),
                    Err(e) => log::error!("PCI config write through port {port:#x}: {e}"),
                }
                None
            }
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Option<VmExit> {
        if (ECAM_START..ECAM_START + ECAM_SIZE).contains(&addr) {
            self.pci.ecam_read(addr - ECAM_START, data);
        } else if !self.pci.mmio_read(addr, data) {
            log::debug!("unhandled MMIO read at {addr:#x} ({} bytes)", data.len());
            data.fill(0xff);
        }
        None
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<VmExit> {
        if (ECAM_START..ECAM_START + ECAM_SIZE).contains(&addr) {
            if let Err(e) = self.pci.ecam_write(addr - ECAM_START, data) {
                log::error!("PCI config write through ECAM at {addr:#x}: {e}");
            }
        } else if !self.pci.mmio_write(addr, data) {
            log::debug!("unhandled MMIO write at {addr:#x} = {data:x?}");
        }
        None
    }
}
