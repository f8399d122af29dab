//! The VFIO passthrough PCI device: a host PCI function, opened through VFIO, shown to the guest.
//!
//! What it owns:
//! - the virtual config space ([`config`]): BARs relocated to guest addresses the bus allocates,
//!   capabilities trimmed to PM, PCIe and MSI-X;
//! - the BAR mappings: each BAR part that VFIO lets us mmap becomes a KVM memory slot at the BAR's guest
//!   address (through [`BarMapper`]), except the pages holding the MSI-X table and PBA, which stay trapped
//!   and reach [`PciDevice::read_bar`]/[`PciDevice::write_bar`];
//! - MSI-X ([`msix`]): the guest's table is emulated, the PBA is read from the device and never written
//!   ([`MsixCap::bar_access`] says where each trapped access goes); each vector has a GSI and an eventfd
//!   from [`MsiRouting`]; VFIO signals the eventfds (VFIO_DEVICE_SET_IRQS) and KVM injects them (irqfd);
//! - reset: at creation and at [`VfioPciDevice::shutdown`].
//!
//! What it must not do: decide DMA. The device's DMA goes through the IOMMU component's `vfio` driver,
//! which owns the container the device was opened with; this module never maps guest memory.
//!
//! Nothing the guest does here may crash the VMM: bad config writes, accesses outside a BAR and
//! accesses of odd sizes are logged and dropped.

pub mod config;
pub mod msix;

use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::{
    BarKind, BarRegion, BarRelocation, MsiError, MsiRouting, PciDevice, PciDeviceError,
    COMMAND_MEMORY, COMMAND_REG, NUM_BARS,
};
use config::{ConfigIo, VfioConfig, LEGACY_SIZE};
use msix::{BarAccess, MsixCap, MsixTable};

/// Host page size assumed for BAR mappings (x86-64).
const PAGE: u64 = 4096;

/// Maps host memory (an mmap of a BAR) into the guest's physical address space: a KVM memory slot.
/// Implemented by the VMM; the device never sees KVM.
pub trait BarMapper: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` at guest physical `gpa`; returns a handle.
    fn map(&self, gpa: u64, size: u64, host_addr: u64) -> Result<u32, String>;
    /// Removes a mapping made by [`map`](Self::map).
    fn unmap(&self, handle: u32) -> Result<(), String>;
}

/// Errors of creating the passthrough device.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// The device's config space cannot be shown to a guest.
    #[error("{device}: {source}")]
    Config {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: config::ConfigError,
    },
    /// VFIO reports no MSI-X interrupts for a device whose config space has an MSI-X capability.
    #[error("{device}: VFIO offers {vfio} MSI-X vectors but the capability announces {cap}; is the device bound to vfio-pci?")]
    MsixCount {
        /// The device.
        device: String,
        /// What VFIO offers.
        vfio: u32,
        /// What the capability says.
        cap: u16,
    },
    /// No GSI for an MSI-X vector.
    #[error("{device}: cannot allocate interrupt routes for its MSI-X vectors: {source}")]
    Msi {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: MsiError,
    },
    /// An eventfd could not be duplicated.
    #[error("{device}: cannot duplicate an interrupt eventfd: {source}")]
    EventFd {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mmap of a BAR failed.
    #[error("{device}: cannot mmap BAR{bar} ({size:#x} bytes at {offset:#x}): {source}")]
    Mmap {
        /// The device.
        device: String,
        /// BAR.
        bar: u8,
        /// Offset in the BAR.
        offset: u64,
        /// Size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A part of a BAR mmapped from the VFIO device fd.
struct MmapArea {
    /// Offset in the BAR.
    offset: u64,
    size: u64,
    host: *mut libc::c_void,
}

// SAFETY: the mapping is a plain address range owned by this struct; it is only passed to KVM (as a
// number) and unmapped in Drop. No Rust reference into it is ever created.
unsafe impl Send for MmapArea {}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` are exactly what mmap returned; nothing else uses the range any more
        // (its KVM slot was removed before the area is dropped).
        unsafe {
            libc::munmap(self.host, self.size as usize);
        }
    }
}

