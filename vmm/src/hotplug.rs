//! Hotplug and unplug of passthrough devices, and the backend of the control API ([`crate::api`]).
//!
//! # What the guest sees
//! ACPI PCI hotplug on bus 0 (see `docs/hotplug.md` for why this and not PCIe native hotplug): the DSDT
//! gets [`dsdt_aml`]: a slot object `\_SB.PCI0.Sxx` with `_ADR`, `_SUN` and `_EJ0` for every device number
//! 1..=31, the register block `\_SB.PHPR` ([`devices::hotplug`], I/O ports [`HOTPLUG_PORT`]..+16), and a
//! Generic Event Device (`ACPI0013`) on GSI [`GED_IRQ`] whose `_EVT` reads the registers and sends
//! `Notify(Sxx, 1)` (device check: scan the slot) or `Notify(Sxx, 3)` (eject request). Linux's `acpiphp`
//! and `acpi_ged`, both built into Debian's kernels, do the rest.
//!
//! # Lifecycle of a device
//! ```text
//!   add-device ──► plugged ──remove-device──► unplugging ──guest _EJ0──► parked ──add-device──► plugged
//! ```
//! Each step on the device itself (open, plug, park, release) is [`Passthrough`]'s, the same code that
//! serves `--device` without an API socket; this module adds what the guest and the API client see:
//! - **add** (new device): preflight (sysfs, vfio-pci, group viable, memlock for one more container),
//!   [`Passthrough::open`] and [`Passthrough::plug`], then the slot is handed to the controller and the
//!   guest is told (device check).
//! - **remove**: the guest is asked to eject; when its `_EJ0` write arrives, the controller takes the
//!   device off the bus at once (vCPU thread), and this module (API thread) parks it
//!   ([`Passthrough::park`]: blocked domain first, then the PCI device is stopped). A guest may also
//!   eject a device on its own (slot power off); it is parked all the same.
//! - **add** of a parked device: [`Passthrough::plug`] again; the guest-RAM domain replays its mappings
//!   into the (empty) container, which works after the last device left too, because the domain keeps
//!   its mappings whether or not a container is attached.
//! - **VMM exit**: every device is released ([`Passthrough::release_device`]), then the domain is freed.
//!
//! # The DMA test command
//! `dma-test` makes a NIC (igb 8086:10c9 or e1000e 8086:10d3) transmit one frame from a TX ring that the
//! VMM itself sets up in a scratch buffer mapped into the guest-RAM domain at [`DMA_TEST_IOVA`], using
//! the device fd it holds (BAR0 registers through VFIO's region access). While the device is plugged
//! the NIC reads the descriptor and the frame and writes the descriptor back (the positive control);
//! once it is parked, the same attempt must be blocked by the IOMMU (no write-back, no frame sent, a DMAR
//! fault in the host's log). It is refused while the guest has bus mastering on (its driver may be using
//! the NIC), unless forced.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acpi_tables::{aml, Aml};
use devices::hotplug::{HotplugError, PciHotplugController, REGS_LEN};
use devices::pci::PciDevice;
use serde_json::{json, Value};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{Backend, Reply, Request, MAX_TIMEOUT_SECS};
use crate::passthrough::{
    self, AttachError, CheckedDevice, DeviceSpec, Passthrough, PassthroughDevice, PreflightError,
};
use crate::vm::Vm;

/// GSI (IOAPIC pin) of the Generic Event Device: edge-triggered, active high.
pub const GED_IRQ: u32 = 5;
/// First I/O port of the hotplug register block (below the PCI I/O window and 0xcf8).
pub const HOTPLUG_PORT: u16 = 0x0cc0;
/// IOVA of the `dma-test` scratch buffer: in the hole below 4 GiB where guest RAM never is (between
/// ECAM and the IOAPIC), below the MSI window.
pub const DMA_TEST_IOVA: u64 = 0xf000_0000;
/// Default time the guest has to eject a device on remove-device.
pub const DEFAULT_EJECT_TIMEOUT: Duration = Duration::from_secs(60);

