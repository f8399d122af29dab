//! The guest physical address map (x86-64), one place for every fixed address the VMM uses.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA          (RAM)
//! 0x0000_0500  GDT, then IDT                (RAM, boot only)
//! 0x0000_7000  zero page (boot_params)      (RAM)
//! 0x0000_8ff0  boot stack top               (RAM)
//! 0x0000_9000  PML4, PDPT, 4 PDs (4 GiB identity map with 2 MiB pages)
//! 0x0002_0000  kernel command line          (RAM)
//! 0x0009_fc00  EBDA .. 0x10_0000            (reserved: RSDP at 0xe_0000 and the ACPI tables)
//! 0x0010_0000  kernel (code32_start), then RAM up to min(size, 3 GiB)
//! 0xc000_0000  32-bit PCI MMIO window       (512 MiB)
//! 0xe000_0000  ECAM (bus 0 only: 1 MiB)
//! 0xfec0_0000  IOAPIC; 0xfee0_0000 LAPIC
//! 0x1_0000_0000  RAM above 3 GiB of the guest's size continues here
//! 0x40_0000_0000 (256 GiB)  64-bit PCI MMIO window (64 GiB), ending below 2^39 so that every x86-64
//!                            CPU can address it (Linux ignores windows beyond the CPU's physical bits)
//! ```

/// GDT address.
pub const GDT_START: u64 = 0x500;
/// IDT address (empty IDT; the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// The zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// First of 4 page directories of the boot page tables.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length including the NUL (as the boot protocol of Linux >= 2.6.22 allows).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The RSDP (found by Linux's scan of 0xe0000..0x100000, and passed in boot_params too).
pub const RSDP_START: u64 = 0xe0000;
/// End of the reserved area below 1 MiB.
pub const ACPI_END: u64 = 0x100000;
/// The x86 reset vector (0xf000:0xfff0). There is no BIOS: a stub here asks the VMM for a reset, so a
/// guest that jumps to it (Linux's `reboot=bios` path, taken when every other method failed) ends the VM
/// instead of running through zeros forever.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Where high memory (the kernel) starts.
pub const HIGH_RAM_START: u64 = 0x100000;
/// End of RAM below 4 GiB (the rest of the guest's RAM goes above 4 GiB).
pub const LOW_RAM_END: u64 = 0xc000_0000;
/// 32-bit PCI MMIO window.
pub const MMIO32_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// ECAM base (PCI segment 0).
pub const ECAM_START: u64 = 0xe000_0000;
/// ECAM size: bus 0 only.
pub const ECAM_SIZE: u64 = 1 << 20;
/// IOAPIC base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Start of RAM above 4 GiB.
pub const HIGH_RAM_4G: u64 = 0x1_0000_0000;
/// 64-bit PCI MMIO window start (256 GiB; the window ends at 320 GiB, below 2^39).
pub const MMIO64_START: u64 = 0x40_0000_0000;
/// Size of the 64-bit PCI MMIO window.
pub const MMIO64_SIZE: u64 = 64 << 30;
/// PCI I/O port window for I/O BARs.
pub const PCI_IO_START: u64 = 0x1000;
/// Size of the PCI I/O port window.
pub const PCI_IO_SIZE: u64 = 0xf000;
/// Largest guest RAM this layout allows (RAM above 4 GiB must stay below the 64-bit window).
pub const MAX_RAM: u64 = MMIO64_START - HIGH_RAM_4G + LOW_RAM_END;

/// Legacy COM1 ports and IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ (IOAPIC pin / GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;
/// The ACPI sleep control / reset register (FADT SLEEP_CONTROL_REG and RESET_REG).
pub const ACPI_POWER_PORT: u16 = 0x3c0;
/// Number of IOAPIC pins; MSI GSIs start here.
pub const IOAPIC_PINS: u32 = 24;

// The layout's invariants, checked at compile time.
const _: () = {
    // The 64-bit window is addressable by every x86-64 CPU (39 physical address bits or more).
    assert!(MMIO64_START + MMIO64_SIZE <= 1 << 39);
    // RAM above 4 GiB stays below the 64-bit window.
    assert!(HIGH_RAM_4G + (MAX_RAM - LOW_RAM_END) <= MMIO64_START);
    assert!(MMIO32_START + MMIO32_SIZE <= ECAM_START);
    assert!(ECAM_START + ECAM_SIZE <= IOAPIC_START);
    assert!(RSDP_START >= EBDA_START && ACPI_END == HIGH_RAM_START);
    assert!(RSDP_START < RESET_VECTOR && RESET_VECTOR + 16 == ACPI_END);
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
};
