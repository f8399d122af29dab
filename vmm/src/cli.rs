//! The command line, in the style of cloud-hypervisor: `vmm --kernel K --initramfs I ...` boots a guest,
//! `vmm check-host` reports what the host offers for passthrough.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};

/// iovmm: a minimal KVM VMM that passes PCI devices through with VFIO.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// More log output: -v info, -vv debug, -vvv trace (default: warnings and errors).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report what this host offers for passthrough (KVM, VFIO groups, IOMMU page sizes, hugepages, memlock).
    CheckHost(CheckHostArgs),
    /// Talk to a running VMM's control API (like cloud-hypervisor's ch-remote): add-device, remove-device,
    /// list-devices, info.
    Remote(crate::api::client::RemoteArgs),
}

/// Arguments of `vmm check-host`.
#[derive(Debug, Args)]
pub struct CheckHostArgs {
    /// Print the report as JSON instead of plain text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments that boot a guest.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The guest kernel: an x86-64 bzImage (e.g. Debian's /boot/vmlinuz-*).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// An initramfs (cpio, optionally compressed) for the guest kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// The guest kernel command line (`reboot=acpi` is appended unless it already says `reboot=`).
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// vCPUs: `boot=N` (1..=254).
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    pub cpus: CpusArg,

    /// Guest RAM: `size=<N>[K|M|G]`, optionally `,hugepages=on|off` (2 MiB hugetlbfs pages) and
    /// `,thp=on|off` (transparent huge pages by madvise; on by default).
    #[arg(
        long,
        value_name = "size=512M[,hugepages=on|off][,thp=on|off]",
        default_value = "size=512M"
    )]
    pub memory: MemoryArg,

    /// The guest console (COM1): `tty` (this process's stdin/stdout), `file=PATH` (output only) or `off`.
    #[arg(long, value_name = "tty|off|file=PATH", default_value = "tty")]
    pub serial: SerialArg,

    /// Pass a host PCI device through with VFIO: `path=/sys/bus/pci/devices/<BDF>` (repeatable). The device
    /// must be bound to vfio-pci; `vmm` says how to bind it when it is not.
    #[arg(long = "device", value_name = "path=/sys/bus/pci/devices/<BDF>")]
    pub devices: Vec<crate::passthrough::DeviceSpec>,

    /// Serve the control API on this Unix socket (`vmm remote --api-socket PATH ...`); also gives the
    /// guest ACPI PCI hotplug slots, so devices can be added and removed while it runs.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Add this many emulated DMA test devices (PCI 1234:11e8, QEMU's `edu` register layout) whose DMA
    /// goes through the IOMMU component's `soft` instance; see docs/edu.md.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=8))]
    pub edu: u8,
}

/// The default kernel command line: the console on COM1, reboot and poweroff through ACPI, and a panic
/// that resets at once (the VMM then exits non-zero instead of hanging).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1";

/// `--cpus boot=N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpusArg {
    /// vCPUs at boot.
    pub boot: u8,
}

/// `--memory size=...,hugepages=...,thp=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryArg {
    /// Bytes of guest RAM.
    pub size: u64,
    /// Back RAM with hugetlbfs pages.
    pub hugepages: bool,
    /// madvise RAM for transparent huge pages (ignored with hugepages).
    pub thp: bool,
}

/// `--serial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialArg {
    /// stdin/stdout.
    Tty,
    /// No console device.
    Off,
    /// Output to a file.
    File(PathBuf),
}

/// Errors of parsing the boot arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgError {
    /// A key this option does not know.
    #[error("unknown key '{key}' (known: {known})")]
    UnknownKey {
        /// The key.
        key: String,
        /// The known keys.
        known: &'static str,
    },
    /// A value that does not parse.
    #[error("bad value '{value}' for '{key}': {why}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What is expected.
        why: &'static str,
    },
    /// A required key is missing.
    #[error("missing '{0}='")]
    Missing(&'static str),
}

fn on_off(key: &'static str, v: &str) -> Result<bool, ArgError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ArgError::BadValue {
            key,
            value: v.into(),
            why: "expected on or off",
        }),
    }
}

