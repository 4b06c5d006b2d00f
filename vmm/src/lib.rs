//! bulkhead's VMM: the one process that owns /dev/kvm, guest RAM and the vCPUs.
//!
//! Flow: [`cli`] -> [`config::VmConfig`] -> [`vm::Vm::new`] (KVM, [`memory`], [`boot`],
//! [`devices`], [`vcpu`]s) -> [`vm::Vm::run`] -> [`exit::VmExit`].

pub mod arch;
pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod control;
pub mod device_plan;
pub mod devices;
pub mod disk;
pub mod display;
pub mod exit;
pub mod memory;
pub mod net;
pub mod pause;
pub mod share;
pub mod vcpu;
pub mod vhost_user;
pub mod viewer;
pub mod virtio;
pub mod vm;
pub mod worker;
