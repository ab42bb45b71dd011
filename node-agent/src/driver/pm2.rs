//! PLACEHOLDER being written now; replaced before commit.

use super::{Activation, Driver, DriverError, DriverStatus, Target};
use crate::config::{AppConfig, Pm2Config};

#[derive(Debug)]
pub struct Pm2 {
    config: Pm2Config,
}

impl Pm2 {
    pub fn new(config: Pm2Config) -> Self {
        Self { config }
    }
}

impl Driver for Pm2 {
    fn name(&self) -> &'static str {
        "pm2"
    }
    fn activate(&self, _t: &Target) -> Result<Activation, DriverError> {
        let _ = &self.config;
        Err(DriverError::failed("pm2", "not written yet"))
    }
    fn commit(&self, _t: &Target, _a: &Activation) -> Result<(), DriverError> {
        Err(DriverError::failed("pm2", "not written yet"))
    }
    fn restore(&self, _p: &Target, _f: &Activation) -> Result<Activation, DriverError> {
        Err(DriverError::failed("pm2", "not written yet"))
    }
    fn stop(&self, _app: &AppConfig) -> Result<(), DriverError> {
        Err(DriverError::failed("pm2", "not written yet"))
    }
    fn status(&self, _app: &AppConfig) -> Result<DriverStatus, DriverError> {
        Err(DriverError::failed("pm2", "not written yet"))
    }
}
