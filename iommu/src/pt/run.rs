//! Runs of entries: the writer's scans and stores over many consecutive entries of one table (map and
//! unmap of 2 MiB-or-more ranges), kept apart because they are the one place that leaves plain Rust.
//!
//! # Scans: plain loads
//! The writer scans a run (is it free? all leaves?) with plain, vectorizable loads (and with AVX2 when the
//! CPU has it). Within Rust's memory model: a data race needs a write, and while the writer lock is held the
//! only other accesses to entries are walkers' atomic *loads* (Rust forbids racing non-atomic/atomic or
//! mixed-size accesses only when one of them writes).
//!
//! # Stores: 16-byte aligned stores on x86-64 CPUs with AVX
//! Walkers load entries atomically at any time, so every store to an entry must be an atomic 8-byte store.
//! On Intel and AMD CPUs that enumerate AVX (CPUID.01H:ECX.AVX), aligned 16-byte SSE/AVX loads and stores
//! (`MOVDQA`, `VMOVDQA` VEX.128) are single-copy atomic: Intel SDM vol. 3A, "Guaranteed Atomic Operations";
//! AMD APM vol. 2, "Access Atomicity" (the guarantee GCC's libatomic, QEMU and portable-atomic rely on for
//! 16-byte atomics; they too check the vendor). One such store is therefore, to any observer, two 8-byte
//! atomic stores done at once, and it is ordered like any x86 store (TSO: a later store is never seen
//! before it, which is what `Release` compiles to). The store is written as inline assembly, which the
//! compiler treats as an opaque operation on memory (it cannot split, merge, reorder across it, or assume the
//! entries unchanged), so in the Rust abstract machine it stands for two `AtomicU64::store(_, Release)` of
//! its halves; no non-atomic write ever touches an entry. Wider (32/64-byte) stores have no such documented
//! guarantee and are not used. Without AVX, or on another vendor, or elsewhere than x86-64, runs are
//! stored with 8-byte atomic stores, eight per loop iteration.
//!
//! A run of 256 entries is then 128 stores instead of 256: at the core's two stores per cycle, half the
//! cycles of the scalar loop.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Release;

/// Runs shorter than this use scalar code (the dispatch would cost more than it saves).
const WIDE_MIN: usize = 16;

/// OR of all `v` (the writer's plain view of a run).
#[inline(always)]
pub(super) fn or_all(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if v.len() >= WIDE_MIN && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { or_all_avx2(v) };
    }
    or_all_generic(v)
}

#[inline(always)]
fn or_all_generic(v: &[u64]) -> u64 {
    v.iter().fold(0, |acc, &e| acc | e)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn or_all_avx2(v: &[u64]) -> u64 {
    or_all_generic(v)
}

/// AND of all `v` (bit 7: every entry has PS, i.e. is a leaf above level 1).
#[inline(always)]
pub(super) fn and_all(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if v.len() >= WIDE_MIN && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { and_all_avx2(v) };
    }
    and_all_generic(v)
}

#[inline(always)]
fn and_all_generic(v: &[u64]) -> u64 {
    v.iter().fold(!0, |acc, &e| acc & e)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn and_all_avx2(v: &[u64]) -> u64 {
    and_all_generic(v)
}

/// AND over `v` of `e | e >> 1` (bit 0: every entry has R or W).
#[inline(always)]
pub(super) fn and_present(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if v.len() >= WIDE_MIN && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { and_present_avx2(v) };
    }
    and_present_generic(v)
}