// The fixed choices above do not clash with the layout (checked at compile time).
const _: () = {
    use crate::layout::*;
    assert!(DMA_TEST_IOVA >= ECAM_START + ECAM_SIZE && DMA_TEST_IOVA + 8192 <= IOAPIC_START);
    assert!(DMA_TEST_IOVA >= LOW_RAM_END);
    assert!(GED_IRQ != COM1_IRQ && GED_IRQ < IOAPIC_PINS);
    assert!(HOTPLUG_PORT as u64 + REGS_LEN as u64 <= PCI_IO_START);
    assert!(
        HOTPLUG_PORT + REGS_LEN <= 0xcf8
            && HOTPLUG_PORT > ACPI_POWER_PORT
            && HOTPLUG_PORT > COM1_PORT
    );
};

/// Errors of hotplug operations (the messages go back to the API client).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device did not pass the preflight.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// A bad device argument.
    #[error("{0}")]
    Spec(String),
    /// A step of the passthrough lifecycle failed (the component, the PCI device or the bus).
    #[error(transparent)]
    Passthrough(#[from] AttachError),
    /// The hotplug controller refused.
    #[error("{0}")]
    Controller(#[from] HotplugError),
    /// No device with this id.
    #[error("no device with id or BDF '{0}' (see list-devices)")]
    UnknownId(String),
    /// The device is not in a state the request needs.
    #[error("{id} is {state}: {what}")]
    BadState {
        /// The device.
        id: String,
        /// Its state.
        state: &'static str,
        /// What was asked and what to do.
        what: String,
    },
    /// The guest did not eject the device in time.
    #[error("{id}: the guest did not eject it within {secs} s; the eject request stays pending (list-devices shows 'unplugging') and the device is parked when the guest lets go. Does the guest kernel have ACPI PCI hotplug (acpiphp)?")]
    EjectTimeout {
        /// The device.
        id: String,
        /// How long we waited.
        secs: u64,
    },
    /// The DMA test could not run.
    #[error("dma-test on {id}: {why}")]
    DmaTest {
        /// The device.
        id: String,
        /// Why.
        why: String,
    },
    /// An OS resource.
    #[error("hotplug: {what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Interrupt wiring.
    #[error("hotplug: the GED interrupt: {0}")]
    Msi(#[from] devices::pci::MsiError),
}

// ------------------------------------------------------------------------------------------------ AML

fn slot_name(s: u8) -> String {
    format!("S{s:02X}_")
}

/// The DSDT additions for hotplug: slot objects under `\_SB.PCI0`, the register block `\_SB.PHPR`, and the
/// Generic Event Device `\_SB.GED0`.
pub fn dsdt_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let port = u32::from(HOTPLUG_PORT);
    let len = u32::from(REGS_LEN);

    // \_SB.PHPR: the registers, the eject method and the scan method.
    let io = aml::IO::new(HOTPLUG_PORT, HOTPLUG_PORT, 1, REGS_LEN as u8);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    let fields = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"PSTA", 32),
        ],
    );
    let b0ej = aml::Path::new("B0EJ");
    let shl = aml::ShiftLeft::new(&b0ej, &aml::ONE, &aml::Arg(0));
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let release = aml::Release::new("BLCK".into());
    let pcej = aml::Method::new("PCEJ".into(), 1, true, vec![&acquire, &shl, &release]);

    let pciu = aml::Path::new("PCIU");
    let pcid = aml::Path::new("PCID");
    let store_up = aml::Store::new(&aml::Local(0), &pciu);
    let store_down = aml::Store::new(&aml::Local(1), &pcid);
    let slots: Vec<u8> = (1..32).collect();
    let bits: Vec<u32> = slots.iter().map(|s| 1u32 << s).collect();
    let paths: Vec<aml::Path> = slots
        .iter()
        .map(|s| aml::Path::new(&format!("\\_SB_.PCI0.{}", slot_name(*s))))
        .collect();
    let check: u8 = 1;
    let eject: u8 = 3;
    let notify_up: Vec<aml::Notify> = paths.iter().map(|p| aml::Notify::new(p, &check)).collect();
    let notify_down: Vec<aml::Notify> = paths.iter().map(|p| aml::Notify::new(p, &eject)).collect();
    let and_up: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &aml::Local(0), b))
        .collect();
    let and_down: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &aml::Local(1), b))
        .collect();
    let if_up: Vec<aml::If> = and_up
        .iter()
        .zip(&notify_up)
        .map(|(a, n)| aml::If::new(a, vec![n]))
        .collect();
    let if_down: Vec<aml::If> = and_down
        .iter()
        .zip(&notify_down)
        .map(|(a, n)| aml::If::new(a, vec![n]))
        .collect();
    let mut scan_body: Vec<&dyn Aml> = vec![&acquire, &store_up, &store_down, &release];
    scan_body.extend(if_up.iter().map(|x| x as &dyn Aml));
    scan_body.extend(if_down.iter().map(|x| x as &dyn Aml));
    let pscn = aml::Method::new("PSCN".into(), 0, true, scan_body);
    let uid: &'static str = "PCI Hotplug Controller";
    aml::Device::new(
        "\\_SB_.PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_STA".into(), &0x0bu8),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Mutex::new("BLCK".into(), 0),
            &aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemIO, &port, &len),
            &fields,
            &pcej,
            &pscn,
        ],
    )
    .to_aml_bytes(&mut out);

    // \_SB.GED0: the interrupt that runs the scan.
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_crs = aml::ResourceTemplate::new(vec![&irq]);
    let call_scan = aml::MethodCall::new("\\_SB_.PHPR.PSCN".into(), vec![]);
    let hid: &'static str = "ACPI0013";
    aml::Device::new(
        "\\_SB_.GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &ged_crs),
            &aml::Method::new("_EVT".into(), 1, true, vec![&call_scan]),
        ],
    )
    .to_aml_bytes(&mut out);

    // The slots under \_SB.PCI0.
    let adrs: Vec<u32> = slots.iter().map(|s| u32::from(*s) << 16).collect();
    let suns: Vec<u32> = slots.iter().map(|s| u32::from(*s)).collect();
    let ej_calls: Vec<aml::MethodCall> = suns
        .iter()
        .map(|s| aml::MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![s]))
        .collect();
    let ej0: Vec<aml::Method> = ej_calls
        .iter()
        .map(|c| aml::Method::new("_EJ0".into(), 1, false, vec![c]))
        .collect();
    let adr_names: Vec<aml::Name> = adrs
        .iter()
        .map(|a| aml::Name::new("_ADR".into(), a))
        .collect();
    let sun_names: Vec<aml::Name> = suns
        .iter()
        .map(|s| aml::Name::new("_SUN".into(), s))
        .collect();
    let devs: Vec<aml::Device> = slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            aml::Device::new(
                slot_name(*s).as_str().into(),
                vec![&adr_names[i], &sun_names[i], &ej0[i]],
            )
        })
        .collect();
    aml::Scope::new(
        "\\_SB_.PCI0".into(),
        devs.iter().map(|d| d as &dyn Aml).collect(),
    )
    .to_aml_bytes(&mut out);
    out
}

