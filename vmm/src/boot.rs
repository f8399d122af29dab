//! x86-64 Linux boot (the 64-bit boot protocol, Documentation/arch/x86/boot.rst): loads a bzImage and an
//! initramfs into guest memory, writes the command line, the zero page with its e820 map, the boot GDT and
//! an identity map of the first 4 GiB. The vCPU module sets the registers from [`BootInfo`].

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::boot_params;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::memory::{ram_ranges, GuestMemory};

/// What vCPU 0 needs to start the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// 64-bit entry point (startup_64: load address + 0x200).
    pub entry: u64,
    /// Address of the zero page, passed in RSI.
    pub zero_page: u64,
}

/// Errors of loading a guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel is not a bzImage we can boot.
    #[error(
        "{path} is not a bootable x86-64 bzImage ({reason}): pass the vmlinuz of a Linux kernel"
    )]
    NotBzImage {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The initramfs does not fit in RAM under the kernel's limit.
    #[error("initramfs {path} ({size} bytes) does not fit in guest RAM below {limit:#x}: give the guest more memory")]
    InitramfsTooBig {
        /// Path.
        path: PathBuf,
        /// Size.
        size: u64,
        /// Highest usable address.
        limit: u64,
    },
    /// Reading the initramfs failed.
    #[error("cannot read initramfs {path}: {reason}")]
    ReadInitramfs {
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The command line is not acceptable.
    #[error(
        "kernel command line rejected: {0} (at most {CMDLINE_MAX_SIZE} bytes of printable ASCII)"
    )]
    Cmdline(String),
    /// Writing boot structures into guest memory failed (an internal error: the layout is fixed).
    #[error("cannot write boot {what} into guest memory: {reason}")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1 << 0;
const MIN_PROTOCOL: u16 = 0x020c; // xloadflags and the 64-bit entry

fn gwrite<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    what: &'static str,
    v: T,
    at: u64,
) -> Result<(), Error> {
    mem.write_obj(v, GuestAddress(at))
        .map_err(|e| Error::GuestWrite {
            what,
            reason: e.to_string(),
        })
}

/// A GDT entry from flags (access byte in bits 0..8, flags nibble in 12..16), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// The boot GDT: null, null, __BOOT_CS (0x10), __BOOT_DS (0x18), TSS (0x20), as the boot protocol asks.
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // code: 64-bit, present, execute/read, 4 KiB granularity
    0x00cf_9300_0000_ffff, // data: present, read/write, 32-bit, 4 KiB granularity
    0x008f_8b00_0000_ffff, // busy 64-bit TSS
];

/// The reset-vector stub: `mov al, 1; mov dx, ACPI_POWER_PORT; out dx, al; hlt; jmp $-1` (the ACPI
/// reset value to the reset register, which the VMM turns into a reset exit).
pub const RESET_STUB: [u8; 10] = [0xb0, 0x01, 0xba, 0xc0, 0x03, 0xee, 0xf4, 0xeb, 0xfd, 0x90];

/// Writes [`RESET_STUB`] at [`RESET_VECTOR`].
pub fn write_reset_vector(mem: &GuestMemory) -> Result<(), Error> {
    const _: () = assert!(ACPI_POWER_PORT == 0x3c0 && devices::power::RESET_VALUE == 1);
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(|e| Error::GuestWrite {
            what: "reset vector",
            reason: e.to_string(),
        })
}

/// Writes the boot GDT, an empty IDT and page tables identity-mapping 0..4 GiB with 2 MiB pages.
pub fn write_gdt_and_page_tables(mem: &GuestMemory) -> Result<(), Error> {
    for (i, e) in BOOT_GDT.iter().enumerate() {
        gwrite(mem, "GDT", *e, GDT_START + 8 * i as u64)?;
    }
    gwrite(mem, "IDT", 0u64, IDT_START)?;
    gwrite(mem, "PML4", PDPTE_START | 0x3, PML4_START)?;
    for i in 0..4u64 {
        let pd = PDE_START + i * 0x1000;
        gwrite(mem, "PDPT", pd | 0x3, PDPTE_START + i * 8)?;
        for j in 0..512u64 {
            gwrite(mem, "PD", (((i << 9) + j) << 21) | 0x83, pd + j * 8)?;
        }
    }
    Ok(())
}

/// The e820 map for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, ACPI_END - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem_size) {
        if start.0 == 0 {
            v.push((HIGH_RAM_START, len - HIGH_RAM_START, E820_RAM));
        } else {
            v.push((start.0, len, E820_RAM));
        }
    }
    v.push((ECAM_START, ECAM_SIZE, E820_RESERVED));
    v.sort_unstable();
    v
}

/// The command line the guest gets: the user's, plus `reboot=acpi` unless it already says `reboot=`.
///
/// Why: on a hardware-reduced ACPI platform without DMI, Linux assumes EFI and picks EFI reboot, which
/// without EFI falls through to jumping into a BIOS that does not exist. `reboot=acpi` makes it write the
/// FADT reset register, which the VMM turns into a reset (and the reset-vector stub catches the rest).
pub fn guest_cmdline(user: &str) -> String {
    let words: Vec<&str> = user.split_whitespace().collect();
    // Everything after a standalone "--" is for init, not the kernel.
    let split = words.iter().position(|w| *w == "--").unwrap_or(words.len());
    let (kernel, init) = words.split_at(split);
    if kernel.iter().any(|w| w.starts_with("reboot=")) {
        return words.join(" ");
    }
    let mut out: Vec<&str> = kernel.to_vec();
    out.push("reboot=acpi");
    out.extend_from_slice(init);
    out.join(" ")
}

