//! A DMA test device with the register layout of QEMU's `edu` device (QEMU docs/specs/edu.rst), so that
//! one guest program can drive DMA through the IOMMU on this VMM and on QEMU alike.
//!
//! Its DMA goes through the component's `soft` IOMMU (an [`iommu::soft::DmaPort`]: the device's own
//! IOTLB in front of its domain's page tables) and then to guest memory, so everything the core decides
//! about the device shows here: a paging domain reaches what it maps, a parked (blocked) device reaches
//! nothing, and every refused translation lands in the soft IOMMU's fault log.
//!
//! What the guest sees, as in QEMU: PCI 1234:11e8 revision 0x10, BAR 0 = 1 MiB of registers; 4-byte
//! accesses below 0x80, 4- or 8-byte ones from 0x80; 0x00 identification (0x010000ed), 0x04 liveness
//! (reads the inverse of what was written), 0x08 factorial, 0x20 status (0x80: interrupt after a
//! factorial), 0x24 interrupt status, 0x60 interrupt raise, 0x64 interrupt acknowledge, 0x80 DMA source,
//! 0x88 DMA destination, 0x90 DMA count, 0x98 DMA command (0x1 start, 0x2 direction: 0 RAM to device, 1
//! device to RAM, 0x4 interrupt 0x100 when done; a write without 0x1 is ignored). The 64-bit DMA
//! registers are accessed at their own offsets only: a 4-byte write sets the whole register (upper half
//! 0), a 4-byte read returns its low half, and offsets 0x84, 0x8c, ... read all-ones and ignore writes.
//! The device's 4 KiB DMA buffer is at 0x40000 in DMA addresses (not readable through the BAR).
//!
//! Differences, each logged when it matters:
//! - The factorial and the DMA run at once, inside the guest's register write: status bit 0x01 and
//!   command bit 0x1 read back clear, so a guest polling them (as QEMU's spec example does) is done at once.
//! - No interrupt is delivered (this VMM has no INTx, and the device has no MSI capability): the interrupt
//!   status register works, so a guest can poll it.
//! - A transfer is refused as a whole, and nothing is copied, when bus mastering is off, when the device
//!   side does not lie within the buffer, when the bus address is outside the DMA mask (28 bits, as
//!   QEMU's default; QEMU clamps it instead) or when any page of it does not translate (an IOMMU fault) or
//!   is not guest RAM. [`EduDevice::stats`] counts both. As in QEMU, the interrupt a transfer asked for
//!   is raised even when it was refused. The first [`LOGGED_REFUSALS`] refusals are logged as warnings,
//!   later ones at debug level (the stats and the IOMMU's fault log count every one).

use iommu::core::Access;
use iommu::soft::{DmaPort, Fault};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::pci::{BarKind, PciBarDef, PciConfig};
use crate::pci::{BarRegion, BarRelocation, PciDevice};

/// PCI vendor id (QEMU).
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device id of `edu`.
pub const DEVICE_ID: u16 = 0x11e8;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 1 << 20;
/// The identification register's value: version 1.0.
pub const ID: u32 = 0x0100_00ed;
/// Where the device's DMA buffer is, in the device-side DMA addresses.
pub const BUFFER_ADDR: u64 = 0x40000;
/// Size of the DMA buffer.
pub const BUFFER_SIZE: usize = 4096;
/// Bus addresses the device can reach (28 bits, QEMU's default `dma_mask`).
pub const DMA_MASK: u64 = (1 << 28) - 1;
/// PCI revision id (as QEMU's edu).
pub const REVISION: u8 = 0x10;
/// How many refused transfers a device logs as warnings before it logs them at debug level only (a
/// guest looping on bad transfers must not flood the VMM's log).
pub const LOGGED_REFUSALS: u64 = 8;
/// In 32 bits, n! is 0 from n = 34 on (34! holds 2^32): the factorial register never needs more steps.
const FACTORIAL_ZERO_FROM: u32 = 34;