// ------------------------------------------------------------------------------------------ the manager

/// Where a device is in its hotplug lifecycle.
enum State {
    /// On the bus, attached to the guest-RAM domain.
    Plugged,
    /// The guest was asked to eject it.
    Unplugging { since: Instant },
    /// Off the bus, in the blocked domain, fds open.
    Parked,
    /// Parking failed (the message says why); it stays off the bus.
    Failed(String),
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Plugged => "plugged",
            State::Unplugging { .. } => "unplugging",
            State::Parked => "parked",
            State::Failed(_) => "failed",
        }
    }
}

struct Entry {
    id: String,
    device: PassthroughDevice,
    state: State,
    plugs: u64,
}

/// A page-aligned anonymous buffer for the DMA test (lives until the VMM ends).
struct Scratch {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a plain mapping owned by this struct; accessed only with volatile reads/writes.
unsafe impl Send for Scratch {}

impl Scratch {
    fn new(len: usize) -> Result<Self, std::io::Error> {
        // SAFETY: a fresh anonymous mapping; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Scratch { ptr: p.cast(), len })
    }
    fn write(&self, off: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if off + i < self.len {
                // SAFETY: in bounds of our mapping.
                unsafe { std::ptr::write_volatile(self.ptr.add(off + i), *b) };
            }
        }
    }
    fn read(&self, off: usize) -> u8 {
        if off >= self.len {
            return 0;
        }
        // SAFETY: in bounds of our mapping.
        unsafe { std::ptr::read_volatile(self.ptr.add(off)) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned; no device mapping refers to it any more (the domain was
        // freed and every container closed before the manager drops it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The hotplug manager: with an API socket it owns every passthrough device of the VM (the `--device`
/// ones too), each through [`Passthrough`], and the controller that tells the guest about them. It is
/// the [`Backend`] of the control API.
pub struct Hotplug {
    pt: Passthrough,
    controller: Arc<PciHotplugController>,
    devices: Vec<Entry>,
    next_id: u32,
    scratch: Option<Scratch>,
    ejected_fd: RawFd,
    /// Readable when the API server stops (the VMM is ending): waits give up.
    stop_fd: Option<RawFd>,
    _ged_irq: EventFd,
    released: bool,
}

/// Returns this process's open fds and RSS in KiB.
pub fn process_counters() -> (usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0);
    (fds, rss)
}

impl Hotplug {
    /// Sets up hotplug for `vm` (the controller on its ports, the GED interrupt, the passthrough set-up
    /// with its guest-RAM domain) and plugs the `--device` devices that passed the preflight (before the
    /// guest runs: it finds them when it scans the bus). Write [`dsdt_aml`] into the DSDT as well.
    pub fn new(vm: &Vm, checked: &[CheckedDevice]) -> Result<Self, Error> {
        let os = |what| move |source| Error::Os { what, source };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?;
        vm.gsi_router().register_legacy_irqfd(&irq, GED_IRQ)?;
        let ejected = EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?;
        let ejected_fd = ejected.as_raw_fd();
        let controller = Arc::new(PciHotplugController::new(
            vm.devices().pci().clone(),
            irq.try_clone().map_err(os("eventfd"))?,
            ejected,
        ));
        vm.devices().set_hotplug(HOTPLUG_PORT, controller.clone());
        let mut h = Hotplug {
            pt: Passthrough::new(vm)?,
            controller,
            devices: Vec::new(),
            next_id: 0,
            scratch: None,
            ejected_fd,
            stop_fd: None,
            _ged_irq: irq,
            released: false,
        };
        for c in checked {
            h.plug_new(c, None, false)?;
        }
        log::info!(
            "hotplug: ready (ACPI PCI hotplug: GED on GSI {GED_IRQ}, registers at port {HOTPLUG_PORT:#x}); {} device(s) at boot",
            h.devices.len()
        );
        Ok(h)
    }

    fn find(&self, key: &str) -> Result<usize, Error> {
        let bdf = key.rsplit('/').next().unwrap_or(key);
        self.devices
            .iter()
            .position(|e| e.id == key || e.device.host.bdf == key || e.device.host.bdf == bdf)
            .ok_or_else(|| Error::UnknownId(key.to_string()))
    }

    /// Plugs entry `idx` (new or parked) through [`Passthrough::plug`], hands its slot to the controller
    /// and (when `notify`) tells the guest. On error the device is off the bus again (parked if it was).
    fn plug(&mut self, idx: usize, notify: bool) -> Result<(), Error> {
        let e = &mut self.devices[idx];
        let slot = self.pt.plug(&mut e.device)?;
        if let Err(x) = self.controller.manage(slot) {
            self.pt.take_off_bus(&mut e.device);
            // A device plugged before goes back to parked; a new one is released by `plug_new`.
            if e.plugs > 0 {
                if let Err(p) = self.pt.park(&mut e.device) {
                    log::error!("hotplug: {}: parking again after a failed plug: {p}", e.id);
                }
            }
            return Err(x.into());
        }
        e.state = State::Plugged;
        e.plugs += 1;
        if notify {
            if let Err(x) = self.controller.request_insert(slot) {
                log::error!("hotplug: {}: {x}", e.device.name);
            }
        }
        Ok(())
    }

    fn plug_new(
        &mut self,
        c: &CheckedDevice,
        id: Option<String>,
        notify: bool,
    ) -> Result<usize, Error> {
        if let Some(id) = &id {
            if id.is_empty() || self.devices.iter().any(|e| &e.id == id) {
                return Err(Error::Spec(format!(
                    "id '{id}' is empty or already used; pick another"
                )));
            }
        }
        if let Some(o) = self.devices.iter().find(|e| e.device.host.group == c.group) {
            return Err(Error::Spec(format!(
                "{}: IOMMU group {} already holds {} ({}); devices sharing a group cannot be hotplugged separately",
                c.bdf, c.group, o.id, o.device.host.bdf
            )));
        }
        // Each group has a container of its own, so the limit must cover guest RAM once more.
        let groups = 1 + self.devices.len();
        passthrough::check_memlock(passthrough::memlock_limit()?, self.pt.ram_bytes(), groups)?;
        let mut next_id = self.next_id;
        let id = id.unwrap_or_else(|| {
            while self
                .devices
                .iter()
                .any(|e| e.id == format!("vfio{next_id}"))
            {
                next_id += 1;
            }
            next_id += 1;
            format!("vfio{}", next_id - 1)
        });
        let device = self.pt.open(c, format!("{id} ({})", c.bdf))?;
        self.devices.push(Entry {
            id,
            device,
            state: State::Parked,
            plugs: 0,
        });
        let idx = self.devices.len() - 1;
        if let Err(e) = self.plug(idx, notify) {
            let entry = self.devices.remove(idx);
            self.pt.release_device(entry.device);
            return Err(e);
        }
        self.next_id = next_id;
        Ok(idx)
    }

    /// add-device: plugs a new device, or a parked one again.
    pub fn add(&mut self, path: &str, id: Option<String>) -> Result<Value, Error> {
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/sys/bus/pci/devices/{path}")
        };
        let spec = DeviceSpec::from_str(&path).map_err(|e| Error::Spec(e.to_string()))?;
        let c = passthrough::check_device(&spec, &passthrough::HostPaths::default());
        let bdf = match &c {
            Ok(c) => c.bdf.clone(),
            Err(_) => Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if let Some(idx) = self.devices.iter().position(|e| e.device.host.bdf == bdf) {
            if let Some(id) = &id {
                if *id != self.devices[idx].id {
                    return Err(Error::Spec(format!(
                        "{bdf} is known as '{}'; it keeps that id",
                        self.devices[idx].id
                    )));
                }
            }
            return match self.devices[idx].state {
                State::Parked => {
                    self.plug(idx, true)?;
                    Ok(self.describe(idx))
                }
                ref s => Err(Error::BadState {
                    id: self.devices[idx].id.clone(),
                    state: s.name(),
                    what: "only a parked device can be added again".into(),
                }),
            };
        }
        let c = c?;
        let idx = self.plug_new(&c, id, true)?;
        Ok(self.describe(idx))
    }

    /// Handles the devices the guest ejected: parks each.
    pub fn process_ejected(&mut self) {
        for ej in self.controller.take_ejected() {
            let Some(idx) = self.devices.iter().position(|e| {
                matches!(e.state, State::Plugged | State::Unplugging { .. })
                    && e.device.slot() == Some(ej.slot)
            }) else {
                log::warn!(
                    "hotplug: the guest ejected slot {} which holds none of our devices",
                    ej.slot
                );
                continue;
            };
            drop(ej.device);
            self.park(idx);
        }
    }

    /// The guest let go of the device (the controller took it off the bus): park it.
    fn park(&mut self, idx: usize) {
        let e = &mut self.devices[idx];
        if let State::Unplugging { since } = e.state {
            log::info!(
                "hotplug: {}: the guest ejected it {:.1} s after the request",
                e.device.name,
                since.elapsed().as_secs_f64()
            );
        }
        e.state = match self.pt.park(&mut e.device) {
            Ok(()) => State::Parked,
            Err(x) => {
                let msg = x.to_string();
                log::error!("hotplug: {}: parking failed: {msg}", e.device.name);
                State::Failed(msg)
            }
        };
    }

    /// remove-device: asks the guest to eject, waits up to `timeout` for it, and parks the device.
    pub fn remove(&mut self, key: &str, timeout: Duration) -> Result<Value, Error> {
        let idx = self.find(key)?;
        let e = &mut self.devices[idx];
        let slot = match (&e.state, e.device.slot()) {
            (State::Plugged | State::Unplugging { .. }, Some(slot)) => slot,
            (s, _) => {
                return Err(Error::BadState {
                    id: e.id.clone(),
                    state: s.name(),
                    what: "it is not plugged; nothing to remove".into(),
                })
            }
        };
        if let State::Plugged = e.state {
            e.state = State::Unplugging {
                since: Instant::now(),
            };
        }
        let id = e.id.clone();
        self.controller.request_eject(slot)?;
        // The API refuses longer ones; a caller that passed one anyway must not overflow the clock.
        let timeout = timeout.min(Duration::from_secs(MAX_TIMEOUT_SECS));
        let deadline = Instant::now() + timeout;
        loop {
            self.process_ejected();
            match &self.devices[idx].state {
                State::Parked => return Ok(self.describe(idx)),
                State::Failed(m) => {
                    return Err(Error::BadState {
                        id,
                        state: "failed",
                        what: format!("the guest ejected it but parking failed: {m}"),
                    })
                }
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::EjectTimeout {
                    id,
                    secs: timeout.as_secs(),
                });
            }
            let ms = left.as_millis().min(200) as i32;
            let mut p = [self.ejected_fd, self.stop_fd.unwrap_or(-1)].map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: two valid pollfds (a negative fd is ignored) for the duration of the call.
            unsafe { libc::poll(p.as_mut_ptr(), 2, ms) };
            if p[1].revents != 0 {
                return Err(Error::BadState {
                    id,
                    state: "unplugging",
                    what: "the VMM is stopping; it will release the device".into(),
                });
            }
        }
    }

    fn describe(&self, idx: usize) -> Value {
        let e = &self.devices[idx];
        let status = self.pt.status(&e.device);
        let mut v = json!({
            "id": e.id,
            "bdf": e.device.host.bdf,
            "path": e.device.host.sysfs.display().to_string(),
            "host_group": e.device.host.group,
            "state": e.state.name(),
            "times_plugged": e.plugs,
            "dma_owner": status.as_ref().map(|s| format!("{:?}", s.owner)),
            "domain": status.as_ref().and_then(|s| s.domain).map(|d| d.dtype.to_string()),
            "device_fd_open": self.pt.vfio_device(&e.device).is_some(),
        });
        match (&e.state, e.device.slot()) {
            (State::Plugged | State::Unplugging { .. }, Some(slot)) => {
                v["guest_bdf"] = json!(slot.to_string());
            }
            (State::Failed(m), _) => v["error"] = json!(m),
            _ => {}
        }
        v
    }

    /// list-devices.
    pub fn list(&self) -> Value {
        Value::Array((0..self.devices.len()).map(|i| self.describe(i)).collect())
    }

    /// info: counters that show what the VM holds.
    pub fn info(&self) -> Value {
        let vfio = self.pt.vfio();
        let s = vfio.stats();
        let (fds, rss) = process_counters();
        let (up, down, managed) = self.controller.pending();
        let count = |n: &str| self.devices.iter().filter(|e| e.state.name() == n).count();
        json!({
            "memory_bytes": self.pt.ram_bytes(),
            "devices": {
                "plugged": count("plugged"),
                "unplugging": count("unplugging"),
                "parked": count("parked"),
                "failed": count("failed"),
            },
            "process": {
                "pid": std::process::id(),
                "open_fds": fds,
                "vfio_fds": passthrough::open_vfio_fds(),
                "rss_kib": rss,
            },
            "vfio": {
                "map_calls": s.map_calls,
                "map_bytes": s.map_bytes,
                "unmap_calls": s.unmap_calls,
                "unmap_bytes": s.unmap_bytes,
                "live_mappings": s.map_calls.saturating_sub(s.unmap_calls),
                "live_mapped_bytes": s.map_bytes.saturating_sub(s.unmap_bytes),
                "open_containers": vfio.open_containers(),
            },
            "kvm": {
                "bar_slots": self.pt.bar_slots_in_use(),
                "msi_gsis": self.pt.msi_gsis_in_use(),
            },
            "hotplug": {
                "pending_insert": format!("{up:#x}"),
                "pending_eject": format!("{down:#x}"),
                "hotplug_slots": format!("{managed:#x}"),
            },
        })
    }

    /// Maps the scratch buffer at [`DMA_TEST_IOVA`] in the guest-RAM domain (once).
    fn scratch(&mut self) -> Result<&Scratch, Error> {
        if let Some(ref s) = self.scratch {
            return Ok(s);
        }
        if passthrough::ram_runs(self.pt.memory())
            .iter()
            .any(|&(gpa, _, len)| gpa < DMA_TEST_IOVA + 8192 && DMA_TEST_IOVA < gpa + len)
        {
            return Err(Error::Spec(format!(
                "guest RAM covers the test IOVA {DMA_TEST_IOVA:#x}"
            )));
        }
        let s = Scratch::new(8192).map_err(|source| Error::Os {
            what: "mmap of the DMA test buffer",
            source,
        })?;
        self.pt
            .map_into_domain(DMA_TEST_IOVA, s.ptr as u64, 8192, "the dma-test buffer")?;
        log::info!(
            "hotplug: dma-test buffer (8 KiB) mapped at IOVA {DMA_TEST_IOVA:#x} in the guest-RAM domain"
        );
        Ok(self.scratch.insert(s))
    }

    /// dma-test: see the module documentation.
    pub fn dma_test(&mut self, key: &str, force: bool) -> Result<Value, Error> {
        let idx = self.find(key)?;
        let e = &self.devices[idx];
        let (id, state) = (e.id.clone(), e.state.name());
        let derr = |why: String| Error::DmaTest {
            id: id.clone(),
            why,
        };
        match (&e.state, e.device.pci()) {
            (State::Plugged, Some(pci)) => {
                let cmd = pci
                    .lock()
                    .unwrap_or_else(|x| x.into_inner())
                    .read_config_register(devices::pci::COMMAND_REG);
                if cmd & u32::from(devices::pci::COMMAND_BUS_MASTER) != 0 && !force {
                    return Err(derr("the guest has bus mastering on (its driver may be using the NIC); unbind the driver in the guest, or pass force".into()));
                }
            }
            (State::Parked, _) => {}
            (s, _) => {
                return Err(Error::BadState {
                    id: id.clone(),
                    state: s.name(),
                    what: "dma-test needs a plugged or parked device".into(),
                })
            }
        }
        let vdev = self
            .pt
            .vfio_device(&e.device)
            .ok_or_else(|| derr("the device fd is not open".into()))?;
        let domain_type = self
            .pt
            .status(&e.device)
            .and_then(|s| s.domain)
            .map(|d| d.dtype.to_string());
        let scratch = self.scratch()?;
        let mut v = nic_tx_test(&vdev, scratch, DMA_TEST_IOVA).map_err(derr)?;
        v["id"] = json!(id);
        v["device_state"] = json!(state);
        v["domain"] = json!(domain_type);
        v["iova"] = json!(format!("{DMA_TEST_IOVA:#x}"));
        log::info!("hotplug: dma-test on {id} ({state}): {v}");
        Ok(v)
    }

    /// Releases every device through the component and frees the domain. Run after the vCPUs stopped.
    /// Idempotent; also run on drop.
    pub fn release(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        for e in self.devices.drain(..).rev() {
            self.pt.release_device(e.device);
        }
        self.pt.release();
        // Only now: no container maps the buffer any more.
        self.scratch = None;
    }
}

impl Drop for Hotplug {
    fn drop(&mut self) {
        self.release();
    }
}

impl Backend for Hotplug {
    fn handle(&mut self, req: Request) -> Reply {
        self.process_ejected();
        let r = match req {
            Request::Ping => Ok(json!("pong")),
            Request::AddDevice { path, id } => self.add(&path, id),
            Request::RemoveDevice { id, timeout_secs } => self.remove(
                &id,
                timeout_secs
                    .map(Duration::from_secs)
                    .unwrap_or(DEFAULT_EJECT_TIMEOUT),
            ),
            Request::ListDevices => Ok(self.list()),
            Request::Info => Ok(self.info()),
            Request::DmaTest { id, force } => self.dma_test(&id, force),
        };
        match r {
            Ok(v) => Reply::ok(v),
            Err(e) => Reply::err(e.to_string()),
        }
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.ejected_fd)
    }

    fn on_wake(&mut self) {
        self.process_ejected();
    }

    fn set_stop_fd(&mut self, fd: RawFd) {
        self.stop_fd = Some(fd);
    }
}

// ------------------------------------------------------------------------------------------ the NIC test

fn reg_read(d: &VfioDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.region_read(0, &mut b, off);
    u32::from_le_bytes(b)
}

fn reg_write(d: &VfioDevice, off: u64, v: u32) {
    d.region_write(0, &v.to_le_bytes(), off);
}

/// Makes the NIC send one frame from a TX ring at `iova` (descriptor page, then the frame page) that lives
/// in `buf`, as `src/vfiodma.c` of the rig does; returns what happened. Leaves the device reset.
fn nic_tx_test(d: &VfioDevice, buf: &Scratch, iova: u64) -> Result<Value, String> {
    let mut id = [0u8; 4];
    d.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut id, 0);
    let (vendor, device) = (
        u16::from_le_bytes([id[0], id[1]]),
        u16::from_le_bytes([id[2], id[3]]),
    );
    let tdbal: u64 = match (vendor, device) {
        (0x8086, 0x10c9) => 0xe000,
        (0x8086, 0x10d3) => 0x3800,
        _ => {
            return Err(format!(
                "{vendor:04x}:{device:04x} is not a NIC this test knows (igb 8086:10c9, e1000e 8086:10d3)"
            ))
        }
    };
    let igb = device == 0x10c9;
    let (tdbah, tdlen, tdh, tdt, txdctl) = (
        tdbal + 4,
        tdbal + 8,
        tdbal + 0x10,
        tdbal + 0x18,
        tdbal + 0x28,
    );
    const CTRL: u64 = 0x0;
    const STATUS: u64 = 0x8;
    const IMC: u64 = 0xd8;
    const TCTL: u64 = 0x400;
    const GPTC: u64 = 0x4080;
    const TPT: u64 = 0x40d4;
    let mut cmd = [0u8; 2];
    d.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, 4);
    let saved = u16::from_le_bytes(cmd);
    d.region_write(
        VFIO_PCI_CONFIG_REGION_INDEX,
        &(saved | 0x6).to_le_bytes(),
        4,
    );
    let ms = |n| std::thread::sleep(Duration::from_millis(n));
    reg_write(d, IMC, u32::MAX);
    reg_write(d, CTRL, reg_read(d, CTRL) | (1 << 26)); // reset
    ms(20);
    reg_write(d, IMC, u32::MAX);
    reg_write(d, CTRL, reg_read(d, CTRL) | (1 << 6)); // set link up
    ms(20);
    let gptc_before = reg_read(d, GPTC); // clears on read
                                         // The ring (page 0: descriptor 0) and the frame (page 1), written by the VMM.
    for off in 0..4096 {
        buf.write(off, &[0]);
    }
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x88, 0xb5]);
    frame.extend_from_slice(b"iovmm-dma-test");
    frame.resize(60, 0);
    buf.write(4096, &frame);
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&(iova + 4096).to_le_bytes());
    desc[8..10].copy_from_slice(&60u16.to_le_bytes());
    desc[11] = 0x01 | 0x02 | 0x08; // EOP | IFCS | RS
    buf.write(0, &desc);
    reg_write(d, TCTL, 0);
    reg_write(d, txdctl, 0);
    ms(1);
    reg_write(d, tdbal, iova as u32);
    reg_write(d, tdbah, (iova >> 32) as u32);
    reg_write(d, tdlen, 4096);
    reg_write(d, tdh, 0);
    reg_write(d, tdt, 0);
    reg_write(d, txdctl, if igb { 1 << 25 } else { 0 });
    reg_write(d, TCTL, (1 << 1) | (1 << 3) | (0xf << 4) | (0x40 << 12));
    reg_write(d, tdt, 1);
    let start = Instant::now();
    while buf.read(12) & 1 == 0 && start.elapsed() < Duration::from_millis(1500) {
        ms(10);
    }
    let status = buf.read(12);
    let head = reg_read(d, tdh);
    let gptc = reg_read(d, GPTC);
    let tpt = reg_read(d, TPT);
    let (ctrl, st) = (reg_read(d, CTRL), reg_read(d, STATUS));
    d.reset();
    d.region_write(VFIO_PCI_CONFIG_REGION_INDEX, &saved.to_le_bytes(), 4);
    let written_back = status & 1 != 0;
    Ok(json!({
        "nic": format!("{vendor:04x}:{device:04x}"),
        "ctrl": format!("{ctrl:#010x}"),
        "status_reg": format!("{st:#010x}"),
        "descriptor_status": format!("{status:#04x}"),
        "descriptor_written_back": written_back,
        "tdh": head,
        "good_packets_transmitted": gptc,
        "gptc_before": gptc_before,
        "total_packets_transmitted": tpt,
        "sent": written_back && gptc > 0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aml_has_every_slot_the_ged_and_the_registers() {
        let a = dsdt_aml();
        let has = |s: &[u8]| a.windows(s.len()).any(|w| w == s);
        for s in 1..32u8 {
            assert!(has(slot_name(s).as_bytes()), "slot {s}");
        }
        for n in [
            &b"PHPR"[..],
            b"GED0",
            b"ACPI0013",
            b"_EVT",
            b"PSCN",
            b"PCEJ",
            b"_EJ0",
            b"_SUN",
            b"PCIU",
            b"PCID",
            b"B0EJ",
        ] {
            assert!(has(n), "{}", String::from_utf8_lossy(n));
        }
        // The OperationRegion names the ports.
        assert!(has(&HOTPLUG_PORT.to_le_bytes()));
    }
}
