//! Per-vCPU CPUID: what KVM supports on this host, with the topology rewritten so the
//! guest sees `cpus` cores in one package, each with its own APIC id, and the hypervisor
//! bit set so Linux looks for (and uses) KVM's paravirtual leaves such as kvm-clock.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits of APIC id needed to number `cpus` cores.
fn core_id_bits(cpus: u8) -> u32 {
    u32::from(cpus).next_power_of_two().trailing_zeros()
}

/// Host facts that change what the guest may be told.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostFeatures {
    /// KVM emulates the LAPIC's TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER). KVM does
    /// not report the CPUID bit itself because it depends on the in-kernel LAPIC, which
    /// is the VMM's choice. Without it Linux must calibrate the LAPIC timer against the
    /// PIT, which fails on slow or nested hosts and leaves the guest without per-CPU timers.
    pub tsc_deadline_timer: bool,
}

const LEAF_EXTENDED_FEATURES: u32 = 0x7;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

/// KVM paravirtual features the guest is offered (CPUID 0x40000001 EAX): kvm-clock,
/// no port-0x80 delays, paravirtual EOI, steal time and the stable-clock bit - the set
/// QEMU enables by default. KVM also supports PV spinlock kicks, PV TLB flushes, PV
/// IPIs, async page faults and more; each adds a guest/host protocol whose lost wakeup
/// hangs the guest, and we saw such hangs during SMP bring-up under nested KVM.
const KVM_FEATURES_OFFERED: u32 = (1 << 0) // CLOCKSOURCE
    | (1 << 1) // NOP_IO_DELAY
    | (1 << 3) // CLOCKSOURCE2
    | (1 << 5) // STEAL_TIME
    | (1 << 6) // PV_EOI
    | (1 << 24); // CLOCKSOURCE_STABLE_BIT
const LEAF_XSAVE: u32 = 0xd;

/// XSAVE state components that exist only with a CPUID feature flag, as
/// (component, leaf, register selector, bit). KVM reports the components the host can
/// save even when it hides the feature (seen with PKRU under nested KVM); Linux then
/// sizes its XSAVE buffer from the features and warns that CPUID disagrees.
const XSAVE_COMPONENT_FEATURES: [(u32, u32, Register, u32); 6] = [
    (2, LEAF_FEATURES, Register::Ecx, 28),          // AVX
    (3, LEAF_EXTENDED_FEATURES, Register::Ebx, 14), // MPX bounds
    (4, LEAF_EXTENDED_FEATURES, Register::Ebx, 14), // MPX CSR
    (5, LEAF_EXTENDED_FEATURES, Register::Ebx, 16), // AVX-512 opmask
    (6, LEAF_EXTENDED_FEATURES, Register::Ebx, 16), // AVX-512 ZMM_Hi256
    (9, LEAF_EXTENDED_FEATURES, Register::Ecx, 3),  // PKRU
];
/// AVX-512 Hi16_ZMM shares the AVX-512 flag.
const XSAVE_AVX512_HI16: u32 = 7;

#[derive(Debug, Clone, Copy)]
enum Register {
    Ebx,
    Ecx,
}

fn has_feature(entries: &[kvm_cpuid_entry2], leaf: u32, register: Register, bit: u32) -> bool {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == 0)
        .is_some_and(|e| {
            let value = match register {
                Register::Ebx => e.ebx,
                Register::Ecx => e.ecx,
            };
            value & (1 << bit) != 0
        })
}

/// Drops XSAVE components whose feature is hidden, and recomputes the largest save area
/// size (leaf 0xd, subleaf 0, ECX) from the components that remain.
fn normalize_xsave(entries: &mut [kvm_cpuid_entry2]) {
    let mut hidden = 0u32;
    for (component, leaf, register, bit) in XSAVE_COMPONENT_FEATURES {
        if !has_feature(entries, leaf, register, bit) {
            hidden |= 1 << component;
        }
    }
    if hidden & (1 << 5) != 0 {
        hidden |= 1 << XSAVE_AVX512_HI16;
    }
    let Some(main) = entries
        .iter()
        .position(|e| e.function == LEAF_XSAVE && e.index == 0)
    else {
        return;
    };
    let supported = entries[main].eax & !hidden;
    // The legacy area plus the XSAVE header, then each remaining user component.
    let mut size = 512 + 64;
    for entry in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_XSAVE && e.index >= 2)
    {
        if entry.index >= 32 {
            continue;
        }
        if hidden & (1 << entry.index) != 0 {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        } else if supported & (1 << entry.index) != 0 {
            size = size.max(entry.ebx + entry.eax);
        }
    }
    entries[main].eax = supported;
    entries[main].ecx = size;
}

