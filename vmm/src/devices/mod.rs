//! Devices emulated inside the VMM process. Only small legacy platform devices live
//! here; everything that parses bulk guest data runs in a sandboxed worker process.

pub mod acpi_pm;
pub mod acpi_pm_timer;
pub mod bus;
pub mod i8042;
pub mod reset_control;
pub mod rtc;
pub mod serial;

pub use bus::{Bus, BusDevice};