/// Register offsets in BAR 0.
pub mod reg {
    /// Identification (RO).
    pub const ID: u64 = 0x00;
    /// Liveness check: reads the inverse of the last value written.
    pub const LIVENESS: u64 = 0x04;
    /// Factorial: write n, read n!.
    pub const FACTORIAL: u64 = 0x08;
    /// Status: 0x01 computing (RO), 0x80 interrupt after a factorial.
    pub const STATUS: u64 = 0x20;
    /// Interrupt status (RO).
    pub const IRQ_STATUS: u64 = 0x24;
    /// Interrupt raise (WO): ORed into the interrupt status.
    pub const IRQ_RAISE: u64 = 0x60;
    /// Interrupt acknowledge (WO): cleared from the interrupt status.
    pub const IRQ_ACK: u64 = 0x64;
    /// DMA source address.
    pub const DMA_SRC: u64 = 0x80;
    /// DMA destination address.
    pub const DMA_DST: u64 = 0x88;
    /// DMA transfer count.
    pub const DMA_COUNT: u64 = 0x90;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x98;
}

/// DMA command bits.
pub mod cmd {
    /// Start the transfer.
    pub const START: u64 = 0x1;
    /// Direction: set for device to RAM, clear for RAM to device.
    pub const TO_RAM: u64 = 0x2;
    /// Raise interrupt 0x100 when the transfer is done.
    pub const IRQ: u64 = 0x4;
}

const STATUS_COMPUTING: u32 = 0x01;
const STATUS_IRQ_FACTORIAL: u32 = 0x80;
const IRQ_FACTORIAL: u32 = 0x1;
const IRQ_DMA: u32 = 0x100;
const COMMAND_BUS_MASTER: u32 = 1 << 2;

/// What the device's DMA engine did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EduStats {
    /// Transfers done.
    pub transfers: u64,
    /// Bytes they moved.
    pub bytes: u64,
    /// Transfers refused (nothing copied): see the module docs for why a transfer is refused.
    pub refused: u64,
    /// Of those, the ones refused because a page did not translate (an IOMMU fault).
    pub faults: u64,
}

/// Why a transfer was refused.
#[derive(Debug, thiserror::Error)]
enum DmaError {
    #[error("bus mastering is off (PCI command bit 2): a device may not DMA")]
    NoBusMaster,
    #[error("the device side {addr:#x}+{count:#x} is not within the buffer {BUFFER_ADDR:#x}+{BUFFER_SIZE:#x}")]
    OutsideBuffer { addr: u64, count: u64 },
    #[error("bus address {addr:#x}+{count:#x} is outside the DMA mask {DMA_MASK:#x}")]
    OutsideMask { addr: u64, count: u64 },
    #[error("IOMMU fault at bus address {iova:#x}: {fault}")]
    Fault { iova: u64, fault: Fault },
    #[error("bus address {iova:#x} translates to {gpa:#x}, which is not guest RAM")]
    NotRam { iova: u64, gpa: u64 },
}

/// The device. See the module documentation.
pub struct EduDevice {
    name: String,
    config: PciConfig,
    port: DmaPort,
    memory: GuestMemoryMmap<()>,
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    buffer: Box<[u8; BUFFER_SIZE]>,
    stats: EduStats,
    warned_irq: bool,
}

