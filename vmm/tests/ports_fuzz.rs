//! Property-based fuzzing of the legacy ports as a guest reaches them through the VMM's port routing
//! (`DeviceManager`, no KVM needed): random `in`/`out` of any size (0 to 8 bytes, as KVM hands over
//! string I/O) at any port, around COM1, the CMOS RTC, the ACPI power register, the i8042, the hotplug
//! registers and the PCI config ports, with host console input in between.
//!
//! Checked after every access, against a model: nothing panics; only the power register (S5 or the
//! reset value) and the i8042's reset command end the VM, and exactly when they should; ports nothing
//! claims read all-ones; the UART's registers read back what was written (divisor latch, line and modem
//! control, scratch, interrupt enable masked to its 4 bits), its output is exactly the bytes written to
//! the transmit register, received bytes come out in order and the line status says when there are
//! some; the CMOS keeps NVRAM and alarms, keeps its clock BCD 24-hour (register B's data-mode bits stay),
//! reports no update in progress and valid BCD time; the hotplug registers read 0 with nothing pending.
//!
//! `PROPTEST_CASES` sets the number of cases (`scripts/test` uses 4000).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use devices::hotplug::{PciHotplugController, REGS_LEN};
use devices::pci::{BarWindows, HostBridge, PciBus, PciSlot};
use devices::serial::{CapturedOutput, SerialConsole};
use proptest::prelude::*;
use vmm::device_manager::DeviceManager;
use vmm::hotplug::HOTPLUG_PORT;
use vmm::layout::{ACPI_POWER_PORT, COM1_PORT, I8042_CMD_PORT, I8042_DATA_PORT};
use vmm::vcpu::{ExitHandler, VmExit};
use vmm_sys_util::eventfd::EventFd;

const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;

#[derive(Clone, Debug)]
enum Op {
    In(u16, usize),
    Out(u16, Vec<u8>),
    /// Host console input.
    Input(Vec<u8>),
}

fn port() -> impl Strategy<Value = u16> {
    let near = [
        I8042_DATA_PORT,
        I8042_CMD_PORT,
        CMOS_INDEX,
        CMOS_DATA,
        ACPI_POWER_PORT,
        COM1_PORT,
        HOTPLUG_PORT,
        0xcf8,
        0xcfc,
    ];
    prop_oneof![
        4 => (0u16..8).prop_map(|o| COM1_PORT + o),
        3 => prop_oneof![Just(CMOS_INDEX), Just(CMOS_DATA)],
        1 => Just(ACPI_POWER_PORT),
        1 => prop_oneof![Just(I8042_DATA_PORT), Just(I8042_CMD_PORT)],
        1 => (0u16..REGS_LEN).prop_map(|o| HOTPLUG_PORT + o),
        2 => (prop::sample::select(near.to_vec()), 0u16..4).prop_map(|(p, d)| (p + d).wrapping_sub(1)),
        2 => any::<u16>(),
    ]
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(1usize), 1 => Just(2), 1 => Just(4), 1 => 0usize..9]
}

fn byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        Just(0x01),
        Just(0xfe),
        Just(0x34),  // SLP_TYP 5 | SLP_EN
        Just(0x80),  // DLAB
        Just(0x10),  // loopback
        Just(0x0b),  // CMOS register B
        (0u8..0x0e), // CMOS clock and status registers
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (port(), size()).prop_map(|(p, n)| Op::In(p, n)),
        4 => (port(), size(), byte(), any::<u64>()).prop_map(|(p, n, b, rest)| {
            let mut d = vec![b];
            d.extend(rest.to_le_bytes());
            d.truncate(n);
            Op::Out(p, d)
        }),
        1 => prop::collection::vec(any::<u8>(), 0..80).prop_map(Op::Input),
    ]
}

/// The UART as a guest sees it.
struct Uart {
    lcr: u8,
    mcr: u8,
    ier: u8,
    divisor: [u8; 2],
    scratch: u8,
    rx: VecDeque<u8>,
    out: Vec<u8>,
}

