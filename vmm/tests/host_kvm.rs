//! The VMM's KVM plumbing on the host's /dev/kvm, with tiny hand-made guests (real mode, or long mode at
//! CPL3: the host's KVM emulates CPL0 too slowly to boot Linux; see rig/README.md).
//!
//! These tests need /dev/kvm and fail loudly without it: a machine that runs them is expected to have KVM.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::pci::{
    BarKind, BarRegion, BarRelocation, MsiRouting, PciBarDef, PciConfig, PciDevice, PciSlot,
};
use devices::serial::CapturedOutput;
use kvm_bindings::{kvm_mp_state, kvm_segment, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use vmm::layout::{ECAM_START, HIGH_RAM_4G};
use vmm::memory::{self, Backing};
use vmm::vcpu::{self, VmExit};
use vmm::vm::{SerialOutput, Vm};

const TIMEOUT: Duration = Duration::from_secs(20);

/// The guest's console output.
type Console = CapturedOutput;

fn new_vm(cpus: u8, mem: u64) -> (Vm, Console) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM (they do not skip)"
    );
    let mem = memory::create(mem, Backing::Anonymous { thp: false }).expect("guest memory");
    let console = Console::default();
    let vm = Vm::new(cpus, mem, SerialOutput::Writer(Box::new(console.clone())))
        .expect("VM on /dev/kvm");
    let supported = vm.supported_cpuid().expect("KVM_GET_SUPPORTED_CPUID");
    for (i, v) in vm.vcpus().iter().enumerate() {
        v.set_cpuid2(&vcpu::cpuid_for(&supported, i as u8, cpus))
            .expect("KVM_SET_CPUID2");
    }
    (vm, console)
}

/// vCPU in real mode at `ip` with all segment bases 0; APs are made runnable without INIT/SIPI.
fn real_mode(v: &VcpuFd, ip: u64, ap: bool) {
    let mut s = v.get_sregs().expect("get sregs");
    for seg in [
        &mut s.cs, &mut s.ds, &mut s.es, &mut s.ss, &mut s.fs, &mut s.gs,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    v.set_sregs(&s).expect("set sregs");
    let mut r = v.get_regs().expect("get regs");
    r.rip = ip;
    r.rflags = 2;
    r.rsp = 0x7000;
    v.set_regs(&r).expect("set regs");
    if ap {
        v.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .expect("set mp state");
    }
}

const PT: u64 = 0x10000; // PML4, PDPT, then 8 PDs: 8 GiB identity map, user-accessible.
const GDT: u64 = 0xf000;

/// vCPU in 64-bit mode at CPL3 with IOPL 3, at `ip`, over an identity map of 0..8 GiB.
fn long_mode_cpl3(vm: &Vm, v: &VcpuFd, ip: u64) {
    let m = vm.memory();
    m.write_obj((PT + 0x1000) | 0x7, GuestAddress(PT))
        .expect("pml4");
    for i in 0..8u64 {
        let pd = PT + 0x2000 + i * 0x1000;
        m.write_obj(pd | 0x7, GuestAddress(PT + 0x1000 + i * 8))
            .expect("pdpt");
        for j in 0..512u64 {
            m.write_obj((((i << 9) + j) << 21) | 0x87, GuestAddress(pd + j * 8))
                .expect("pd");
        }
    }
    let gdt: [u64; 4] = [
        0,
        0x00af_fb00_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x008f_8b00_0000_ffff,
    ];
    for (i, e) in gdt.iter().enumerate() {
        m.write_obj(*e, GuestAddress(GDT + 8 * i as u64))
            .expect("gdt");
    }
    let seg = |sel: u16, type_: u8, s: u8, dpl: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let mut s = v.get_sregs().expect("get sregs");
    s.gdt.base = GDT;
    s.gdt.limit = 31;
    s.cs = seg(0x0b, 0xb, 1, 3, 1, 0);
    let data = seg(0x13, 0x3, 1, 3, 0, 1);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = seg(0x18, 0xb, 0, 0, 0, 0);
    s.cr3 = PT;
    s.cr4 |= 1 << 5;
    s.cr0 |= 1 | (1 << 31);
    s.efer |= (1 << 8) | (1 << 10);
    v.set_sregs(&s)
        .expect("set long-mode sregs (CPUID must be set first)");
    let mut r = v.get_regs().expect("get regs");
    r.rip = ip;
    r.rflags = 2 | (3 << 12);
    r.rsp = 0x7000;
    v.set_regs(&r).expect("set regs");
}

fn load(vm: &Vm, at: u64, code: &[u8]) {
    vm.memory()
        .write_slice(code, GuestAddress(at))
        .expect("load code");
}

/// `mov al, 0x34; mov dx, 0x3c0; out dx, al` in 16-bit code: S5 through the ACPI sleep control register.
const POWEROFF16: [u8; 6] = [0xb0, 0x34, 0xba, 0xc0, 0x03, 0xee];
/// The same in 64-bit code (operand-size prefix on the 16-bit move).
const POWEROFF64: [u8; 7] = [0xb0, 0x34, 0x66, 0xba, 0xc0, 0x03, 0xee];

#[test]
fn serial_output_then_acpi_poweroff() {
    let (vm, console) = new_vm(1, 64 << 20);
    let mut code = vec![
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
        0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
        0xb0, b'\n', 0xee,
    ];
    code.extend_from_slice(&POWEROFF16);
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    load(&vm, 0x1000, &code);
    real_mode(&vm.vcpus()[0], 0x1000, false);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::PowerOff));
    assert_eq!(console.text(), "OK\n");
}

