//! ACPI tables (hardware-reduced ACPI 6.x): RSDP, XSDT, FADT, MADT, DSDT, MCFG, written into the reserved
//! area under 1 MiB. Later work adds tables (VIOT) through [`AcpiTables::extra`] and devices to the DSDT.
//!
//! Power: the FADT's SLEEP_CONTROL_REG and RESET_REG are the one I/O port [`ACPI_POWER_PORT`], and the
//! DSDT's `_S5_` gives SLP_TYP 5, so Linux's poweroff writes `(5 << 2) | SLP_EN` there and its ACPI reboot
//! writes 1 (see `devices::power`).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"IOVMM ";
const OEM_TABLE_ID: [u8; 8] = *b"IOVMMVM ";
const OEM_REVISION: u32 = 1;

/// Errors of writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tables do not fit the reserved area.
    #[error("ACPI tables ({0} bytes) do not fit below 1 MiB: fewer vCPUs or devices")]
    TooBig(u64),
    /// Writing to guest memory failed.
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Write(String),
}

/// What the tables describe.
pub struct AcpiTables {
    /// Number of vCPUs (one local APIC each, APIC id = index).
    pub cpus: u8,
    /// The 64-bit PCI MMIO window `(start, size)` the host bridge declares ([`crate::vm::Vm::mmio64_window`]).
    pub mmio64: (u64, u64),
    /// Extra tables (already complete, checksummed) to list in the XSDT.
    pub extra: Vec<Vec<u8>>,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT: the PCI host bridge (ECAM + 0xCF8, with its windows), COM1, the CMOS RTC, the ECAM
/// reservation, and `_S5_`.
pub fn dsdt(mmio64: (u64, u64)) -> Vec<u8> {
    dsdt_with(mmio64, &[])
}

/// The DSDT with `extra` AML appended to its body (e.g. `crate::hotplug::dsdt_aml`).
pub fn dsdt_with(mmio64: (u64, u64), extra: &[u8]) -> Vec<u8> {
    // Each device is built and serialised in one statement: the AML builders borrow their children.
    let mut body = Vec::new();
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::AddressSpace::new_bus_number(0x0u16, 0x0u16),
                    &aml::IO::new(0xcf8, 0xcf8, 1, 0x8),
                    &aml::AddressSpace::new_io(0x0u16, 0xcf7u16, None),
                    &aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        MMIO32_START as u32,
                        (MMIO32_START + MMIO32_SIZE - 1) as u32,
                        None,
                    ),
                    &aml::AddressSpace::new_memory(
                        aml::AddressSpaceCacheable::NotCacheable,
                        true,
                        mmio64.0,
                        mmio64.0 + mmio64.1 - 1,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // The ECAM window as a motherboard resource, so Linux trusts MCFG.
    aml::Device::new(
        "_SB_.MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    false,
                    ECAM_START as u32,
                    ECAM_SIZE as u32,
                )]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                    &aml::IO::new(COM1_PORT, COM1_PORT, 0, 0x8),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    // The CMOS RTC (devices::cmos), without an interrupt: rtc_cmos binds and reads the time.
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(0x70, 0x70, 1, 0x2)]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    body.extend_from_slice(extra);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let power = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_POWER_PORT),
    );
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.reset_reg = power;
    f.reset_value = devices::power::RESET_VALUE;
    f.sleep_control_reg = power;
    f.sleep_status_reg = power;
    bytes(&f.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for i in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes(&m)
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(ECAM_START, 0, 0, ((ECAM_SIZE >> 20) - 1) as u8);
    bytes(&m)
}

impl AcpiTables {
    /// Builds the tables and writes them at [`RSDP_START`]; returns the RSDP address.
    pub fn write(&self, mem: &GuestMemory) -> Result<u64, Error> {
        self.write_with_dsdt(mem, &[])
    }

    /// As [`write`](Self::write), with `dsdt_extra` AML appended to the DSDT's body.
    pub fn write_with_dsdt(&self, mem: &GuestMemory, dsdt_extra: &[u8]) -> Result<u64, Error> {
        let mut next = RSDP_START + 64; // RSDP (36 bytes) first, tables 64-byte aligned after it
        let mut place = |t: &[u8]| -> Result<u64, Error> {
            let at = next;
            let end = at + t.len() as u64;
            if end > RESET_VECTOR {
                return Err(Error::TooBig(end - RSDP_START));
            }
            mem.write_slice(t, GuestAddress(at))
                .map_err(|e| Error::Write(e.to_string()))?;
            next = end.next_multiple_of(64);
            Ok(at)
        };
        let dsdt_addr = place(&dsdt_with(self.mmio64, dsdt_extra))?;
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(place(&fadt(dsdt_addr))?);
        xsdt.add_entry(place(&madt(self.cpus))?);
        xsdt.add_entry(place(&mcfg())?);
        for t in &self.extra {
            xsdt.add_entry(place(t)?);
        }
        let xsdt_addr = place(&bytes(&xsdt))?;
        let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
        mem.write_slice(&bytes(&rsdp), GuestAddress(RSDP_START))
            .map_err(|e| Error::Write(e.to_string()))?;
        Ok(RSDP_START)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create, Backing};

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap_or(0);
        let mut v = vec![0u8; len as usize];
        assert!(mem.read_slice(&mut v, GuestAddress(addr)).is_ok());
        v
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = create(64 << 20, Backing::Anonymous { thp: false }).unwrap_or_default();
        let rsdp = AcpiTables {
            cpus: 2,
            mmio64: (1 << 38, 1 << 38),
            extra: vec![],
        }
        .write(&mem)
        .unwrap_or(0);
        assert_eq!(rsdp, RSDP_START);
        let mut r = [0u8; 36];
        assert!(mem.read_slice(&mut r, GuestAddress(rsdp)).is_ok());
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap_or([0; 8]));
        let xsdt = table_at(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let mut sigs = Vec::new();
        for e in xsdt[36..].chunks(8) {
            let addr = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
            let t = table_at(&mem, addr);
            assert!(checksum_ok(&t), "{:?}", &t[..4]);
            sigs.push(t[..4].to_vec());
            if &t[..4] == b"APIC" {
                // Header (44) + 2 local APICs (8 each) + IOAPIC (12).
                assert_eq!(t.len(), 44 + 16 + 12);
            }
            if &t[..4] == b"FACP" {
                let dsdt = u64::from_le_bytes(t[140..148].try_into().unwrap_or([0; 8]));
                let d = table_at(&mem, dsdt);
                assert_eq!(&d[..4], b"DSDT");
                assert!(checksum_ok(&d));
                let flags = u32::from_le_bytes(t[112..116].try_into().unwrap_or([0; 4]));
                assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
            }
        }
        assert_eq!(
            sigs,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );
    }

    #[test]
    fn dsdt_names_the_host_bridge_and_s5() {
        let d = dsdt((1 << 38, 1 << 38));
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        assert!(has(b"PCI0") && has(b"_S5_") && has(b"COM1") && has(b"RTC_") && has(b"_CRS"));
    }
}