/// Parses a size with an optional K, M, G or T suffix (powers of 1024; a bare number is bytes).
pub fn parse_size(key: &'static str, v: &str) -> Result<u64, ArgError> {
    let bad = || ArgError::BadValue {
        key,
        value: v.into(),
        why: "expected a size like 512M or 2G",
    };
    let t = v.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let s = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], s)
        }
        _ => (t, 0),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn pairs(s: &str) -> impl Iterator<Item = (&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

impl FromStr for CpusArg {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let mut boot = None;
        for (k, v) in pairs(s) {
            match k {
                "boot" => boot = Some(v),
                // A bare number is accepted as boot=N.
                n if v.is_empty() && n.parse::<u8>().is_ok() => boot = Some(n),
                _ => {
                    return Err(ArgError::UnknownKey {
                        key: k.into(),
                        known: "boot",
                    })
                }
            }
        }
        let v = boot.ok_or(ArgError::Missing("boot"))?;
        let boot = v
            .parse::<u8>()
            .ok()
            .filter(|n| (1..=crate::vm::MAX_VCPUS).contains(n))
            .ok_or_else(|| ArgError::BadValue {
                key: "boot",
                value: v.into(),
                why: "expected 1..=254",
            })?;
        Ok(Self { boot })
    }
}

impl FromStr for MemoryArg {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        let mut m = MemoryArg {
            size: 0,
            hugepages: false,
            thp: true,
        };
        let mut size = None;
        for (k, v) in pairs(s) {
            match k {
                "size" => size = Some(parse_size("size", v)?),
                "hugepages" => m.hugepages = on_off("hugepages", v)?,
                "thp" => m.thp = on_off("thp", v)?,
                _ => {
                    return Err(ArgError::UnknownKey {
                        key: k.into(),
                        known: "size, hugepages, thp",
                    })
                }
            }
        }
        m.size = size.ok_or(ArgError::Missing("size"))?;
        Ok(m)
    }
}

impl FromStr for SerialArg {
    type Err = ArgError;
    fn from_str(s: &str) -> Result<Self, ArgError> {
        match s.split_once('=') {
            None if s == "tty" => Ok(SerialArg::Tty),
            None if s == "off" => Ok(SerialArg::Off),
            Some(("file", p)) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
            _ => Err(ArgError::BadValue {
                key: "serial",
                value: s.into(),
                why: "expected tty, off or file=PATH",
            }),
        }
    }
}

#[cfg(test)]
mod boot_arg_tests {
    use super::*;

    #[test]
    fn memory_sizes_and_flags() {
        assert_eq!(
            "size=512M".parse::<MemoryArg>(),
            Ok(MemoryArg {
                size: 512 << 20,
                hugepages: false,
                thp: true
            })
        );
        assert_eq!(
            "size=2G,hugepages=on,thp=off".parse::<MemoryArg>(),
            Ok(MemoryArg {
                size: 2 << 30,
                hugepages: true,
                thp: false
            })
        );
        assert!(matches!(
            "size=12X".parse::<MemoryArg>(),
            Err(ArgError::BadValue { .. })
        ));
        assert!(matches!(
            "hugepages=on".parse::<MemoryArg>(),
            Err(ArgError::Missing("size"))
        ));
        assert!(matches!(
            "size=1G,huge=on".parse::<MemoryArg>(),
            Err(ArgError::UnknownKey { .. })
        ));
        assert!(matches!(
            "size=99999999999T".parse::<MemoryArg>(),
            Err(ArgError::BadValue { .. })
        ));
    }

    #[test]
    fn cpus_and_serial() {
        assert_eq!("boot=2".parse::<CpusArg>(), Ok(CpusArg { boot: 2 }));
        assert_eq!("4".parse::<CpusArg>(), Ok(CpusArg { boot: 4 }));
        assert!("boot=0".parse::<CpusArg>().is_err());
        assert!("boot=300".parse::<CpusArg>().is_err());
        assert!("max=2".parse::<CpusArg>().is_err());
        assert_eq!("off".parse::<SerialArg>(), Ok(SerialArg::Off));
        assert_eq!(
            "file=/tmp/x".parse::<SerialArg>(),
            Ok(SerialArg::File("/tmp/x".into()))
        );
        assert!("pty".parse::<SerialArg>().is_err());
    }

    #[test]
    fn whole_command_line_parses() {
        let cli = Cli::try_parse_from([
            "vmm",
            "--kernel",
            "k",
            "--initramfs",
            "i",
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "-v",
        ]);
        let cli = cli.map_err(|e| e.to_string());
        assert!(cli.is_ok(), "{cli:?}");
        if let Ok(cli) = cli {
            assert_eq!(cli.run.cpus.boot, 2);
            assert_eq!(cli.run.memory.size, 512 << 20);
            assert_eq!(cli.verbose, 1);
        }
        assert!(Cli::try_parse_from(["vmm", "--memory", "size=lots"]).is_err());
    }
}