#[test]
fn serial_input_reaches_the_guest() {
    let (vm, console) = new_vm(1, 64 << 20);
    let mut code = vec![
        0xba, 0xfd, 0x03, // mov dx, 0x3fd (LSR)
        0xec, // wait: in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xfb, // jz wait
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al (echo)
        0xec, 0xee, // and the second byte
    ];
    code.extend_from_slice(&POWEROFF16);
    code.extend_from_slice(&[0xeb, 0xfe]);
    load(&vm, 0x1000, &code);
    real_mode(&vm.vcpus()[0], 0x1000, false);
    assert_eq!(vm.devices().serial_input(b"ok"), 2);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::PowerOff));
    assert_eq!(console.text(), "ok");
}

#[test]
fn i8042_reset_is_reported_as_reset() {
    let (vm, _) = new_vm(1, 64 << 20);
    // mov al, 0xfe; out 0x64, al
    load(&vm, 0x1000, &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe]);
    real_mode(&vm.vcpus()[0], 0x1000, false);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::Reset));
}

#[test]
fn a_jump_to_the_reset_vector_is_a_reset() {
    let (vm, _) = new_vm(1, 64 << 20);
    vmm::boot::write_reset_vector(vm.memory()).expect("reset stub");
    load(&vm, 0x1000, &[0xea, 0xf0, 0xff, 0x00, 0xf0]); // jmp 0xf000:0xfff0
    real_mode(&vm.vcpus()[0], 0x1000, false);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::Reset));
}

/// (BAR, offset, bytes) of one guest write.
type BarWrite = (u8, u64, Vec<u8>);

/// A PCI device with one 4 KiB memory BAR that records the guest's writes.
/// The BAR writes a [`Recorder`] saw.
type BarWrites = Arc<Mutex<Vec<BarWrite>>>;

struct Recorder {
    config: PciConfig,
    writes: BarWrites,
}

impl PciDevice for Recorder {
    fn name(&self) -> String {
        "recorder".into()
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
    fn read_bar(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        // Reads return the offset, so the guest can check it reached the right register.
        for (i, d) in data.iter_mut().enumerate() {
            *d = (offset as u8).wrapping_add(i as u8);
        }
    }
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if let Ok(mut w) = self.writes.lock() {
            w.push((bar, offset, data.to_vec()));
        }
    }
}