/// Config accesses to the real device through VFIO's config region.
struct DeviceConfig<'a>(&'a VfioDevice);

impl ConfigIo for DeviceConfig<'_> {
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if offset + data.len() as u64 > LEGACY_SIZE as u64 {
            data.fill(0xff);
            return;
        }
        self.0
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, data, offset);
    }
    fn write_config(&self, offset: u64, data: &[u8]) {
        if offset + data.len() as u64 > LEGACY_SIZE as u64 {
            return;
        }
        self.0
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, data, offset);
    }
}

/// One MSI-X vector's plumbing.
struct Vector {
    gsi: u32,
    /// The eventfd VFIO signals (a duplicate of the router's irqfd).
    event: EventFd,
}

/// The passthrough PCI device. See the module documentation.
pub struct VfioPciDevice {
    name: String,
    device: Arc<VfioDevice>,
    config: VfioConfig,
    msix_cap: MsixCap,
    table: MsixTable,
    vectors: Vec<Vector>,
    msix_enabled_in_vfio: bool,
    router: Arc<dyn MsiRouting>,
    mapper: Arc<dyn BarMapper>,
    /// Per BAR: the mmapped parts.
    areas: Vec<Vec<MmapArea>>,
    /// Per BAR: the KVM slot handles currently mapped.
    slots: Vec<Vec<u32>>,
    shut_down: bool,
    /// The device decodes memory (command register bit 1): BAR slots exist only while it does, since
    /// vfio-pci blocks BAR mmaps while decode is off and a guest access through a slot would fail KVM_RUN.
    memory_enabled: bool,
    decode_announced: bool,
}

impl VfioPciDevice {
    /// Wraps an opened VFIO device: resets it, reads and virtualises its config space, mmaps its BARs,
    /// and allocates one GSI per MSI-X vector. `name` is used in logs (e.g. "vfio 0000:00:02.0").
    pub fn new(
        name: impl Into<String>,
        device: Arc<VfioDevice>,
        router: Arc<dyn MsiRouting>,
        mapper: Arc<dyn BarMapper>,
    ) -> Result<Self, VfioPciError> {
        let name = name.into();
        device.reset();
        let mut snapshot = [0u8; LEGACY_SIZE];
        DeviceConfig(&device).read_config(0, &mut snapshot);
        let mut sizes = [0u64; NUM_BARS];
        for (i, s) in sizes.iter_mut().enumerate() {
            let flags = device.get_region_flags(i as u32);
            if flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE) != 0 {
                *s = device.get_region_size(i as u32);
            }
        }
        let config = VfioConfig::new(&snapshot, &sizes).map_err(|source| VfioPciError::Config {
            device: name.clone(),
            source,
        })?;
        let msix_cap = config.msix().ok_or(VfioPciError::Config {
            device: name.clone(),
            source: config::ConfigError::NoMsiOrMsix,
        })?;
        let vfio_vectors = device
            .get_irq_info(vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX)
            .map(|i| i.count)
            .unwrap_or(0);
        if vfio_vectors < u32::from(msix_cap.vectors) {
            return Err(VfioPciError::MsixCount {
                device: name,
                vfio: vfio_vectors,
                cap: msix_cap.vectors,
            });
        }

