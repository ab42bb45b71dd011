//! PLACEHOLDER being written now; replaced before commit.

use super::{Activation, Driver, DriverError, DriverStatus, Target};
use crate::config::{AppConfig, ExecConfig};

#[derive(Debug)]
pub struct Exec {
    config: ExecConfig,
}

impl Exec {
    pub fn new(config: ExecConfig) -> Self {
        Self { config }
    }
}

impl Driver for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }
    fn activate(&self, _t: &Target) -> Result<Activation, DriverError> {
        let _ = &self.config;
        Err(DriverError::failed("exec", "not written yet"))
    }
    fn commit(&self, _t: &Target, _a: &Activation) -> Result<(), DriverError> {
        Err(DriverError::failed("exec", "not written yet"))
    }
    fn restore(&self, _p: &Target, _f: &Activation) -> Result<Activation, DriverError> {
        Err(DriverError::failed("exec", "not written yet"))
    }
    fn stop(&self, _app: &AppConfig) -> Result<(), DriverError> {
        Err(DriverError::failed("exec", "not written yet"))
    }
    fn status(&self, _app: &AppConfig) -> Result<DriverStatus, DriverError> {
        Err(DriverError::failed("exec", "not written yet"))
    }
}
