//! Energy per frame: measured by a board sensor where there is a readable one, else modelled
//! from a device power profile, and always tagged with which.
//!
//! * [`PowerProfile`] (`profile.rs`): a board's idle, compute and radio power, each figure
//!   with its source, from `deploy/profiles/*.toml`.
//! * [`PowerProfile::model`] (`model.rs`): the one definition of a frame's energy, from its
//!   compute, radio and wall times. `auto` predicts the energy of each mode with it.
//! * [`PowerSensor`] and [`detect`] (`sensor.rs`): sensors found under a sysfs root, the
//!   Jetson INA3221 (`ina3221.rs`, both driver layouts) and x86 RAPL (`rapl.rs`).
//! * [`EnergyMeter`] (`meter.rs`): what the daemon holds. It measures, models or reports
//!   nothing, says which in one startup line, and gives each frame an [`EnergyReading`] that
//!   serializes into the frame's JSON line.
//!
//! `docs/energy.md` has the definitions, the profiles' sources and the sensors' paths.

mod ina3221;
mod meter;
mod model;
mod profile;
mod rapl;
mod sensor;

pub use meter::{EnergyMark, EnergyMeter, EnergyReading, How};
pub use model::{Component, FrameActivity, ModelledEnergy, transfer_time};
pub use profile::{Figure, PowerProfile, ProfileError, SourceKind};
pub use sensor::{Detection, EnergyCount, PowerSensor, SensorError, SensorOptions, detect};