/// Loads `kernel` (a bzImage), `initramfs` and `cmdline` into `mem`, writes the zero page and boot tables.
pub fn load_linux(
    mem: &GuestMemory,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<BootInfo, Error> {
    let mem_size: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    let not_bz = |reason: String| Error::NotBzImage {
        path: kernel.to_owned(),
        reason,
    };
    let mut kf = File::open(kernel).map_err(|source| Error::Open {
        what: "kernel",
        path: kernel.into(),
        source,
    })?;
    let loaded = BzImage::load(mem, None, &mut kf, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(|e| not_bz(e.to_string()))?;
    let header = loaded
        .setup_header
        .ok_or_else(|| not_bz("no setup header".into()))?;
    let version = header.version;
    let xloadflags = header.xloadflags;
    if version < MIN_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not_bz(format!(
            "boot protocol {}.{:02} without the 64-bit entry; 2.12 with XLF_KERNEL_64 is needed",
            version >> 8,
            version & 0xff
        )));
    }
    log::info!(
        "kernel {}: boot protocol {}.{:02}, loaded at {:#x}..{:#x}",
        kernel.display(),
        version >> 8,
        version & 0xff,
        loaded.kernel_load.0,
        loaded.kernel_end
    );

    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.loadflags |= 0x80; // CAN_USE_HEAP
    params.hdr.heap_end_ptr = 0xfe00;

    // Command line.
    let cmdline = guest_cmdline(cmdline);
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    cl.insert_str(&cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    // Initramfs: as high as the kernel allows in RAM below 3 GiB, page aligned.
    if let Some(path) = initramfs {
        let mut f = File::open(path).map_err(|source| Error::Open {
            what: "initramfs",
            path: path.into(),
            source,
        })?;
        let size = f
            .metadata()
            .map_err(|e| Error::ReadInitramfs {
                path: path.into(),
                reason: e.to_string(),
            })?
            .len();
        let low_end = mem_size.min(LOW_RAM_END);
        let max = u64::from(params.hdr.initrd_addr_max).min(low_end - 1);
        let too_big = || Error::InitramfsTooBig {
            path: path.into(),
            size,
            limit: max,
        };
        let addr = (max + 1).checked_sub(size).ok_or_else(too_big)? & !0xfff;
        // The decompressed kernel needs init_size bytes from its preferred address (16 MiB unless the
        // header says otherwise); the initramfs must stay above that and above the loaded image.
        let pref = match params.hdr.pref_address {
            0 => 0x100_0000,
            p => p,
        };
        let kernel_top = pref.saturating_add(u64::from(params.hdr.init_size));
        if addr < loaded.kernel_end.max(kernel_top) {
            return Err(too_big());
        }
        mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
            .map_err(|e| Error::ReadInitramfs {
                path: path.into(),
                reason: e.to_string(),
            })?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        log::info!("initramfs {}: {size} bytes at {addr:#x}", path.display());
    }

    // e820.
    let map = e820_map(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *type_;
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = RSDP_START;

    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| Error::GuestWrite {
        what: "zero page",
        reason: e.to_string(),
    })?;
    write_gdt_and_page_tables(mem)?;
    write_reset_vector(mem)?;
    let entry = loaded
        .kernel_load
        .checked_add(0x200)
        .map(|a| a.raw_value())
        .unwrap_or(0);
    Ok(BootInfo {
        entry,
        zero_page: ZERO_PAGE_START,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create, Backing};

    #[test]
    fn e820_has_no_ram_in_holes() {
        let m = e820_map(512 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert!(m.contains(&(HIGH_RAM_START, (512 << 20) - HIGH_RAM_START, E820_RAM)));
        assert!(m.contains(&(ECAM_START, ECAM_SIZE, E820_RESERVED)));
        let big = e820_map(4 << 30);
        assert!(big.contains(&(HIGH_RAM_4G, (4 << 30) - LOW_RAM_END, E820_RAM)));
    }

    #[test]
    fn reboot_acpi_is_added_unless_given() {
        assert_eq!(guest_cmdline("console=ttyS0"), "console=ttyS0 reboot=acpi");
        assert_eq!(guest_cmdline(""), "reboot=acpi");
        assert_eq!(guest_cmdline("reboot=k quiet"), "reboot=k quiet");
        assert_eq!(
            guest_cmdline("console=ttyS0 rdinit=/bin/busybox -- sh -c 'x'"),
            "console=ttyS0 rdinit=/bin/busybox reboot=acpi -- sh -c 'x'",
            "init's arguments stay last"
        );
        assert_eq!(
            guest_cmdline("quiet -- reboot=x"),
            "quiet reboot=acpi -- reboot=x"
        );
    }

    #[test]
    fn reset_vector_stub_is_written() {
        let mem = create(64 << 20, Backing::Anonymous { thp: false }).unwrap_or_default();
        assert!(write_reset_vector(&mem).is_ok());
        let mut b = [0u8; 10];
        assert!(mem.read_slice(&mut b, GuestAddress(RESET_VECTOR)).is_ok());
        assert_eq!(b, RESET_STUB);
    }

    #[test]
    fn gdt_entries_decode() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), BOOT_GDT[2]);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), BOOT_GDT[3]);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), BOOT_GDT[4]);
    }

    #[test]
    fn non_bzimage_and_missing_files_are_clear_errors() {
        let mem = create(64 << 20, Backing::Anonymous { thp: false }).unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("iovmm-boot-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let junk = dir.join("junk");
        assert!(std::fs::write(&junk, vec![0u8; 8192]).is_ok());
        let e = load_linux(&mem, &junk, None, "console=ttyS0");
        assert!(matches!(e, Err(Error::NotBzImage { .. })), "{e:?}");
        let e = load_linux(&mem, &dir.join("absent"), None, "");
        assert!(
            matches!(e, Err(Error::Open { what: "kernel", .. })),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
