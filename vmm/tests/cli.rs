//! The `vmm` binary's answers to bad command lines and bad files: a clear message and a non-zero exit
//! status, never a panic. (Only `missing_initramfs` gets as far as creating a VM, so it needs /dev/kvm.)

use std::process::Command;

fn vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "vmm panicked: {stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn scratch(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("iovmm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("scratch file");
    p
}

#[test]
fn no_kernel() {
    let (code, err) = vmm(&[]);
    assert_eq!(code, 1);
    assert!(err.contains("--kernel"), "{err}");
}

#[test]
fn missing_kernel_file() {
    let (code, err) = vmm(&["--kernel", "/nonexistent/vmlinuz", "--memory", "size=64M"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot open kernel /nonexistent/vmlinuz"),
        "{err}"
    );
}

#[test]
fn kernel_that_is_not_a_bzimage() {
    let k = scratch("not-a-kernel", &[0x7f, b'E', b'L', b'F'].repeat(2048));
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap_or(""), "--memory", "size=64M"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a bootable x86-64 bzImage"), "{err}");
}

/// A file with a bzImage header good enough for the loader, whose 64-bit entry is `jmp $`.
fn fake_bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 0x1000 * 4];
    img[0x1f1] = 4; // setup_sects: the payload starts at (4 + 1) * 512 = 0xa00
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes()); // code32_start
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0xa00 + 0x200..0xa00 + 0x202].copy_from_slice(&[0xeb, 0xfe]); // startup_64: jmp $
    img
}

/// A [`fake_bzimage`] whose 64-bit entry (startup_64, run at CPL0 with the boot state the VMM set up:
/// GDT, page tables, long mode) is `code`, written to a scratch file `name`.
fn tiny_kernel(name: &str, code: &[u8]) -> std::path::PathBuf {
    let mut img = fake_bzimage();
    img[0xa00 + 0x200..0xa00 + 0x200 + code.len()].copy_from_slice(code);
    scratch(name, &img)
}

#[test]
fn a_tiny_kernel_boots_writes_the_console_file_and_powers_off() {
    // It prints "hi" on COM1 and powers off through the ACPI sleep control register.
    let code = [
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'h', 0xee, // mov al, 'h'; out dx, al
        0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
        0xb0, 0x34, // mov al, (5 << 2) | SLP_EN
        0x66, 0xba, 0xc0, 0x03, // mov dx, 0x3c0
        0xee, // out dx, al
        0xeb, 0xfe, // jmp $
    ];
    let k = tiny_kernel("hi-bzimage", &code);
    let console = k.with_file_name("console.txt");
    let (code, err) = vmm(&[
        "--kernel",
        k.to_str().unwrap_or(""),
        "--memory",
        "size=64M",
        "--cpus",
        "boot=2",
        "--serial",
        &format!("file={}", console.display()),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(&console).unwrap_or_default(), "hi");
}

#[test]
fn edu_devices_are_plugged_then_parked_and_released_at_exit() {
    // A tiny kernel that powers off at once, with two --edu devices: they are set up through the IOMMU
    // component before the guest runs and parked and released after it powered off.
    let code = [
        0xb0, 0x34, // mov al, (5 << 2) | SLP_EN
        0x66, 0xba, 0xc0, 0x03, // mov dx, 0x3c0
        0xee, // out dx, al
        0xeb, 0xfe, // jmp $
    ];
    let k = tiny_kernel("off-bzimage", &code);
    let (code, err) = vmm(&[
        "-v",
        "--kernel",
        k.to_str().unwrap_or(""),
        "--memory",
        "size=64M",
        "--serial",
        "off",
        "--edu",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    for name in ["edu0", "edu1"] {
        assert!(
            err.contains(&format!("edu: {name} plugged as guest PCI")),
            "{name}: {err}"
        );
        assert!(
            err.contains(&format!("edu: {name}: 0 transfer(s)")),
            "{name}: {err}"
        );
    }
    assert_eq!(err.matches("; parked and released").count(), 2, "{err}");
    for bad in ["parking:", "releasing:", "NOT cleanly"] {
        assert!(!err.contains(bad), "{bad}: {err}");
    }
}

#[test]
fn sigterm_stops_the_vm_and_exits_143() {
    let k = scratch("spinning-bzimage", &fake_bzimage());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "--kernel",
            k.to_str().unwrap_or(""),
            "--memory",
            "size=64M",
            "--serial",
            "off",
            "--cpus",
            "2",
            "-v",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start vmm");
    // Wait until the vCPUs are about to run, then ask vmm to stop.
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut err, &mut line).unwrap_or(0) > 0 {
        seen.push_str(&line);
        if line.contains("starting 2 vCPU(s)") {
            break;
        }
        line.clear();
    }
    assert!(seen.contains("starting 2 vCPU(s)"), "{seen}");
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut err, &mut rest);
    let status = child.wait().expect("wait for vmm");
    let err = format!("{seen}{rest}");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
}

#[test]
fn missing_initramfs() {
    // The kernel check comes first, so give it a header that passes.
    let k = scratch("fake-bzimage", &fake_bzimage());
    let (code, err) = vmm(&[
        "--kernel",
        k.to_str().unwrap_or(""),
        "--initramfs",
        "/nonexistent/initrd",
        "--memory",
        "size=64M",
        "--serial",
        "off",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot open initramfs /nonexistent/initrd"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["--kernel", "k", "--memory", "size=lots"][..],
        &["--kernel", "k", "--memory", "hugepages=on"],
        &["--kernel", "k", "--cpus", "boot=0"],
        &["--kernel", "k", "--serial", "pty"],
        &["--kernel", "k", "--no-such-option"],
        &["--kernel", "k", "--edu", "9"],
        &["--kernel", "k", "--edu", "one"],
    ] {
        let (code, err) = vmm(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("error:"), "{args:?}: {err}");
    }
}

#[test]
fn memory_size_out_of_range() {
    let (code, err) = vmm(&["--kernel", "/nonexistent", "--memory", "size=1M"]);
    assert_eq!(code, 1);
    assert!(err.contains("guest memory size"), "{err}");
}