/// Rewrites `entries` (from KVM_GET_SUPPORTED_CPUID) for the vCPU with `apic_id` in a
/// guest of `cpus` vCPUs.
pub fn patch_for_vcpu(entries: &mut [kvm_cpuid_entry2], apic_id: u8, cpus: u8, host: HostFeatures) {
    normalize_xsave(entries);
    let apic = u32::from(apic_id);
    let count = u32::from(cpus);
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic << 24) | ((count & 0xff) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline_timer {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this
                // cache - 1 (the last level is shared by every core, the rest private).
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff)
                    | (((count - 1).min(63)) << 26)
                    | ((sharing.min(0xfff)) << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = apic;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_id_bits(cpus);
                        entry.ebx = count;
                        entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_KVM_FEATURES => entry.eax &= KVM_FEATURES_OFFERED,
            LEAF_AMD_SIZE_IDS => {
                // ECX[15:12]: APIC id bits for cores; ECX[7:0]: cores - 1.
                entry.ecx = (core_id_bits(cpus) << 12) | (count - 1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let mut entries = [entry(1, 0)];
        entries[0].ebx = 0x0000_0800; // CLFLUSH line size, preserved
        patch_for_vcpu(&mut entries, 3, 4, HostFeatures::default());
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(entries[0].ebx & 0xffff, 0x0800);
        assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & EDX_HTT, 0);
        assert_eq!(entries[0].ecx & ECX_TSC_DEADLINE, 0);
        let deadline = HostFeatures {
            tsc_deadline_timer: true,
        };
        patch_for_vcpu(&mut entries, 3, 4, deadline);
        assert_ne!(entries[0].ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology_describes_cores() {
        let mut entries = [entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        patch_for_vcpu(&mut entries, 5, 6, HostFeatures::default());
        assert_eq!(
            (entries[0].ebx, entries[0].ecx >> 8, entries[0].edx),
            (1, 1, 5)
        );
        assert_eq!(
            (entries[1].eax, entries[1].ebx, entries[1].ecx >> 8),
            (3, 6, 2)
        );
        assert_eq!(entries[2].ecx, 2);
        assert_eq!(entries[2].ebx, 0);
    }

    #[test]
    fn xsave_components_follow_their_feature_flags() {
        let mut leaf7 = entry(7, 0);
        leaf7.ebx = 0; // no MPX, no AVX-512
        leaf7.ecx = 0; // no PKU
        let mut leaf1 = entry(1, 0);
        leaf1.ecx = 1 << 28; // AVX
        let mut xsave = entry(0xd, 0);
        xsave.eax = 0x207; // x87, SSE, AVX, PKRU
        xsave.ecx = 0xa88;
        let mut avx = entry(0xd, 2);
        (avx.eax, avx.ebx) = (0x100, 0x240);
        let mut pkru = entry(0xd, 9);
        (pkru.eax, pkru.ebx) = (8, 0xa80);
        let mut entries = [leaf1, leaf7, xsave, avx, pkru];
        patch_for_vcpu(&mut entries, 0, 1, HostFeatures::default());
        assert_eq!(entries[2].eax, 0x7, "PKRU must go with PKU hidden");
        assert_eq!(entries[2].ecx, 0x340, "largest area is x87+SSE+header+AVX");
        assert_eq!((entries[4].eax, entries[4].ebx), (0, 0));

        entries[1].ecx = 1 << 3; // PKU shown
        entries[2].eax = 0x207;
        entries[4].eax = 8;
        entries[4].ebx = 0xa80;
        patch_for_vcpu(&mut entries, 0, 1, HostFeatures::default());
        assert_eq!(entries[2].eax, 0x207);
        assert_eq!(entries[2].ecx, 0xa88);
    }

    #[test]
    fn only_the_chosen_kvm_pv_features_are_offered() {
        let mut entries = [entry(0x4000_0001, 0)];
        entries[0].eax = 0x0103_ffff; // everything KVM 6.x supports
        patch_for_vcpu(&mut entries, 0, 2, HostFeatures::default());
        assert_eq!(entries[0].eax, 0x0100_006b);
        assert_eq!(entries[0].eax & (1 << 7), 0, "no PV spinlock kicks");
        assert_eq!(entries[0].eax & (1 << 11), 0, "no PV IPIs");
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut entries = [entry(1, 0)];
        entries[0].edx = EDX_HTT;
        patch_for_vcpu(&mut entries, 0, 1, HostFeatures::default());
        assert_eq!(entries[0].edx & EDX_HTT, 0);
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(5), 3);
    }
}