/// Plugs a [`Recorder`] with one 4 KiB 32-bit BAR (1234:5678) into `vm`'s bus; returns it, its record of
/// BAR writes and its slot.
fn plug_recorder(vm: &Vm) -> (Arc<Mutex<Recorder>>, BarWrites, PciSlot) {
    let writes = Arc::new(Mutex::new(Vec::new()));
    let mut config = PciConfig::new(0x1234, 0x5678, 0xff, 0, 0);
    assert!(config.add_bar(
        0,
        PciBarDef {
            size: 0x1000,
            kind: BarKind::Mem32 {
                prefetchable: false
            }
        }
    ));
    let dev = Arc::new(Mutex::new(Recorder {
        config,
        writes: writes.clone(),
    }));
    let slot = vm
        .devices()
        .pci()
        .add_device(None, dev.clone())
        .expect("plug");
    (dev, writes, slot)
}

#[test]
fn pci_config_via_ports_and_ecam_and_bar_mmio_from_a_cpl3_guest() {
    let (vm, _) = new_vm(1, 64 << 20);
    let (dev, writes, slot) = plug_recorder(&vm);
    assert_eq!(slot.0, 1);
    let bar = dev.lock().map(|d| d.bars()[0].base).unwrap_or(0);
    assert_ne!(bar, 0, "the bus placed BAR0");

    let mut code = vec![
        0xb8, 0x00, 0x00, 0x00, 0x80, // mov eax, 0x80000000 (00:00.0 reg 0)
        0x66, 0xba, 0xf8, 0x0c, // mov dx, 0xcf8
        0xef, // out dx, eax
        0x66, 0xba, 0xfc, 0x0c, // mov dx, 0xcfc
        0xed, // in eax, dx
        0x89, 0x04, 0x25, 0x00, 0x20, 0x00, 0x00, // mov [0x2000], eax
        0x48, 0xbb, // mov rbx, ECAM + 00:01.0
    ];
    code.extend_from_slice(&(ECAM_START + (1 << 15)).to_le_bytes());
    code.extend_from_slice(&[
        0x8b, 0x03, // mov eax, [rbx]
        0x89, 0x04, 0x25, 0x04, 0x20, 0x00, 0x00, // mov [0x2004], eax
        0x48, 0xbb, // mov rbx, BAR0
    ]);
    code.extend_from_slice(&bar.to_le_bytes());
    code.extend_from_slice(&[
        0xc7, 0x43, 0x10, 0xef, 0xbe, 0xad, 0xde, // mov dword [rbx+0x10], 0xdeadbeef
        0x8b, 0x43, 0x20, // mov eax, [rbx+0x20]
        0x89, 0x04, 0x25, 0x08, 0x20, 0x00, 0x00, // mov [0x2008], eax
    ]);
    code.extend_from_slice(&POWEROFF64);
    code.extend_from_slice(&[0xeb, 0xfe]);
    load(&vm, 0x1000, &code);
    long_mode_cpl3(&vm, &vm.vcpus()[0], 0x1000);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    let m = running.memory();
    let host_bridge_id: u32 = m.read_obj(GuestAddress(0x2000)).unwrap_or(0);
    let dev_id: u32 = m.read_obj(GuestAddress(0x2004)).unwrap_or(0);
    let bar_read: u32 = m.read_obj(GuestAddress(0x2008)).unwrap_or(0);
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::PowerOff));
    assert_eq!(host_bridge_id, 0x0d57_8086, "0xCF8/0xCFC read of 00:00.0");
    assert_eq!(dev_id, 0x5678_1234, "ECAM read of 00:01.0");
    assert_eq!(bar_read, 0x2322_2120, "BAR read reached offset 0x20");
    let w = writes.lock().map(|w| w.clone()).unwrap_or_default();
    assert_eq!(w, vec![(0, 0x10, 0xdead_beefu32.to_le_bytes().to_vec())]);
}

