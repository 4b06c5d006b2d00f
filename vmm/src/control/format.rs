//! How `bulkhead list`, `status` and `debug` show what a VM reports, for people.

use std::fmt::Write;

use bulkhead_protocol::control::{DeviceStatus, VcpuRegisters, VmState, VmStatus};

use crate::config::MemorySize;

fn state(state: VmState) -> &'static str {
    match state {
        VmState::Running => "running",
        VmState::Paused => "paused",
    }
}

fn memory(bytes: u64) -> String {
    MemorySize::from_bytes(bytes).map_or_else(|_| format!("{bytes} bytes"), |m| m.to_string())
}

fn uptime(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs / 60 % 60),
    }
}

fn device(d: &DeviceStatus) -> String {
    let worker = match (d.failed, d.worker_pid) {
        (true, _) => "failed".to_owned(),
        (false, Some(pid)) => format!("pid {pid}"),
        (false, None) => "restarting".to_owned(),
    };
    format!(
        "{} ({}, {worker}, {} restarts)",
        d.name,
        d.kind.name(),
        d.restarts
    )
}

/// `bulkhead list`: one line per VM under a header.
pub fn list(vms: &[VmStatus]) -> String {
    let mut out = format!(
        "{:<20} {:>8} {:<8} {:>4} {:>7} {:>8}  DEVICES\n",
        "NAME", "PID", "STATE", "CPUS", "MEMORY", "UPTIME"
    );
    for vm in vms {
        let devices: Vec<String> = vm.devices.iter().map(device).collect();
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:<8} {:>4} {:>7} {:>8}  {}",
            vm.name,
            vm.pid,
            state(vm.state),
            vm.cpus,
            memory(vm.memory_bytes),
            uptime(vm.uptime_ms),
            if devices.is_empty() {
                "-".to_owned()
            } else {
                devices.join(", ")
            }
        );
    }
    out
}

/// `bulkhead status NAME`.
pub fn status(vm: &VmStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "name:    {}", vm.name);
    let _ = writeln!(out, "pid:     {}", vm.pid);
    let _ = writeln!(out, "state:   {}", state(vm.state));
    let _ = writeln!(out, "cpus:    {}", vm.cpus);
    let _ = writeln!(out, "memory:  {}", memory(vm.memory_bytes));
    let _ = writeln!(out, "uptime:  {}", uptime(vm.uptime_ms));
    if vm.devices.is_empty() {
        let _ = writeln!(out, "devices: none");
    } else {
        let _ = writeln!(out, "devices:");
        for d in &vm.devices {
            let _ = writeln!(out, "  {}", device(d));
        }
    }
    out
}

/// `bulkhead debug NAME`: the registers of each vCPU, in the order `lkvm debug` uses.
pub fn registers(vcpus: &[VcpuRegisters]) -> String {
    const GENERAL: [&str; 18] = [
        "rip", "rsp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10",
        "r11", "r12", "r13", "r14", "r15",
    ];
    const CONTROL: [&str; 7] = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"];
    const SEGMENTS: [&str; 8] = ["cs", "ss", "ds", "es", "fs", "gs", "tr", "ldt"];
    let mut out = String::new();
    for vcpu in vcpus {
        let get = |name: &str| vcpu.registers.get(name).copied().unwrap_or(0);
        let _ = writeln!(out, "vCPU {}:", vcpu.cpu);
        for (names, per_line) in [(&GENERAL[..], 3), (&CONTROL[..], 4)] {
            for chunk in names.chunks(per_line) {
                let line: Vec<String> = chunk
                    .iter()
                    .map(|n| format!("{n:>9}: {:016x}", get(n)))
                    .collect();
                let _ = writeln!(out, "{}", line.join(" "));
            }
        }
        let _ = writeln!(out, "  segment  selector  base              limit");
        for seg in SEGMENTS {
            let _ = writeln!(
                out,
                "  {seg:<7}  {:04x}      {:016x}  {:08x}",
                get(&format!("{seg}.selector")),
                get(&format!("{seg}.base")),
                get(&format!("{seg}.limit"))
            );
        }
        for table in ["gdt", "idt"] {
            let _ = writeln!(
                out,
                "  {table:<7}            {:016x}  {:08x}",
                get(&format!("{table}.base")),
                get(&format!("{table}.limit"))
            );
        }
    }
    out
}
