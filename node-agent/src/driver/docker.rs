//! PLACEHOLDER being written now; replaced before commit.

use super::{Activation, Driver, DriverError, DriverStatus, Target};
use crate::config::{AppConfig, DockerConfig};

#[derive(Debug)]
pub struct Docker {
    config: DockerConfig,
}

impl Docker {
    pub fn new(config: DockerConfig) -> Self {
        Self { config }
    }
}

impl Driver for Docker {
    fn name(&self) -> &'static str {
        "docker"
    }
    fn activate(&self, _t: &Target) -> Result<Activation, DriverError> {
        let _ = &self.config;
        Err(DriverError::failed("docker", "not written yet"))
    }
    fn commit(&self, _t: &Target, _a: &Activation) -> Result<(), DriverError> {
        Err(DriverError::failed("docker", "not written yet"))
    }
    fn restore(&self, _p: &Target, _f: &Activation) -> Result<Activation, DriverError> {
        Err(DriverError::failed("docker", "not written yet"))
    }
    fn stop(&self, _app: &AppConfig) -> Result<(), DriverError> {
        Err(DriverError::failed("docker", "not written yet"))
    }
    fn status(&self, _app: &AppConfig) -> Result<DriverStatus, DriverError> {
        Err(DriverError::failed("docker", "not written yet"))
    }
}