impl Uart {
    fn dlab(&self) -> bool {
        self.lcr & 0x80 != 0
    }
    fn looped(&self) -> bool {
        self.mcr & 0x10 != 0
    }
}

struct Rig {
    dm: DeviceManager,
    bus: Arc<PciBus>,
    sink: CapturedOutput,
    uart: Uart,
    cmos_index: u8,
    nvram: [u8; 128],
}

fn is_bcd(v: u8, max: u8) -> bool {
    v & 0xf <= 9 && v >> 4 <= 9 && (v >> 4) * 10 + (v & 0xf) <= max
}

impl Rig {
    fn new() -> Self {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let sink = CapturedOutput::default();
        let serial = SerialConsole::new(irq, Box::new(sink.clone()));
        let bus = Arc::new(PciBus::new(BarWindows {
            mmio32: (0xc000_0000, 0x2000_0000),
            mmio64: (1 << 40, 1 << 30),
            io: (0x1000, 0xf000),
        }));
        let host = bus.add_device(Some(0), Arc::new(Mutex::new(HostBridge::new())));
        assert_eq!(host.ok(), Some(PciSlot(0)));
        let dm = DeviceManager::new(Some(serial), bus.clone());
        let hp = PciHotplugController::new(
            bus.clone(),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        );
        dm.set_hotplug(HOTPLUG_PORT, Arc::new(hp));
        let mut nvram = [0u8; 128];
        nvram[0x0a] = 0x26;
        nvram[0x0b] = 0x02;
        nvram[0x0d] = 0x80;
        Rig {
            dm,
            bus,
            sink,
            uart: Uart {
                lcr: 0x03,
                mcr: 0x08,
                ier: 0,
                divisor: [0x0c, 0],
                scratch: 0,
                rx: VecDeque::new(),
                out: Vec::new(),
            },
            cmos_index: 0,
            nvram,
        }
    }

    /// What a byte read of UART register `r` returns (and does).
    fn uart_read(&mut self, r: u16, got: u8) -> Result<(), TestCaseError> {
        let u = &mut self.uart;
        match r {
            0 | 1 if u.dlab() => prop_assert_eq!(got, u.divisor[usize::from(r)]),
            0 => prop_assert_eq!(got, u.rx.pop_front().unwrap_or(0), "received byte"),
            1 => prop_assert_eq!(got, u.ier),
            2 => prop_assert_eq!(got & 0xc0, 0xc0, "16550A FIFO bits"),
            3 => prop_assert_eq!(got, u.lcr),
            4 => prop_assert_eq!(got, u.mcr),
            5 => prop_assert_eq!(got, 0x60 | u8::from(!u.rx.is_empty()), "line status"),
            6 => {}
            _ => prop_assert_eq!(got, u.scratch),
        }
        Ok(())
    }

    fn uart_write(&mut self, r: u16, v: u8) {
        let u = &mut self.uart;
        match r {
            0 | 1 if u.dlab() => u.divisor[usize::from(r)] = v,
            // Loopback: into the receive FIFO while it has room.
            0 if u.looped() && u.rx.len() < 64 => u.rx.push_back(v),
            0 if u.looped() => {}
            0 => u.out.push(v),
            1 => u.ier = v & 0x0f,
            3 => u.lcr = v,
            4 => u.mcr = v,
            7 => u.scratch = v,
            _ => {}
        }
    }

    fn cmos_read(&self, got: u8) -> Result<(), TestCaseError> {
        let i = self.cmos_index;
        let max = match i {
            0x00 | 0x02 => Some(59),
            0x04 => Some(23),
            0x06 => Some(7),
            0x07 => Some(31),
            0x08 => Some(12),
            0x09 | 0x32 => Some(99),
            _ => None,
        };
        match max {
            Some(max) => prop_assert!(is_bcd(got, max), "register {:#x} = {:#x}", i, got),
            None if i == 0x0c => prop_assert_eq!(got, 0),
            None => prop_assert_eq!(got, self.nvram[usize::from(i)], "register {:#x}", i),
        }
        prop_assert!(i != 0x0a || got & 0x80 == 0, "no update in progress");
        Ok(())
    }