impl EduDevice {
    /// A device named `name` (for logs) whose DMA goes through `port` to `memory`.
    pub fn new(name: String, port: DmaPort, memory: GuestMemoryMmap<()>) -> Self {
        // Class 0x00ff ("unclassified, other"), as QEMU's edu.
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID, 0x00, 0xff, 0x00);
        let bar = PciBarDef {
            size: BAR_SIZE,
            kind: BarKind::Mem32 {
                prefetchable: false,
            },
        };
        let added = config.add_bar(0, bar);
        debug_assert!(added, "BAR 0 of a fresh config space");
        config.set_revision(REVISION);
        EduDevice {
            name,
            config,
            port,
            memory,
            liveness: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            buffer: Box::new([0; BUFFER_SIZE]),
            stats: EduStats::default(),
            warned_irq: false,
        }
    }

    /// What the DMA engine did so far.
    pub fn stats(&self) -> EduStats {
        self.stats
    }

    fn raise(&mut self, bits: u32) {
        self.irq_status |= bits;
        if !self.warned_irq {
            self.warned_irq = true;
            log::warn!(
                "{}: interrupt {bits:#x} raised, but this edu delivers no interrupts (poll the interrupt status register)",
                self.name
            );
        }
    }

    fn read_reg(&self, off: u64) -> Option<u64> {
        let r = match off {
            reg::ID => u64::from(ID),
            reg::LIVENESS => u64::from(!self.liveness),
            reg::FACTORIAL => u64::from(self.factorial),
            reg::STATUS => u64::from(self.status),
            reg::IRQ_STATUS => u64::from(self.irq_status),
            reg::DMA_SRC => self.dma_src,
            reg::DMA_DST => self.dma_dst,
            reg::DMA_COUNT => self.dma_count,
            reg::DMA_CMD => self.dma_cmd,
            _ => return None,
        };
        Some(r)
    }

    fn write_reg32(&mut self, off: u64, v: u32) {
        match off {
            reg::LIVENESS => self.liveness = v,
            reg::FACTORIAL => {
                // Computed at once: status bit 0x01 is never seen set.
                self.factorial = factorial32(v);
                if self.status & STATUS_IRQ_FACTORIAL != 0 {
                    self.raise(IRQ_FACTORIAL);
                }
            }
            reg::STATUS => self.status = v & STATUS_IRQ_FACTORIAL & !STATUS_COMPUTING,
            reg::IRQ_RAISE => self.raise(v),
            reg::IRQ_ACK => self.irq_status &= !v,
            _ => log::debug!(
                "{}: write of {v:#x} to read-only or unknown register {off:#x} ignored",
                self.name
            ),
        }
    }

    fn write_dma_reg(&mut self, off: u64, v: u64) {
        match off {
            reg::DMA_SRC => self.dma_src = v,
            reg::DMA_DST => self.dma_dst = v,
            reg::DMA_COUNT => self.dma_count = v,
            // As QEMU: a command without START is ignored.
            reg::DMA_CMD if v & cmd::START != 0 => {
                self.dma_cmd = v;
                self.run_dma();
                self.dma_cmd &= !cmd::START;
                if v & cmd::IRQ != 0 {
                    self.raise(IRQ_DMA);
                }
            }
            _ => {}
        }
    }

    /// One transfer, as programmed; all or nothing.
    fn run_dma(&mut self) {
        let to_ram = self.dma_cmd & cmd::TO_RAM != 0;
        let count = self.dma_count;
        let (bus, dev) = if to_ram {
            (self.dma_dst, self.dma_src)
        } else {
            (self.dma_src, self.dma_dst)
        };
        match self.transfer(bus, dev, count, to_ram) {
            Ok(()) => {
                self.stats.transfers += 1;
                self.stats.bytes += count;
                log::debug!(
                    "{}: DMA of {count:#x} bytes {} bus address {bus:#x}",
                    self.name,
                    if to_ram { "to" } else { "from" }
                );
            }
            Err(e) => {
                self.stats.refused += 1;
                if matches!(e, DmaError::Fault { .. }) {
                    self.stats.faults += 1;
                }
                let level = if self.stats.refused <= LOGGED_REFUSALS {
                    log::Level::Warn
                } else {
                    log::Level::Debug
                };
                log::log!(
                    level,
                    "{}: DMA of {count:#x} bytes {} bus address {bus:#x} refused, nothing copied: {e}",
                    self.name,
                    if to_ram { "to" } else { "from" }
                );
                if self.stats.refused == LOGGED_REFUSALS {
                    log::warn!(
                        "{}: {LOGGED_REFUSALS} transfers refused; further refusals are logged at debug level only",
                        self.name
                    );
                }
            }
        }
    }

    fn transfer(&mut self, bus: u64, dev: u64, count: u64, to_ram: bool) -> Result<(), DmaError> {
        if self.config.command() as u32 & COMMAND_BUS_MASTER == 0 {
            return Err(DmaError::NoBusMaster);
        }
        let in_buffer = dev.checked_sub(BUFFER_ADDR).filter(|o| {
            o.checked_add(count)
                .is_some_and(|e| e <= BUFFER_SIZE as u64)
        });
        let Some(start) = in_buffer else {
            return Err(DmaError::OutsideBuffer { addr: dev, count });
        };
        if bus.checked_add(count).is_none_or(|end| end > DMA_MASK + 1) {
            return Err(DmaError::OutsideMask { addr: bus, count });
        }
        // Translate every page first (all or nothing), then copy.
        let access = if to_ram { Access::Write } else { Access::Read };
        let mut pieces = Vec::new();
        let mut iova = bus;
        let end = bus + count;
        while iova < end {
            let piece = ((iova | 0xfff) + 1).min(end) - iova;
            let gpa = self
                .port
                .translate(iova, access)
                .map_err(|fault| DmaError::Fault { iova, fault })?;
            if !GuestMemoryBackend::check_range(&self.memory, GuestAddress(gpa), piece as usize) {
                return Err(DmaError::NotRam { iova, gpa });
            }
            pieces.push((gpa, piece as usize));
            iova += piece;
        }
        let mut at = start as usize;
        for (gpa, len) in pieces {
            let buf = &mut self.buffer[at..at + len];
            let r = if to_ram {
                self.memory.write_slice(buf, GuestAddress(gpa))
            } else {
                self.memory.read_slice(buf, GuestAddress(gpa))
            };
            // Checked above; guest memory does not shrink while the VM runs.
            if r.is_err() {
                return Err(DmaError::NotRam { iova: bus, gpa });
            }
            at += len;
        }
        Ok(())
    }
}