        let mut dev = VfioPciDevice {
            name: name.clone(),
            table: MsixTable::new(msix_cap.vectors),
            vectors: Vec::new(),
            msix_enabled_in_vfio: false,
            router,
            mapper,
            areas: (0..NUM_BARS).map(|_| Vec::new()).collect(),
            slots: (0..NUM_BARS).map(|_| Vec::new()).collect(),
            shut_down: false,
            memory_enabled: false,
            decode_announced: false,
            device,
            config,
            msix_cap,
        };
        for _ in 0..msix_cap.vectors {
            let (gsi, irqfd) = dev.router.allocate().map_err(|source| VfioPciError::Msi {
                device: name.clone(),
                source,
            })?;
            let event = irqfd.try_clone().map_err(|source| VfioPciError::EventFd {
                device: name.clone(),
                source,
            })?;
            // Masked until the guest programs and unmasks it.
            if let Err(e) = dev.router.set_msi(gsi, 0, 0, true) {
                log::warn!("{name}: cannot park GSI {gsi}: {e}");
            }
            dev.vectors.push(Vector { gsi, event });
        }
        dev.mmap_bars()?;
        log::info!(
            "{name}: {} MSI-X vectors (GSIs {:?}), BARs {:?}, capabilities shown {:?}",
            msix_cap.vectors,
            dev.vectors.iter().map(|v| v.gsi).collect::<Vec<_>>(),
            dev.config
                .bar_defs()
                .iter()
                .enumerate()
                .filter_map(|(i, d)| d.map(|d| {
                    let kind = match d.kind {
                        BarKind::Io => "io",
                        BarKind::Mem32 { .. } => "mem32",
                        BarKind::Mem64 { .. } => "mem64",
                    };
                    format!("{i}: {:#x} {kind}", d.size)
                }))
                .collect::<Vec<_>>(),
            dev.config
                .shown_capabilities()
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        );
        Ok(dev)
    }

    /// The parts of BAR `bar` (of `size` bytes) that may be mapped into the guest: VFIO's mmap areas minus
    /// the pages of the MSI-X table and PBA.
    fn mappable(&self, bar: u8, size: u64) -> Vec<(u64, u64)> {
        let i = u32::from(bar);
        if self.device.get_region_flags(i) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Vec::new();
        }
        let mut areas: Vec<(u64, u64)> = Vec::new();
        for cap in self.device.get_region_caps(i) {
            if let VfioRegionInfoCap::SparseMmap(s) = cap {
                areas.extend(s.areas.iter().map(|a| (a.offset, a.size)));
            }
        }
        if areas.is_empty() {
            areas.push((0, size));
        }
        let mut holes = Vec::new();
        let c = self.msix_cap;
        if c.table_bar == bar {
            holes.push(page_span(c.table_offset, c.table_size()));
        }
        if c.pba_bar == bar {
            holes.push(page_span(c.pba_offset, c.pba_size()));
        }
        subtract(areas, &holes)
            .into_iter()
            .filter(|&(o, s)| o % PAGE == 0 && s % PAGE == 0 && s > 0 && o + s <= size)
            .collect()
    }

    fn mmap_bars(&mut self) -> Result<(), VfioPciError> {
        for (i, def) in self.config.bar_defs().iter().enumerate() {
            let Some(def) = def else { continue };
            if !def.kind.is_memory() {
                continue;
            }
            let region_offset = self.device.get_region_offset(i as u32);
            for (offset, size) in self.mappable(i as u8, def.size) {
                // SAFETY: a fresh shared mapping of the device fd at an offset VFIO gave us; the kernel
                // checks the range. No Rust reference into it is ever created.
                let host = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        size as usize,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_SHARED,
                        std::os::unix::io::AsRawFd::as_raw_fd(&*self.device),
                        (region_offset + offset) as libc::off_t,
                    )
                };
                if host == libc::MAP_FAILED {
                    return Err(VfioPciError::Mmap {
                        device: self.name.clone(),
                        bar: i as u8,
                        offset,
                        size,
                        source: std::io::Error::last_os_error(),
                    });
                }
                log::debug!(
                    "{}: BAR{i} [{offset:#x}, +{size:#x}) mmapped at {host:p}",
                    self.name
                );
                self.areas[i].push(MmapArea { offset, size, host });
            }
        }
        Ok(())
    }

    fn unmap_slots(&mut self, bar: usize) {
        for h in self.slots[bar].drain(..) {
            if let Err(e) = self.mapper.unmap(h) {
                log::error!("{}: cannot remove BAR{bar} mapping {h}: {e}", self.name);
            }
        }
    }

    fn map_slots(&mut self, bar: usize, base: u64) -> Result<(), String> {
        for a in &self.areas[bar] {
            let h = self.mapper.map(base + a.offset, a.size, a.host as u64)?;
            self.slots[bar].push(h);
        }
        Ok(())
    }

    /// Applies the guest's view of vector `i` to its route.
    fn update_vector(&self, i: usize) {
        let (enabled, fmask) = self.config.msix_state();
        let (Some(v), Some(vec)) = (self.table.route(i, enabled, fmask), self.vectors.get(i))
        else {
            return;
        };
        if let Err(e) = self.router.set_msi(vec.gsi, v.address, v.data, v.masked) {
            log::warn!("{}: MSI-X vector {i}: {e}", self.name);
        }
    }

    fn msix_control_changed(&mut self) {
        let (enabled, _) = self.config.msix_state();
        if enabled && !self.msix_enabled_in_vfio {
            let fds: Vec<&EventFd> = self.vectors.iter().map(|v| &v.event).collect();
            match self.device.enable_msix(fds) {
                Ok(()) => {
                    self.msix_enabled_in_vfio = true;
                    log::info!(
                        "{}: MSI-X enabled, {} vectors signalled through irqfds",
                        self.name,
                        self.vectors.len()
                    );
                }
                Err(e) => log::error!("{}: cannot enable MSI-X: {e}", self.name),
            }
        } else if !enabled && self.msix_enabled_in_vfio {
            if let Err(e) = self.device.disable_msix() {
                log::warn!("{}: cannot disable MSI-X: {e}", self.name);
            }
            self.msix_enabled_in_vfio = false;
        }
        for i in 0..self.vectors.len() {
            self.update_vector(i);
        }
    }

    /// Follows the device's memory-decode bit: BAR slots are mapped while it is set, removed while not.
    fn command_written(&mut self) {
        let mut cmd = [0u8; 2];
        DeviceConfig(&self.device).read_config(4, &mut cmd);
        let mem = u16::from_le_bytes(cmd) & COMMAND_MEMORY != 0;
        if mem == self.memory_enabled || self.shut_down {
            return;
        }
        self.memory_enabled = mem;
        for b in self.config.bars() {
            let bar = usize::from(b.index);
            if !b.kind.is_memory() || bar >= NUM_BARS {
                continue;
            }
            self.unmap_slots(bar);
            if mem && b.base != 0 {
                if let Err(e) = self.map_slots(bar, b.base) {
                    self.unmap_slots(bar);
                    log::error!(
                        "{}: BAR{bar} stays trapped (slow) at {:#x}: {e}",
                        self.name,
                        b.base
                    );
                }
            }
        }
        // Linux toggles decode around BAR sizing: say it once at info level, then at debug.
        let level = if mem && !self.decode_announced {
            self.decode_announced = true;
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "{}: memory decode {}: {} BAR part(s) mapped directly into the guest",
            self.name,
            if mem { "on" } else { "off" },
            self.slots.iter().map(Vec::len).sum::<usize>()
        );
    }

    /// Stops the device: MSI-X off, BAR slots removed, device reset, GSIs released. Idempotent; also run
    /// on drop. DMA is the IOMMU component's: release the device there afterwards.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        if self.msix_enabled_in_vfio {
            if let Err(e) = self.device.disable_msix() {
                log::warn!("{}: cannot disable MSI-X: {e}", self.name);
            }
            self.msix_enabled_in_vfio = false;
        }
        for bar in 0..NUM_BARS {
            self.unmap_slots(bar);
        }
        for a in &mut self.areas {
            a.clear();
        }
        self.device.reset();
        for v in self.vectors.drain(..) {
            if let Err(e) = self.router.release(v.gsi) {
                log::warn!("{}: cannot release GSI {}: {e}", self.name, v.gsi);
            }
        }
        log::info!("{}: stopped (MSI-X off, BARs unmapped, reset)", self.name);
    }

    fn bar_size(&self, bar: u8) -> u64 {
        self.config
            .bar_defs()
            .get(usize::from(bar))
            .copied()
            .flatten()
            .map(|d| d.size)
            .unwrap_or(0)
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `[offset, offset+len)` widened to whole pages.
fn page_span(offset: u64, len: u64) -> (u64, u64) {
    let start = offset & !(PAGE - 1);
    let end = (offset.saturating_add(len)).next_multiple_of(PAGE);
    (start, end - start)
}

/// `areas` minus `holes` (all as (offset, size)).
fn subtract(areas: Vec<(u64, u64)>, holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = areas;
    for &(ho, hs) in holes {
        let he = ho + hs;
        let mut next = Vec::new();
        for (o, s) in out {
            let e = o + s;
            if he <= o || ho >= e {
                next.push((o, s));
                continue;
            }
            if ho > o {
                next.push((o, ho - o));
            }
            if he < e {
                next.push((he, e - he));
            }
        }
        out = next;
    }
    out
}

impl PciDevice for VfioPciDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_register(reg, &DeviceConfig(&self.device))
    }

    fn write_config_register(&mut self, reg: usize, offset: u8, data: &[u8]) -> Vec<BarRelocation> {
        let dev = self.device.clone();
        let fx = self
            .config
            .write_register(reg, offset, data, &DeviceConfig(&dev));
        if fx.msix_control {
            self.msix_control_changed();
        }
        if reg == COMMAND_REG && offset < 2 {
            self.command_written();
        }
        fx.relocations
    }

    fn bars(&self) -> Vec<BarRegion> {
        self.config.bars()
    }

    fn move_bar(&mut self, r: &BarRelocation) -> Result<(), PciDeviceError> {
        let bar = usize::from(r.index);
        if bar >= NUM_BARS || r.kind == BarKind::Io {
            return Ok(());
        }
        self.unmap_slots(bar);
        if r.new_base == 0 || self.shut_down || !self.memory_enabled {
            // Without memory decode the bus traps the range; the slots follow the command register.
            return Ok(());
        }
        self.map_slots(bar, r.new_base).map_err(|reason| {
            self.unmap_slots(bar);
            PciDeviceError::MoveBar {
                device: self.name.clone(),
                bar: r.index,
                new_base: r.new_base,
                reason,
            }
        })?;
        log::debug!(
            "{}: BAR{bar} at {:#x}: {} direct mapping(s)",
            self.name,
            r.new_base,
            self.slots[bar].len()
        );
        Ok(())
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        // What a failed read (e.g. memory decode off) returns: all-ones, as on a real bus.
        data.fill(0xff);
        match self
            .msix_cap
            .bar_access(bar, self.bar_size(bar), offset, len, false)
        {
            BarAccess::Table(o) => self.table.read(o, data),
            BarAccess::Device => self.device.region_read(u32::from(bar), data, offset),
            BarAccess::Dropped => log::debug!(
                "{}: read of {len} bytes at BAR{bar} {offset:#x} dropped (outside the BAR or across the MSI-X table's edge)",
                self.name
            ),
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        match self
            .msix_cap
            .bar_access(bar, self.bar_size(bar), offset, len, true)
        {
            BarAccess::Table(o) => {
                for i in self.table.write(o, data) {
                    self.update_vector(i);
                }
            }
            BarAccess::Device => self.device.region_write(u32::from(bar), data, offset),
            BarAccess::Dropped => log::debug!(
                "{}: write of {len} bytes at BAR{bar} {offset:#x} dropped (outside the BAR, across the MSI-X table's edge, or into the PBA)",
                self.name
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msix_pages_are_cut_out_of_mappable_areas() {
        assert_eq!(page_span(0, 160), (0, PAGE));
        assert_eq!(page_span(0x2000, 8), (0x2000, PAGE));
        assert_eq!(page_span(0xff8, 16), (0, 2 * PAGE));
        // igb BAR3 (16 KiB): table page 0, PBA page 2 -> pages 1 and 3 stay mappable.
        let got = subtract(vec![(0, 0x4000)], &[(0, 0x1000), (0x2000, 0x1000)]);
        assert_eq!(got, vec![(0x1000, 0x1000), (0x3000, 0x1000)]);
        // A hole covering everything.
        assert!(subtract(vec![(0, 0x1000)], &[(0, 0x2000)]).is_empty());
        // Unrelated holes leave areas alone.
        assert_eq!(
            subtract(vec![(0, 0x20000)], &[(0x40000, 0x1000)]),
            vec![(0, 0x20000)]
        );
    }
}