#[test]
fn a_guest_moves_a_bar_through_ecam_and_the_bus_follows() {
    let (vm, _) = new_vm(1, 64 << 20);
    let (dev, writes, _) = plug_recorder(&vm);
    let old = dev.lock().map(|d| d.bars()[0].base).unwrap_or(0);
    let new: u32 = 0xd000_0000;
    assert_ne!(u64::from(new), old);
    let mut code = vec![0x48, 0xbb]; // mov rbx, ECAM + 00:01.0 BAR0
    code.extend_from_slice(&(ECAM_START + (1 << 15) + 0x10).to_le_bytes());
    code.extend_from_slice(&[0xc7, 0x03]); // mov dword [rbx], new
    code.extend_from_slice(&new.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, new
    code.extend_from_slice(&u64::from(new).to_le_bytes());
    code.extend_from_slice(&[0xc7, 0x43, 0x10, 0x0d, 0xd0, 0xfe, 0xca]); // mov dword [rbx+0x10], 0xcafed00d
    code.extend_from_slice(&POWEROFF64);
    code.extend_from_slice(&[0xeb, 0xfe]);
    load(&vm, 0x1000, &code);
    long_mode_cpl3(&vm, &vm.vcpus()[0], 0x1000);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    let pci = running.devices().pci().clone();
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::PowerOff));
    assert_eq!(
        dev.lock().map(|d| d.bars()[0].base).unwrap_or(0),
        u64::from(new)
    );
    let w = writes.lock().map(|w| w.clone()).unwrap_or_default();
    assert_eq!(
        w,
        vec![(0, 0x10, 0xcafe_d00du32.to_le_bytes().to_vec())],
        "the write reached the moved BAR"
    );
    let mut v = [0u8; 4];
    assert!(
        !pci.mmio_read(old, &mut v),
        "the old range no longer routes to the device"
    );
}

#[test]
fn memory_slots_above_4g_are_guest_ram() {
    // 3 GiB + 64 MiB: the last 64 MiB live in the second slot at 4 GiB.
    let (vm, _) = new_vm(1, (3 << 30) + (64 << 20));
    let target = HIGH_RAM_4G + 0x1000;
    let mut code = vec![0x48, 0xbb]; // mov rbx, target
    code.extend_from_slice(&target.to_le_bytes());
    code.extend_from_slice(&[
        0xc7, 0x03, 0x78, 0x56, 0x34, 0x12, // mov dword [rbx], 0x12345678
        0x8b, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, // mov eax, [0x3000]
        0x89, 0x43, 0x04, // mov [rbx+4], eax
    ]);
    code.extend_from_slice(&POWEROFF64);
    code.extend_from_slice(&[0xeb, 0xfe]);
    load(&vm, 0x1000, &code);
    vm.memory()
        .write_obj(0xcafe_f00du32, GuestAddress(0x3000))
        .expect("seed");
    long_mode_cpl3(&vm, &vm.vcpus()[0], 0x1000);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    let a: u32 = running.memory().read_obj(GuestAddress(target)).unwrap_or(0);
    let b: u32 = running
        .memory()
        .read_obj(GuestAddress(target + 4))
        .unwrap_or(0);
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::PowerOff));
    assert_eq!((a, b), (0x1234_5678, 0xcafe_f00d));
}