impl PciDevice for EduDevice {
    fn name(&self) -> String {
        self.name.clone()
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

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let len = data.len();
        if bar != 0 || !access_ok(offset, len) {
            log::debug!(
                "{}: {len}-byte read at BAR {bar} offset {offset:#x} not allowed: all-ones",
                self.name
            );
            return;
        }
        // A 4-byte read of a 64-bit DMA register returns its low half (offsets + 4 are not registers).
        if let Some(v) = self.read_reg(offset) {
            data.copy_from_slice(&v.to_le_bytes()[..len]);
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let len = data.len();
        if bar != 0 || !access_ok(offset, len) {
            log::debug!(
                "{}: {len}-byte write at BAR {bar} offset {offset:#x} not allowed: ignored",
                self.name
            );
            return;
        }
        let mut b = [0u8; 8];
        b[..len].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        if offset < reg::DMA_SRC {
            self.write_reg32(offset, v as u32);
            return;
        }
        // 64-bit DMA registers, at their own offsets: a 4-byte write sets the whole register (as QEMU).
        match offset {
            reg::DMA_SRC | reg::DMA_DST | reg::DMA_COUNT | reg::DMA_CMD => {
                self.write_dma_reg(offset, v)
            }
            _ => log::debug!(
                "{}: write of {v:#x} to unknown register {offset:#x} ignored",
                self.name
            ),
        }
    }
}

/// n! in 32-bit arithmetic (wrapping, as QEMU's edu), in at most [`FACTORIAL_ZERO_FROM`] steps.
fn factorial32(n: u32) -> u32 {
    (1..=n.min(FACTORIAL_ZERO_FROM)).fold(1u32, |f, k| f.wrapping_mul(k))
}

/// QEMU's rule: 4-byte accesses below 0x80, 4 or 8 bytes from 0x80, naturally aligned.
fn access_ok(offset: u64, len: usize) -> bool {
    let ok_len = if offset < reg::DMA_SRC {
        len == 4
    } else {
        len == 4 || len == 8
    };
    ok_len && offset.is_multiple_of(len as u64) && offset < BAR_SIZE
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use iommu::core::{DeviceDesc, IommuCore, OwnerId, Prot, Target};
    use iommu::soft::SoftIommu;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::pci::PciDevice;

    const VM: OwnerId = OwnerId(1);
    const MIB: u64 = 1 << 20;

    /// A claimed edu in a paging domain that maps `[0, 1 MiB)` of bus addresses to guest RAM at 1 MiB:
    /// the real core, soft IOMMU and page tables, and 4 MiB of real guest memory.
    struct Rig {
        core: IommuCore,
        soft: Arc<SoftIommu>,
        domain: iommu::core::PagingDomain,
        group: iommu::core::GroupId,
        mem: GuestMemoryMmap<()>,
        edu: EduDevice,
    }

    fn rig() -> Rig {
        let core = IommuCore::new();
        let soft = SoftIommu::new();
        let inst = core.register(soft.clone()).expect("register");
        let dev = core
            .probe_device(inst, DeviceDesc::with_rid("edu", 0x20))
            .expect("probe");
        let group = core.group_of(dev).expect("group");
        core.claim_dma_owner(group, VM).expect("claim");
        let dom = core.alloc_paging(inst).expect("domain");
        core.map(&dom, 0, MIB, MIB, Prot::RW).expect("map");
        core.attach(group, VM, Target::Paging(&dom))
            .expect("attach");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * MIB as usize)])
            .expect("guest memory");
        let mut edu = EduDevice::new("edu".into(), soft.port(dev, None), mem.clone());
        edu.write_config_register(1, 0, &[0x06, 0]); // memory space + bus master
        Rig {
            core,
            soft,
            domain: dom,
            group,
            mem,
            edu,
        }
    }

    fn w32(e: &mut EduDevice, off: u64, v: u32) {
        e.write_bar(0, off, &v.to_le_bytes());
    }
    fn w64(e: &mut EduDevice, off: u64, v: u64) {
        e.write_bar(0, off, &v.to_le_bytes());
    }
    fn r32(e: &mut EduDevice, off: u64) -> u32 {
        let mut b = [0; 4];
        e.read_bar(0, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r64(e: &mut EduDevice, off: u64) -> u64 {
        let mut b = [0; 8];
        e.read_bar(0, off, &mut b);
        u64::from_le_bytes(b)
    }
    fn dma(e: &mut EduDevice, src: u64, dst: u64, count: u64, command: u64) {
        w64(e, reg::DMA_SRC, src);
        w64(e, reg::DMA_DST, dst);
        w64(e, reg::DMA_COUNT, count);
        w64(e, reg::DMA_CMD, command);
    }

    #[test]
    fn identity_liveness_factorial_and_interrupt_status_as_qemus_edu() {
        let mut r = rig();
        let e = &mut r.edu;
        assert_eq!(e.read_config_register(0), 0x11e8_1234);
        assert_eq!(
            e.read_config_register(2),
            0x00ff_0010,
            "class 00ff, revision 0x10"
        );
        assert_eq!(r32(e, reg::ID), 0x0100_00ed);
        w32(e, reg::LIVENESS, 0x1234_5678);
        assert_eq!(r32(e, reg::LIVENESS), !0x1234_5678);
        w32(e, reg::FACTORIAL, 5);
        assert_eq!(r32(e, reg::STATUS) & 1, 0, "computed at once");
        assert_eq!(r32(e, reg::FACTORIAL), 120);
        w32(e, reg::FACTORIAL, 13); // 13! wraps in 32 bits, as in QEMU
        assert_eq!(r32(e, reg::FACTORIAL), 6_227_020_800u64 as u32);
        // The register takes at most FACTORIAL_ZERO_FROM steps (a loop to the guest's value held the vCPU
        // for seconds at 0xffffffff): the same results as the full product, for every n that the full
        // product can be run for here, because it stays 0 from FACTORIAL_ZERO_FROM on.
        let full = |n: u32| (1..=n).fold(1u32, |f, k| f.wrapping_mul(k));
        assert_ne!(full(FACTORIAL_ZERO_FROM - 1), 0);
        assert_eq!(full(FACTORIAL_ZERO_FROM), 0);
        for n in (0..200).chain([1000, 65_537]) {
            w32(e, reg::FACTORIAL, n);
            assert_eq!(r32(e, reg::FACTORIAL), full(n), "{n}!");
        }
        w32(e, reg::FACTORIAL, u32::MAX);
        assert_eq!(r32(e, reg::FACTORIAL), 0);
        assert_eq!(r32(e, reg::IRQ_STATUS), 0);
        w32(e, reg::STATUS, 0x81);
        assert_eq!(r32(e, reg::STATUS), 0x80, "bit 0 is read-only");
        w32(e, reg::FACTORIAL, 3);
        assert_eq!(r32(e, reg::IRQ_STATUS), 0x1);
        w32(e, reg::IRQ_RAISE, 0x30);
        assert_eq!(r32(e, reg::IRQ_STATUS), 0x31);
        w32(e, reg::IRQ_ACK, 0x11);
        assert_eq!(r32(e, reg::IRQ_STATUS), 0x20);
        // Wrong sizes and unknown offsets read all-ones and change nothing.
        let mut b = [0u8; 2];
        e.read_bar(0, reg::ID, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        e.write_bar(0, reg::LIVENESS, &[1, 2]);
        assert_eq!(r32(e, reg::LIVENESS), !0x1234_5678);
        assert_eq!(r32(e, 0x10), u32::MAX);
        assert_eq!(
            r64(e, 0x40000),
            u64::MAX,
            "the buffer is not readable through the BAR"
        );
    }

    #[test]
    fn dma_round_trip_through_the_paging_domain() {
        let mut r = rig();
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        // Bus address 0x0f80 is guest RAM 1 MiB + 0x0f80: the transfer crosses a page.
        r.mem.write_slice(&data, GuestAddress(MIB + 0xf80)).unwrap();
        dma(&mut r.edu, 0xf80, BUFFER_ADDR + 16, 300, cmd::START);
        assert_eq!(
            r64(&mut r.edu, reg::DMA_CMD) & cmd::START,
            0,
            "done at once"
        );
        dma(
            &mut r.edu,
            BUFFER_ADDR + 16,
            0x8000,
            300,
            cmd::START | cmd::TO_RAM | cmd::IRQ,
        );
        let mut back = vec![0u8; 300];
        r.mem
            .read_slice(&mut back, GuestAddress(MIB + 0x8000))
            .unwrap();
        assert_eq!(back, data);
        assert_eq!(r32(&mut r.edu, reg::IRQ_STATUS), 0x100);
        assert_eq!(
            r.edu.stats(),
            EduStats {
                transfers: 2,
                bytes: 600,
                refused: 0,
                faults: 0
            }
        );
        assert!(r.soft.faults().recent().is_empty());
    }

    #[test]
    fn unmapped_bus_addresses_fault_and_nothing_is_copied() {
        let mut r = rig();
        // The domain maps bus addresses [0, 1 MiB): 0xfff00 + 0x200 crosses its end.
        dma(&mut r.edu, 0xfff00, BUFFER_ADDR, 0x200, cmd::START);
        assert_eq!(r.edu.stats().faults, 1);
        assert_eq!(r.soft.faults().recent().len(), 1);
        assert_eq!(r.soft.faults().recent()[0].fault, Fault::NotMapped);
        assert_eq!(r.soft.faults().recent()[0].iova, 0x100000);
        // Device to RAM over the same range writes nothing, not even the mapped first page.
        r.mem
            .write_slice(&[0x55; 256], GuestAddress(MIB + 0xfff00))
            .unwrap();
        dma(
            &mut r.edu,
            BUFFER_ADDR,
            0xfff00,
            0x200,
            cmd::START | cmd::TO_RAM,
        );
        let mut b = [0u8; 256];
        r.mem
            .read_slice(&mut b, GuestAddress(MIB + 0xfff00))
            .unwrap();
        assert_eq!(b, [0x55; 256]);
        assert_eq!(r.edu.stats().refused, 2);
        assert_eq!(r.edu.stats().transfers, 0);
    }

    #[test]
    fn a_parked_edu_reaches_no_memory() {
        let mut r = rig();
        r.mem.write_slice(&[0x11; 16], GuestAddress(MIB)).unwrap();
        dma(&mut r.edu, 0, BUFFER_ADDR, 16, cmd::START);
        assert_eq!(r.edu.stats().transfers, 1);
        r.core.park(r.group, VM).expect("park");
        dma(&mut r.edu, BUFFER_ADDR, 0x100, 16, cmd::START | cmd::TO_RAM);
        let mut b = [0u8; 16];
        r.mem.read_slice(&mut b, GuestAddress(MIB + 0x100)).unwrap();
        assert_eq!(b, [0; 16], "nothing written while parked");
        assert_eq!(r.soft.faults().recent()[0].fault, Fault::Blocked);
        assert_eq!(r.edu.stats().faults, 1);
    }

    #[test]
    fn transfers_outside_the_buffer_the_mask_or_without_bus_mastering_are_refused() {
        let mut r = rig();
        let e = &mut r.edu;
        dma(e, 0, BUFFER_ADDR + 4000, 200, cmd::START); // past the buffer's end
        dma(e, 0, BUFFER_ADDR - 8, 16, cmd::START); // before it
        dma(e, 0, BUFFER_ADDR, u64::MAX, cmd::START); // a count that overflows
        dma(e, 1 << 28, BUFFER_ADDR, 16, cmd::START); // beyond 28 bits
        dma(e, BUFFER_ADDR, u64::MAX - 4, 16, cmd::START | cmd::TO_RAM); // wraps
        e.write_config_register(1, 0, &[0x02, 0]); // bus master off
        dma(e, 0, BUFFER_ADDR, 16, cmd::START);
        assert_eq!(
            e.stats(),
            EduStats {
                transfers: 0,
                bytes: 0,
                refused: 6,
                faults: 0
            }
        );
        assert!(
            r.soft.faults().recent().is_empty(),
            "none reached the IOMMU"
        );
    }

    #[test]
    fn dma_registers_as_qemu_4_byte_writes_set_the_whole_register_and_a_command_needs_start() {
        let mut r = rig();
        let e = &mut r.edu;
        w64(e, reg::DMA_SRC, 0x9_0000_1000);
        assert_eq!(r64(e, reg::DMA_SRC), 0x9_0000_1000);
        assert_eq!(
            r32(e, reg::DMA_SRC),
            0x1000,
            "a 4-byte read returns the low half"
        );
        w32(e, reg::DMA_SRC, 0x1234_5678);
        assert_eq!(
            r64(e, reg::DMA_SRC),
            0x1234_5678,
            "a 4-byte write clears the upper half"
        );
        w32(e, reg::DMA_SRC + 4, 0x9);
        assert_eq!(
            r64(e, reg::DMA_SRC),
            0x1234_5678,
            "offset + 4 is not a register"
        );
        assert_eq!(r32(e, reg::DMA_SRC + 4), u32::MAX);
        w64(e, reg::DMA_SRC, 0);
        w64(e, reg::DMA_DST, BUFFER_ADDR);
        w64(e, reg::DMA_COUNT, 8);
        w64(e, reg::DMA_CMD, cmd::TO_RAM | cmd::IRQ);
        assert_eq!(
            r64(e, reg::DMA_CMD),
            0,
            "a command without START is ignored"
        );
        assert_eq!((e.stats().transfers, r32(e, reg::IRQ_STATUS)), (0, 0));
        w32(e, reg::DMA_CMD, cmd::START as u32);
        assert_eq!(e.stats().transfers, 1);
        assert_eq!(r64(e, reg::DMA_CMD), 0, "START reads back clear");
    }

    #[test]
    fn a_write_into_a_read_only_page_faults_and_writes_nothing_before_it() {
        let mut r = rig();
        // Bus [1 MiB, 1 MiB + 4 KiB) is guest RAM at 3 MiB, read-only for the device.
        r.core
            .map(&r.domain, MIB, 3 * MIB, 0x1000, Prot::READ)
            .expect("map read-only");
        r.mem
            .write_slice(&[0x77; 0x100], GuestAddress(MIB + MIB - 0x80))
            .unwrap();
        r.mem
            .write_slice(&[0x66; 0x80], GuestAddress(3 * MIB))
            .unwrap();
        // Into the device, across both pages: reading the read-only page is allowed.
        dma(&mut r.edu, MIB - 0x80, BUFFER_ADDR, 0x100, cmd::START);
        assert_eq!(r.edu.stats().transfers, 1);
        // Out of the device across both: the second page may not be written, so nothing is.
        dma(
            &mut r.edu,
            BUFFER_ADDR + 0x200,
            MIB - 0x80,
            0x100,
            cmd::START | cmd::TO_RAM,
        );
        let mut b = [0u8; 0x80];
        r.mem
            .read_slice(&mut b, GuestAddress(MIB + MIB - 0x80))
            .unwrap();
        assert_eq!(b, [0x77; 0x80], "the writable first page is untouched too");
        r.mem.read_slice(&mut b, GuestAddress(3 * MIB)).unwrap();
        assert_eq!(b, [0x66; 0x80]);
        let f = r.soft.faults().recent();
        assert_eq!(
            (f.len(), f[0].fault, f[0].iova),
            (1, Fault::Permission, MIB)
        );
        assert_eq!((r.edu.stats().refused, r.edu.stats().faults), (1, 1));
    }
}
