//! vCPUs: CPUID (from KVM's supported set, patched per vCPU), MSRs (those KVM refuses are logged and
//! skipped), the 64-bit boot registers, the local APIC's LINT pins, and the run loop that hands port and
//! MMIO exits to the device wiring.
//!
//! Order matters: CPUID is set before the long-mode sregs (nested KVM refuses EFER.LMA without long mode in
//! CPUID), then MSRs, registers, sregs, FPU and LAPIC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::boot::{BootInfo, BOOT_GDT};
use crate::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, PML4_START};

/// Errors of vCPU set-up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which call.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Building the MSR list failed.
    #[error("vCPU {0}: cannot build the MSR list")]
    MsrList(u8),
}

/// What a vCPU exit handed to the devices asks the VMM to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (reboot, or a triple fault).
    Reset,
    /// Something went wrong; the message says what.
    Error(String),
    /// The VMM itself was asked to stop by this signal (SIGTERM, SIGINT, SIGHUP).
    Terminated(i32),
}

/// The device side of vCPU exits (implemented by the device wiring). Returning `Some` stops the VM.
pub trait ExitHandler: Send + Sync {
    /// `in` from `port`.
    fn pio_read(&self, port: u16, data: &mut [u8]) -> Option<VmExit>;
    /// `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]) -> Option<VmExit>;
    /// Read from an address with no memory slot.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Option<VmExit>;
    /// Write to an address with no memory slot.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<VmExit>;
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// The MSRs set at boot: (index, value).
pub const BOOT_MSRS: [(u32, u64); 11] = [
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_CSTAR, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_LSTAR, 0),
    (MSR_IA32_TSC, 0),
    (MSR_IA32_MISC_ENABLE, 1),          // fast strings
    (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
];

/// CPUID for vCPU `id` of `count`: KVM's supported set with the APIC id, the logical processor count
/// and the hypervisor bit filled in.
pub fn cpuid_for(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count field is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    fill_brand_string(&mut c);
    c
}

/// The processor brand string shown when KVM passes none (nested KVM under emulation reports zeros,
/// and Linux's /proc/cpuinfo then says "model name: 06/06").
pub const BRAND: &[u8; 48] =
    b"iovmm virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

fn fill_brand_string(c: &mut CpuId) {
    let max_ext = c
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0000)
        .map(|e| e.eax)
        .unwrap_or(0);
    if max_ext < 0x8000_0004 {
        return;
    }
    let leaves = [0x8000_0002u32, 0x8000_0003, 0x8000_0004];
    let has_brand = c
        .as_slice()
        .iter()
        .any(|e| leaves.contains(&e.function) && (e.eax | e.ebx | e.ecx | e.edx) != 0);
    if has_brand {
        return;
    }
    for (i, leaf) in leaves.iter().enumerate() {
        let w = |k: usize| {
            let o = i * 16 + k * 4;
            u32::from_le_bytes([BRAND[o], BRAND[o + 1], BRAND[o + 2], BRAND[o + 3]])
        };
        let regs = (w(0), w(1), w(2), w(3));
        if let Some(e) = c.as_mut_slice().iter_mut().find(|e| e.function == *leaf) {
            (e.eax, e.ebx, e.ecx, e.edx) = regs;
        } else {
            let e = kvm_bindings::kvm_cpuid_entry2 {
                function: *leaf,
                eax: regs.0,
                ebx: regs.1,
                ecx: regs.2,
                edx: regs.3,
                ..Default::default()
            };
            if c.push(e).is_err() {
                log::debug!("no room for CPUID leaf {leaf:#x}; no brand string");
            }
        }
    }
}

/// Sets `msrs` on `vcpu` one run at a time; MSRs KVM refuses are logged and skipped. Returns how many were set.
pub fn set_msrs_lenient(vcpu: &VcpuFd, id: u8, msrs: &[(u32, u64)]) -> Result<usize, Error> {
    let mut rest: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let mut set = 0;
    while !rest.is_empty() {
        let list = Msrs::from_entries(&rest).map_err(|_| Error::MsrList(id))?;
        let n = vcpu.set_msrs(&list).map_err(|source| Error::Kvm {
            id,
            what: "KVM_SET_MSRS",
            source,
        })?;
        set += n;
        if n < rest.len() {
            log::warn!("vCPU {id}: KVM refused MSR {:#x}; skipped", rest[n].index);
            rest.drain(..=n);
        } else {
            break;
        }
    }
    Ok(set)
}