#[test]
fn several_vcpus_run_and_halted_ones_are_stopped_cleanly() {
    const N: u8 = 4;
    let (vm, console) = new_vm(N, 64 << 20);
    // APs: mov dx,0x3f8; mov al,'h'; out dx,al; lock inc word [0x3000]; hlt; jmp $-1
    // (print first, then count: the BSP's '!' comes after every 'h').
    load(
        &vm,
        0x1100,
        &[
            0xba, 0xf8, 0x03, 0xb0, b'h', 0xee, 0xf0, 0xff, 0x06, 0x00, 0x30, 0xf4, 0xeb, 0xfd,
        ],
    );
    // BSP: lock inc word [0x3000]; wait until it reads N; print '!'; power off.
    let mut bsp = vec![
        0xf0, 0xff, 0x06, 0x00, 0x30, 0x83, 0x3e, 0x00, 0x30, N, 0x75, 0xf9,
    ];
    bsp.extend_from_slice(&[0xba, 0xf8, 0x03, 0xb0, b'!', 0xee]);
    bsp.extend_from_slice(&POWEROFF16);
    bsp.extend_from_slice(&[0xeb, 0xfe]);
    load(&vm, 0x1000, &bsp);
    for (i, v) in vm.vcpus().iter().enumerate() {
        real_mode(v, if i == 0 { 0x1000 } else { 0x1100 }, i != 0);
    }
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    let count: u16 = running.memory().read_obj(GuestAddress(0x3000)).unwrap_or(0);
    // vCPU 0 returned; the APs sit in `hlt`, blocked inside KVM (in-kernel irqchip).
    std::thread::sleep(Duration::from_millis(50));
    let still_running = running.running_vcpus();
    running
        .stop(TIMEOUT)
        .expect("halted vCPUs are kicked out of KVM_RUN and joined");
    assert_eq!(exit, Some(VmExit::PowerOff));
    assert_eq!(count, u16::from(N));
    assert_eq!(
        still_running,
        usize::from(N - 1),
        "the halted APs were still in KVM_RUN"
    );
    let text = console.text();
    assert_eq!(text.matches('h').count(), usize::from(N - 1));
    assert!(text.ends_with('!'), "{text:?}");
}

#[test]
fn msi_routes_and_irqfds_are_accepted_by_kvm() {
    let (vm, _) = new_vm(1, 64 << 20);
    let r = vm.gsi_router();
    let (gsi, fd) = r.allocate().expect("allocate an MSI GSI");
    assert!(gsi >= vmm::layout::IOAPIC_PINS);
    r.set_msi(gsi, 0xfee0_0000, 0x4041, false)
        .expect("KVM accepts an MSI route");
    let (gsi2, _fd2) = r.allocate().expect("second vector");
    assert_ne!(gsi, gsi2);
    r.set_msi(gsi2, 0xfee0_1000, 0x41, true)
        .expect("masked vector");
    assert!(fd.write(1).is_ok(), "signalling the irqfd works");
    r.release(gsi).expect("release");
    assert!(
        r.set_msi(gsi, 0xfee0_0000, 0x41, false).is_err(),
        "a released GSI is unknown"
    );
    assert_eq!(r.msi_count(), 1);
}

#[test]
fn hugepages_on_is_a_clear_error_or_works() {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let free: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("HugePages_Free:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let r = memory::create(64 << 20, Backing::HugeTlb);
    if free >= 32 {
        assert!(r.is_ok(), "{:?}", r.err());
    } else {
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("nr_hugepages") && msg.contains("hugepages=off"),
            "{msg}"
        );
    }
}

/// A CPL3 program for the edu at `slot` with BAR 0 at `bar`: bus mastering on (through ECAM), DMA of 64
/// bytes from guest RAM 0x3000 into the device's buffer, the command register read back into 0x2000, DMA
/// of the buffer out to 0x5000, the identification register into 0x2008, the liveness check into 0x200c,
/// then power-off.
fn edu_program(slot: PciSlot, bar: u64) -> Vec<u8> {
    // mov qword [rbx + off], imm32 (sign-extended; disp32, since 0x80.. do not fit a signed disp8)
    let movq = |off: u32, imm: u32| {
        let mut v = vec![0x48, 0xc7, 0x83];
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&imm.to_le_bytes());
        v
    };
    let mut code = vec![0x48, 0xbb]; // mov rbx, ECAM + slot
    code.extend_from_slice(&(ECAM_START + (u64::from(slot.0) << 15)).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xc7, 0x43, 0x04, 0x06, 0x00]); // mov word [rbx+4], 6: memory + bus master
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, BAR0
    code.extend_from_slice(&bar.to_le_bytes());
    for (off, v) in [(0x80, 0x3000), (0x88, 0x40000), (0x90, 64), (0x98, 1)] {
        code.extend(movq(off, v));
    }
    code.extend_from_slice(&[0x48, 0x8b, 0x83, 0x98, 0, 0, 0]); // mov rax, [rbx+0x98]
    code.extend_from_slice(&[0x48, 0x89, 0x04, 0x25, 0x00, 0x20, 0, 0]); // mov [0x2000], rax
    for (off, v) in [(0x80, 0x40000), (0x88, 0x5000), (0x90, 64), (0x98, 3)] {
        code.extend(movq(off, v));
    }
    code.extend_from_slice(&[0x8b, 0x03]); // mov eax, [rbx]
    code.extend_from_slice(&[0x89, 0x04, 0x25, 0x08, 0x20, 0, 0]); // mov [0x2008], eax
    code.extend_from_slice(&[0xc7, 0x43, 0x04, 0x78, 0x56, 0x34, 0x12]); // mov dword [rbx+4], 0x12345678
    code.extend_from_slice(&[0x8b, 0x43, 0x04]); // mov eax, [rbx+4]
    code.extend_from_slice(&[0x89, 0x04, 0x25, 0x0c, 0x20, 0, 0]); // mov [0x200c], eax
    code.extend_from_slice(&POWEROFF64);
    code.extend_from_slice(&[0xeb, 0xfe]);
    code
}