    fn cmos_write(&mut self, v: u8) {
        let i = usize::from(self.cmos_index);
        match self.cmos_index {
            0x00 | 0x02 | 0x04 | 0x06..=0x09 | 0x0c | 0x0d => {}
            0x0a => self.nvram[i] = v & 0x7f,
            0x0b => self.nvram[i] = (v & !0x06) | 0x02,
            _ => self.nvram[i] = v,
        }
    }

    fn claimed(p: u16) -> bool {
        [
            I8042_DATA_PORT,
            I8042_CMD_PORT,
            CMOS_INDEX,
            CMOS_DATA,
            ACPI_POWER_PORT,
        ]
        .contains(&p)
            || (HOTPLUG_PORT..HOTPLUG_PORT + REGS_LEN).contains(&p)
            || (0xcf8..=0xcff).contains(&p)
    }

    fn read(&mut self, p: u16, n: usize) -> Result<(), TestCaseError> {
        let mut d = vec![0x5au8; n];
        prop_assert_eq!(
            self.dm.pio_read(p, &mut d),
            None,
            "a read never ends the VM"
        );
        let com1 = (COM1_PORT..COM1_PORT + 8).contains(&p);
        if com1 && n == 1 {
            return self.uart_read(p - COM1_PORT, d[0]);
        }
        match p {
            CMOS_DATA => {
                for &b in &d {
                    self.cmos_read(b)?;
                }
            }
            CMOS_INDEX => prop_assert!(d.iter().all(|&b| b == 0xff)),
            ACPI_POWER_PORT | I8042_DATA_PORT | I8042_CMD_PORT => {
                prop_assert!(d.iter().all(|&b| b == 0))
            }
            p if (HOTPLUG_PORT..HOTPLUG_PORT + REGS_LEN).contains(&p) => {
                prop_assert!(d.iter().all(|&b| b == 0), "nothing pending")
            }
            p if Self::claimed(p) => {}
            // Nothing else answers (the UART takes byte accesses only).
            _ => prop_assert!(d.iter().all(|&b| b == 0xff), "port {:#x}: {:x?}", p, d),
        }
        Ok(())
    }

    fn write(&mut self, p: u16, d: &[u8]) -> Result<(), TestCaseError> {
        let exit = self.dm.pio_write(p, d);
        let first = d.first().copied();
        let want = match (p, first) {
            (ACPI_POWER_PORT, Some(1)) => Some(VmExit::Reset),
            (ACPI_POWER_PORT, Some(v)) if v & 0x20 != 0 && (v >> 2) & 7 == 5 => {
                Some(VmExit::PowerOff)
            }
            (I8042_CMD_PORT, Some(0xfe)) => Some(VmExit::Reset),
            _ => None,
        };
        prop_assert_eq!(exit, want, "port {:#x} <- {:x?}", p, d);
        if (COM1_PORT..COM1_PORT + 8).contains(&p) {
            // String I/O: every byte goes to the register.
            for &b in d {
                self.uart_write(p - COM1_PORT, b);
            }
        }
        match (p, first) {
            (CMOS_INDEX, Some(v)) => self.cmos_index = v & 0x7f,
            (CMOS_DATA, Some(v)) => self.cmos_write(v),
            _ => {}
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::In(p, n) => self.read(*p, *n)?,
            Op::Out(p, d) => self.write(*p, d)?,
            Op::Input(bytes) => {
                // In loopback the line is disconnected: nothing is taken.
                let room = if self.uart.looped() {
                    0
                } else {
                    64 - self.uart.rx.len()
                };
                let taken = self.dm.serial_input(bytes);
                prop_assert_eq!(taken, room.min(bytes.len()));
                self.uart.rx.extend(&bytes[..taken]);
            }
        }
        let out = self.sink.bytes();
        prop_assert_eq!(&out, &self.uart.out, "console output");
        prop_assert!(
            self.bus.device(PciSlot(0)).is_some(),
            "the host bridge stays"
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn random_port_accesses_keep_the_invariants(ops in prop::collection::vec(op(), 1..48)) {
        let mut rig = Rig::new();
        for op in &ops {
            rig.apply(op)?;
        }
    }
}
