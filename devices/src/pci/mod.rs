//! The PCI seam: what every PCI device implements ([`PciDevice`]), a type-0 configuration space helper
//! ([`PciConfig`]), the bus that routes the legacy 0xCF8/0xCFC ports, ECAM and BAR accesses to devices
//! ([`PciBus`]), and the host bridge at 00:00.0 ([`HostBridge`]).
//!
//! How BARs move: the bus never guesses. A config-space write goes to the device; the device answers with the
//! list of BARs whose guest address changed ([`BarRelocation`]). The bus then updates its own table of trapped
//! ranges, calls [`PciDevice::move_bar`] so the device can move what it owns (for VFIO: the KVM memory slots
//! that map its BARs), and hands the list back to its caller (the VMM) for anything else to rewire.
//! Initial placement uses the same path: the bus writes the BAR registers as firmware would
//! ([`PciBus::add_device`]).
//!
//! This module must not know KVM: MSI delivery goes through the [`MsiRouting`] trait, which the VMM implements.

mod bus;
mod config;

pub use bus::{BarWindows, PciBus, PciBusError, PciSlot};
pub use config::{BarKind, PciBarDef, PciConfig};

/// Size of one function's configuration space under ECAM (PCIe extended config space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Number of 32-bit registers in [`CONFIG_SPACE_SIZE`].
pub const CONFIG_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
/// Config register index of BAR0 (offset 0x10).
pub const BAR0_REG: usize = 4;
/// Config register index of the command/status register (offset 0x04).
pub const COMMAND_REG: usize = 1;
/// Command register: I/O space decode enable.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decode enable.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// One BAR as currently programmed by the guest (or by the bus at placement time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR index, 0..=5 (for a 64-bit BAR, the index of its low half).
    pub index: u8,
    /// Guest physical address (memory BARs) or port (I/O BARs); 0 while unplaced.
    pub base: u64,
    /// Size in bytes, a power of two.
    pub size: u64,
    /// Address space and width.
    pub kind: BarKind,
}

/// A BAR whose guest address changed after a config-space write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRelocation {
    /// BAR index, 0..=5.
    pub index: u8,
    /// Previous base (0 when the BAR was unplaced).
    pub old_base: u64,
    /// New base.
    pub new_base: u64,
    /// Size in bytes.
    pub size: u64,
    /// Address space and width.
    pub kind: BarKind,
}

/// Errors a device reports when it cannot follow a BAR move.
#[derive(Debug, thiserror::Error)]
pub enum PciDeviceError {
    /// The device could not move what backs one of its BARs (e.g. a KVM memory slot).
    #[error("device {device}: could not move BAR{bar} to {new_base:#x}: {reason}")]
    MoveBar {
        /// Device name.
        device: String,
        /// BAR index.
        bar: u8,
        /// Requested base.
        new_base: u64,
        /// What failed.
        reason: String,
    },
}

/// A PCI function on the bus. Implemented by the host bridge, emulated devices and the VFIO passthrough device.
///
/// The bus serialises calls to one device (it holds the device behind a mutex). All accesses are
/// little-endian; `data.len()` is 1, 2, 4 or 8 and never crosses a 4-byte register for config accesses.
pub trait PciDevice: Send {
    /// Short name for logs ("host-bridge", "vfio 0000:00:02.0").
    fn name(&self) -> String;

    /// Reads the 32-bit config register `reg` (byte offset `reg * 4`, `reg < CONFIG_REGS`).
    /// Registers the device does not implement read as 0.
    fn read_config_register(&mut self, reg: usize) -> u32;

    /// Writes `data` at byte `offset` (0..=3) within the 32-bit config register `reg`.
    /// Returns the BARs whose guest address changed because of this write (sizing writes of all-ones
    /// and the transient states of a 64-bit BAR being sized are not reported).
    fn write_config_register(&mut self, reg: usize, offset: u8, data: &[u8]) -> Vec<BarRelocation>;

    /// The BARs as currently programmed.
    fn bars(&self) -> Vec<BarRegion>;

    /// Called by the bus after a BAR moved, before the guest can touch the new range. A device that maps
    /// BAR memory directly into the guest (VFIO) moves its mapping here. The default does nothing: a fully
    /// trapped BAR needs nothing beyond the bus's own table.
    fn move_bar(&mut self, _relocation: &BarRelocation) -> Result<(), PciDeviceError> {
        Ok(())
    }

    /// A trapped read at `offset` into BAR `bar` (the guest touched a part of the BAR that is not mapped
    /// directly). Unimplemented registers read as all-ones, like an absent device.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff);
    }

    /// A trapped write at `offset` into BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
}

/// Routes MSI / MSI-X messages to the guest's interrupt controller. The VMM implements it over KVM
/// (GSI routing entries of type MSI, signalled through irqfds); devices use it without knowing KVM.
pub trait MsiRouting: Send + Sync {
    /// Allocates a GSI for one vector and returns it with the eventfd that, when written, injects it.
    fn allocate(&self) -> Result<(u32, vmm_sys_util::eventfd::EventFd), MsiError>;
    /// Points `gsi` at the MSI message (`address`, `data`); `masked` routes nothing while true.
    fn set_msi(&self, gsi: u32, address: u64, data: u32, masked: bool) -> Result<(), MsiError>;
    /// Removes the route and the irqfd of `gsi` and returns it to the pool.
    fn release(&self, gsi: u32) -> Result<(), MsiError>;
}

/// Errors of [`MsiRouting`].
#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    /// No GSI left.
    #[error("no free GSI for an MSI vector (all {0} in use): release vectors or use fewer")]
    Exhausted(u32),
    /// The GSI is not one this router handed out.
    #[error("GSI {0} was not allocated by this router")]
    UnknownGsi(u32),
    /// KVM refused a routing or irqfd change.
    #[error("KVM refused an MSI route or irqfd change: {0}")]
    Kvm(String),
}

/// Reads `data.len()` bytes at byte offset `offset` of a little-endian 32-bit register value.
pub fn read_from_register(value: u32, offset: u8, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let off = usize::from(offset);
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(off + i).copied().unwrap_or(0xff);
    }
}

/// Merges `data` written at byte `offset` into the 32-bit register value `old`.
pub fn merge_into_register(old: u32, offset: u8, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    let off = usize::from(offset);
    for (i, d) in data.iter().enumerate() {
        if let Some(b) = bytes.get_mut(off + i) {
            *b = *d;
        }
    }
    u32::from_le_bytes(bytes)
}

/// The host bridge at 00:00.0 (Intel 8086:0d57-style vendor id, class 06/00): no BARs.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// A host bridge with vendor 0x8086, device 0x0d57 (as cloud-hypervisor and QEMU's microvm use an
    /// arbitrary Intel id: Linux needs no driver for it).
    pub fn new() -> Self {
        let mut config = PciConfig::new(0x8086, 0x0d57, 0x06, 0x00, 0x00);
        config.set_subsystem(0x1af4, 0x1100);
        Self { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> String {
        "host-bridge".into()
    }
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_register(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u8, data: &[u8]) -> Vec<BarRelocation> {
        self.config.write_register(reg, offset, data)
    }
    fn bars(&self) -> Vec<BarRegion> {
        self.config.bars()
    }
}