/// Runs [`edu_program`] on a VM with one `--edu` device, parked first when `park`; returns the 64 bytes
/// the second DMA wrote at 0x5000 (the pattern at 0x3000 when the DMA went through), the words the guest
/// stored at 0x2000.., the device's DMA stats and the soft IOMMU's fault counts.
fn run_edu(
    park: bool,
) -> (
    Vec<u8>,
    [u32; 4],
    devices::edu::EduStats,
    iommu::soft::FaultCounts,
) {
    let (vm, _) = new_vm(1, 64 << 20);
    let edu = vmm::edu::EduDevices::attach(&vm, 1).expect("edu set-up");
    let slot = edu.slots()[0];
    let dev = vm.devices().pci().device(slot).expect("edu on the bus");
    let bar = dev.lock().map(|d| d.bars()[0].base).unwrap_or(0);
    assert_ne!(bar, 0, "the bus placed BAR0");
    if park {
        edu.park(0).expect("park");
    }
    let pattern: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    vm.memory()
        .write_slice(&pattern, GuestAddress(0x3000))
        .expect("pattern");
    load(&vm, 0x1000, &edu_program(slot, bar));
    long_mode_cpl3(&vm, &vm.vcpus()[0], 0x1000);
    let running = vm.start().expect("start");
    let exit = running.wait_exit(TIMEOUT);
    let m = running.memory();
    let mut out = vec![0u8; 64];
    m.read_slice(&mut out, GuestAddress(0x5000)).expect("read");
    let words = [0x2000u64, 0x2004, 0x2008, 0x200c]
        .map(|a| m.read_obj::<u32>(GuestAddress(a)).unwrap_or(0));
    running.stop(TIMEOUT).expect("vCPUs stop");
    assert_eq!(exit, Some(VmExit::PowerOff));
    let (stats, faults) = (edu.stats()[0], edu.faults());
    (out, words, stats, faults)
}

#[test]
fn edu_dma_from_a_guest_goes_through_the_soft_iommu() {
    let (out, words, stats, faults) = run_edu(false);
    let pattern: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    assert_eq!(out, pattern, "RAM -> edu -> RAM round trip");
    assert_eq!(words[0], 0, "the command's start bit reads back clear");
    assert_eq!(words[2], 0x0100_00ed, "identification");
    assert_eq!(words[3], !0x1234_5678u32, "liveness");
    assert_eq!((stats.transfers, stats.bytes, stats.refused), (2, 128, 0));
    assert_eq!(faults.total, 0);
}

#[test]
fn a_parked_edu_reaches_no_memory_from_a_guest() {
    let (out, words, stats, faults) = run_edu(true);
    assert_eq!(out, vec![0u8; 64], "nothing written while parked");
    assert_eq!(words[2], 0x0100_00ed, "its registers still answer");
    assert_eq!((stats.transfers, stats.refused, stats.faults), (0, 2, 2));
    assert_eq!((faults.total, faults.blocked), (2, 2));
}