#[inline(always)]
fn and_present_generic(v: &[u64]) -> u64 {
    v.iter().fold(!0, |acc, &e| acc & (e | e >> 1))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn and_present_avx2(v: &[u64]) -> u64 {
    and_present_generic(v)
}

/// Stores `first`, `first + step`, `first + 2 * step`, ... into the entries of `run`, each entry with an
/// atomic store (see the module docs).
#[inline(always)]
pub(super) fn store_run(run: &[AtomicU64], first: u64, step: u64) {
    #[cfg(target_arch = "x86_64")]
    if run.len() >= WIDE_MIN && x86::wide_stores_atomic() {
        // SAFETY: the CPU guarantees 16-byte atomicity of aligned MOVDQA stores.
        unsafe { x86::store_run_16(run, first, step) };
        return;
    }
    store_run_8(run, first, step);
}

/// [`store_run`] with 8-byte atomic stores, eight per iteration (one loop branch per 64 bytes, so the loop
/// runs at the core's store throughput rather than its taken-branch throughput).
#[inline(always)]
fn store_run_8(run: &[AtomicU64], first: u64, step: u64) {
    let mut out = first;
    let (chunks, rest) = run.as_chunks::<8>();
    for c in chunks {
        for (k, e) in c.iter().enumerate() {
            e.store(out.wrapping_add((k as u64).wrapping_mul(step)), Release);
        }
        out = out.wrapping_add(step.wrapping_mul(8));
    }
    for e in rest {
        e.store(out, Release);
        out = out.wrapping_add(step);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::{__m128i, _mm_add_epi64, _mm_set1_epi64x, _mm_set_epi64x};
    use std::sync::atomic::Ordering::{Relaxed, Release};
    use std::sync::atomic::{AtomicU64, AtomicU8};

    /// 0: not yet known, 1: yes, 2: no.
    static WIDE: AtomicU8 = AtomicU8::new(0);

    /// Whether aligned 16-byte stores are documented single-copy atomic on this CPU: an Intel or AMD CPU
    /// that enumerates AVX.
    #[inline(always)]
    pub(super) fn wide_stores_atomic() -> bool {
        match WIDE.load(Relaxed) {
            1 => true,
            2 => false,
            _ => detect(),
        }
    }

    #[cold]
    fn detect() -> bool {
        // CPUID leaf 0: the vendor string in EBX, EDX, ECX.
        let v = std::arch::x86_64::__cpuid(0);
        let intel = (v.ebx, v.edx, v.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e); // GenuineIntel
        let amd = (v.ebx, v.edx, v.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163); // AuthenticAMD
        let yes = (intel || amd) && std::is_x86_feature_detected!("avx");
        WIDE.store(if yes { 1 } else { 2 }, Relaxed);
        yes
    }

    /// One 16-byte aligned store of `v` at `p` (two entries at once).
    ///
    /// # Safety
    /// `p` must be 16-byte aligned and point at two entries of a live table; the CPU must pass
    /// [`wide_stores_atomic`].
    #[inline(always)]
    unsafe fn store16(p: *const AtomicU64, v: __m128i) {
        // SAFETY: per the caller; the entries are atomics (interior mutability), so writing them through a
        // shared reference is allowed, and the store is atomic per 8-byte half (module docs).
        unsafe {
            asm!(
                "movdqa xmmword ptr [{p}], {v}",
                p = in(reg) p,
                v = in(xmm_reg) v,
                options(nostack, preserves_flags)
            );
        }
    }

    /// Four 16-byte aligned stores of `v[0..4]` at `p`, `p + 16`, `p + 32`, `p + 48` (eight entries), in
    /// that order: [`store16`] four times, with one address register.
    ///
    /// # Safety
    /// `p` must be 16-byte aligned and point at eight entries of a live table; the CPU must pass
    /// [`wide_stores_atomic`].
    #[inline(always)]
    unsafe fn store16x4(p: *const AtomicU64, v: [__m128i; 4]) {
        // SAFETY: as in `store16`, for each of the four pairs of entries.
        unsafe {
            asm!(
                "movdqa xmmword ptr [{p}], {a}",
                "movdqa xmmword ptr [{p} + 16], {b}",
                "movdqa xmmword ptr [{p} + 32], {c}",
                "movdqa xmmword ptr [{p} + 48], {d}",
                p = in(reg) p,
                a = in(xmm_reg) v[0],
                b = in(xmm_reg) v[1],
                c = in(xmm_reg) v[2],
                d = in(xmm_reg) v[3],
                options(nostack, preserves_flags)
            );
        }
    }

    /// [`super::store_run`] with 16-byte stores: an 8-byte atomic store for an odd first entry and an odd
    /// last entry, 16-byte stores (four per iteration, one address register, four values advanced in place)
    /// between.
    ///
    /// # Safety
    /// The CPU must pass [`wide_stores_atomic`].
    #[inline(always)]
    pub(super) unsafe fn store_run_16(run: &[AtomicU64], first: u64, step: u64) {
        let mut run = run;
        let mut out = first;
        if run.as_ptr() as usize & 15 != 0 {
            run[0].store(out, Release);
            out = out.wrapping_add(step);
            run = &run[1..];
        }
        let pairs = run.len() / 2;
        let two = step.wrapping_mul(2) as i64;
        let v = _mm_set_epi64x(out.wrapping_add(step) as i64, out as i64);
        let inc = _mm_set1_epi64x(two);
        let inc2 = _mm_add_epi64(inc, inc);
        let inc4 = _mm_add_epi64(inc2, inc2);
        // The values of the next four pairs, each advanced in place by four pairs per iteration.
        let mut next = [
            v,
            _mm_add_epi64(v, inc),
            _mm_add_epi64(v, inc2),
            _mm_add_epi64(_mm_add_epi64(v, inc2), inc),
        ];
        let mut p = run.as_ptr();
        // SAFETY: pairs / 4 * 8 <= run.len(): one past the last group of eight entries, in `run`.
        let end = unsafe { p.add(pairs / 4 * 8) };
        while p != end {
            // SAFETY: the eight entries from p are in `run` (p is before `end`), 16-byte aligned (run's
            // start is, and p advances by 64 bytes); the caller checked the CPU.
            unsafe {
                store16x4(p, next);
                p = p.add(8);
            }
            for v in &mut next {
                *v = _mm_add_epi64(*v, inc4);
            }
        }
        for &v in &next[..pairs % 4] {
            // SAFETY: as above, the next two entries (fewer than four pairs are left).
            unsafe {
                store16(p, v);
                p = p.add(2);
            }
        }
        if run.len() % 2 == 1 {
            let last = out.wrapping_add((2 * pairs as u64).wrapping_mul(step));
            run[2 * pairs].store(last, Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn store_run_writes_every_entry_at_any_offset_and_length() {
        let t: Vec<AtomicU64> = (0..80).map(|_| AtomicU64::new(7)).collect();
        for start in 0..4 {
            for len in [0, 1, 2, 3, 15, 16, 17, 31, 33, 64, 75] {
                for e in &t {
                    e.store(7, Relaxed);
                }
                store_run(&t[start..start + len], 0x1000_0003, 0x1000);
                for (i, e) in t.iter().enumerate() {
                    let want = if (start..start + len).contains(&i) {
                        0x1000_0003 + (i - start) as u64 * 0x1000
                    } else {
                        7
                    };
                    assert_eq!(e.load(Relaxed), want, "start {start} len {len} entry {i}");
                }
            }
        }
    }

    #[test]
    fn scans_agree_with_their_definition() {
        let v: Vec<u64> = (0..100u64).map(|i| (i << 12) | 3 | (i % 2) << 7).collect();
        for n in [0, 1, 16, 17, 100] {
            let s = &v[..n];
            assert_eq!(or_all(s), s.iter().fold(0, |a, &e| a | e));
            assert_eq!(and_present(s), s.iter().fold(!0, |a, &e| a & (e | e >> 1)));
            assert_eq!(and_all(s), s.iter().fold(!0, |a, &e| a & e));
        }
    }
}