fn segment(index: u16) -> kvm_segment {
    let e = BOOT_GDT[usize::from(index)];
    let flags = (e >> 52) & 0xf;
    let access = (e >> 40) & 0xff;
    let limit = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: 0,
        limit: if flags & 0x8 != 0 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: index * 8,
        type_: (access & 0xf) as u8,
        present: ((access >> 7) & 1) as u8,
        dpl: ((access >> 5) & 3) as u8,
        db: ((flags >> 2) & 1) as u8,
        s: ((access >> 4) & 1) as u8,
        l: ((flags >> 1) & 1) as u8,
        g: ((flags >> 3) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets CPUID and the boot MSRs (every vCPU), then for vCPU 0 the 64-bit registers that enter the kernel.
pub fn configure(
    vcpu: &VcpuFd,
    id: u8,
    cpuid: &CpuId,
    boot: Option<&BootInfo>,
) -> Result<(), Error> {
    let k = |what| move |source| Error::Kvm { id, what, source };
    vcpu.set_cpuid2(cpuid).map_err(k("KVM_SET_CPUID2"))?;
    set_msrs_lenient(vcpu, id, &BOOT_MSRS)?;
    if let Some(boot) = boot {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: boot.entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot.zero_page,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(k("KVM_SET_REGS"))?;
        let mut sregs = vcpu.get_sregs().map_err(k("KVM_GET_SREGS"))?;
        sregs.gdt.base = GDT_START;
        sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = IDT_START;
        sregs.idt.limit = 7;
        sregs.cs = segment(2);
        let data = segment(3);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = segment(4);
        sregs.cr3 = PML4_START;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.cr0 |= (1 << 0) | (1 << 31); // PE, PG
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        vcpu.set_sregs(&sregs).map_err(k("KVM_SET_SREGS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(k("KVM_SET_FPU"))?;
    }
    set_lint(vcpu, id)
}

/// LINT0 = ExtINT, LINT1 = NMI, as a BIOS leaves them (Linux relies on it for the NMI watchdog and the
/// legacy PIC path).
fn set_lint(vcpu: &VcpuFd, id: u8) -> Result<(), Error> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    let mut lapic = vcpu.get_lapic().map_err(|source| Error::Kvm {
        id,
        what: "KVM_GET_LAPIC",
        source,
    })?;
    for (off, mode) in [(LVT_LINT0, 7u32), (LVT_LINT1, 4u32)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(|source| Error::Kvm {
        id,
        what: "KVM_SET_LAPIC",
        source,
    })
}

/// Runs `vcpu` until the handler or KVM ends the VM, or `stop` is set (a signal kicks it out of KVM_RUN).
pub fn run_loop(
    mut vcpu: VcpuFd,
    id: u8,
    handler: Arc<dyn ExitHandler>,
    stop: Arc<AtomicBool>,
) -> Option<VmExit> {
    loop {
        if stop.load(Ordering::Acquire) {
            return None;
        }
        let exit = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => handler.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => handler.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => handler.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => handler.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => {
                log::debug!("vCPU {id}: hlt");
                None
            }
            Ok(VcpuExit::Shutdown) => {
                log::warn!("vCPU {id}: shutdown exit (triple fault or reset)");
                Some(VmExit::Reset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(VmExit::Reset),
                other => Some(VmExit::Error(format!("vCPU {id}: system event {other}"))),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Error(format!(
                "vCPU {id}: KVM entry failed (reason {reason:#x} on cpu {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => {
                Some(VmExit::Error(format!("vCPU {id}: KVM internal error")))
            }
            Ok(VcpuExit::Intr) => None,
            Ok(other) => {
                log::warn!("vCPU {id}: unhandled exit {other:?}");
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        if let Some(exit) = exit {
            return Some(exit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brand_string_is_filled_only_when_missing() {
        use kvm_bindings::kvm_cpuid_entry2;
        let ext = kvm_cpuid_entry2 {
            function: 0x8000_0000,
            eax: 0x8000_0008,
            ..Default::default()
        };
        let empty = CpuId::from_entries(&[ext]).expect("small CpuId");
        let c = cpuid_for(&empty, 0, 1);
        let mut brand = Vec::new();
        for leaf in [0x8000_0002u32, 0x8000_0003, 0x8000_0004] {
            let e = c
                .as_slice()
                .iter()
                .find(|e| e.function == leaf)
                .copied()
                .unwrap_or_default();
            for r in [e.eax, e.ebx, e.ecx, e.edx] {
                brand.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert!(brand.starts_with(b"iovmm virtual CPU\0"));
        let host = kvm_cpuid_entry2 {
            function: 0x8000_0002,
            eax: 0x4141_4141,
            ..Default::default()
        };
        let given = CpuId::from_entries(&[ext, host]).expect("small CpuId");
        let c = cpuid_for(&given, 0, 1);
        let e = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0x8000_0002)
            .copied()
            .unwrap_or_default();
        assert_eq!(e.eax, 0x4141_4141, "the host's brand string is kept");
    }

    #[test]
    fn boot_segments_are_flat_long_mode() {
        let cs = segment(2);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.g, cs.type_, cs.present, cs.s),
            (0x10, 1, 0, 1, 0xb, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(3);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (0x18, 0, 1, 0x3));
        let tr = segment(4);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x20, 0xb, 0));
    }
}
